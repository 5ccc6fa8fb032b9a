"""Entry points of a whole run: `run` (images), `cluster_embeddings` (precomputed) and `demo`.

Each writes the resolved config to `<run>/config.yaml`, runs the stages in order (skipping those
already complete in the run directory) and returns a dict of the URIs it wrote plus the metrics.
"""

from __future__ import annotations

import os

from rayclust import storage
from rayclust.config import Config, ConfigError, to_yaml
from rayclust.pipeline.assign import write_outputs
from rayclust.pipeline.embed import embed_images
from rayclust.pipeline.progress import log
from rayclust.pipeline.run_directory import RunDirectory
from rayclust.pipeline.stage1 import Corpus, train_stage1
from rayclust.pipeline.vocabulary import embed_vocabulary


def open_run(config: Config, run_dir: str) -> RunDirectory:
    run = RunDirectory(run_dir, config.storage)
    if not storage.is_remote(run_dir):
        os.makedirs(run_dir, exist_ok=True)
    storage.write_text(run.config, to_yaml(config), config.storage)
    return run


def _count_errors(run: RunDirectory) -> int:
    if not storage.exists(run.errors, run.options):
        return 0
    files = storage.parquet_files(run.errors, run.options)
    return sum(storage.read_parquet(f, run.options, ["uri"]).num_rows for f in files)


def _finish(config: Config, run: RunDirectory, corpus: Corpus, vocabulary_uri: str,
            embeddings_uri: str) -> dict:
    result, summary = train_stage1(config, run, corpus, vocabulary_uri, embeddings_uri)
    extra = {"errors": _count_errors(run), "run_dir": run.root}
    if config.stage2.enabled:
        from rayclust.pipeline.stage2 import run_stage2

        stage2 = run_stage2(config, run, corpus, result, vocabulary_uri)
        if stage2 is None:
            extra["stage2"] = {"skipped": "the language guard kept k-means"}
        else:
            extra["stage1_assignment"] = {"source": result.source, "label_free":
                                          result.scores.get(result.source, {})}
            if corpus.labels is not None:
                from rayclust.method.metrics import label_metrics
                extra["stage1_assignment"]["labels"] = label_metrics(corpus.labels,
                                                                     result.labels)
            result, extra["stage2"] = stage2
    outputs = write_outputs(config, run, corpus, result, summary, extra)
    return {"run_dir": run.root, "config": run.config, "vocabulary": vocabulary_uri, **outputs}


def run(config: Config, run_dir: str) -> dict:
    """Images -> embeddings -> vocabulary -> stage 1 -> assignments (ARCHITECTURE.md)."""
    rd = open_run(config, run_dir)
    embed_images(config, rd)
    vocabulary_uri = embed_vocabulary(config, rd)
    corpus = Corpus.read(rd.embeddings, rd.options)
    if not corpus.ids:
        raise ConfigError(f"no image could be embedded; see the errors in {rd.errors}")
    return _finish(config, rd, corpus, vocabulary_uri, rd.embeddings)


def embed(config: Config, run_dir: str) -> dict:
    """The embedding stage alone: manifest, embeddings, errors, thumbnails."""
    rd = open_run(config, run_dir)
    parts = embed_images(config, rd)
    images = sum(storage.read_parquet(p, rd.options, ["id"]).num_rows for p in parts)
    return {"run_dir": rd.root, "embeddings": parts, "images": images,
            "errors": _count_errors(rd)}


def cluster_embeddings(config: Config, run_dir: str, embeddings: str,
                       vocabulary: str | None = None) -> dict:
    """Cluster precomputed embeddings (e.g. clip-retrieval output) without touching images.

    `embeddings`: Parquet file or folder with an `embedding` column (fixed_size_list or
    list<float>) and optional `id`, `uri`, `label`. `vocabulary`: Parquet of (noun, embedding)
    from the same CLIP model; without it the nouns are encoded with `model.*`.
    """
    if not storage.exists(embeddings, config.storage):
        raise ConfigError(f"--embeddings {embeddings} does not exist")
    if vocabulary is not None:
        if not storage.exists(vocabulary, config.storage):
            raise ConfigError(f"--vocabulary {vocabulary} does not exist")
        config.vocabulary.embeddings = vocabulary
    rd = open_run(config, run_dir)
    corpus = Corpus.read(embeddings, config.storage)
    log.info("cluster-embeddings: %d embeddings of dimension %d", len(corpus.ids),
             corpus.features.shape[1])
    vocabulary_uri = embed_vocabulary(config, rd)
    return _finish(config, rd, corpus, vocabulary_uri, embeddings)
