"""Entry points of a whole run: `run` (images), `cluster_embeddings` (precomputed) and `demo`.

Each writes the resolved config to `<run>/config.yaml`, runs the stages in order (skipping those
already complete in the run directory) and returns a dict of the URIs it wrote plus the metrics.
"""

from __future__ import annotations

import os

from rayclust import storage
from rayclust.config import Config, ConfigError, to_yaml
from rayclust.pipeline.corpus import Corpus
from rayclust.pipeline.embed import embed_images
from rayclust.pipeline.progress import log
from rayclust.pipeline.run_directory import RunDirectory
from rayclust.pipeline.vocabulary import embed_vocabulary, read_vocabulary

# The errors part of the rows `Corpus.read` set aside: one deterministic name, so a re-run
# rewrites it instead of adding a second copy (README "The run directory").
CORPUS_ERRORS_PART = "part-embeddings.parquet"


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
    # torch, open_clip and the method layer load here, not at import: the CLI imports this
    # module, and a wrong input file should fail in a second, not after importing torch (many seconds).
    from rayclust.pipeline.assign import write_outputs
    from rayclust.pipeline.stage1 import train_stage1

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


def check_model(config: Config, dimension: int | None = None) -> None:
    """Fail on an unknown open_clip model name (or, given `dimension`, a model whose embeddings
    have another size) in the driver, before Ray starts.

    The encoder is otherwise first built in a Ray task (weights download on a worker), so such
    a mistake surfaced only after a local cluster had started and a worker had imported torch:
    a minute or more on a small machine. `load_encoder` raises its usual message with close
    matches before it builds or downloads anything for an unknown name; the embedding size of a
    known architecture is in open_clip's bundled config, no weights needed. Hub models and local
    checkpoint folders are checked where they are loaded.
    """
    import open_clip

    from rayclust.encoders import load_encoder

    m = config.model
    pretrained = str(m.pretrained or "")
    if (m.name.startswith(("hf-hub:", "local-dir:")) or pretrained.startswith("hf-hub:")
            or (pretrained and os.path.isdir(pretrained))):
        return  # the name is not a bundled open_clip architecture then
    arch = m.name.replace("/", "-")  # open_clip accepts 'ViT-B/32' for 'ViT-B-32'
    if arch not in open_clip.list_models():
        load_encoder(m.name, None, device="cpu")  # raises EncoderLoadError with close matches
    model_dim = (open_clip.get_model_config(arch) or {}).get("embed_dim")
    if dimension is not None and model_dim is not None and model_dim != dimension:
        raise ConfigError(f"the embeddings have dimension {dimension} but model {m.name} "
                          f"encodes the vocabulary with dimension {model_dim}: set "
                          "model.name/model.pretrained to the model that made them, or pass "
                          "--vocabulary")


def _read_corpus(config: Config, rd: RunDirectory, uri: str, stage: str) -> Corpus:
    """The corpus at `uri`, its unusable rows written to `<run>/errors/` and logged."""
    corpus = Corpus.read(uri, rd.options, stage=stage)
    _write_rejected(rd, corpus)
    _check_enough_rows(config, corpus, uri)
    return corpus


def _write_rejected(rd: RunDirectory, corpus: Corpus) -> None:
    target = storage.join(rd.errors, CORPUS_ERRORS_PART)
    if corpus.rejected:
        from rayclust.tables import errors_table
        rd.write_table(errors_table(corpus.rejected), target)
        log.warning("%d row(s) of the embeddings skipped (NaN, zero, wrong length or repeated "
                    "id); see %s", len(corpus.rejected), target)
    elif rd.exists(target):  # from an earlier run over a different file
        storage.delete(target, rd.options)


def _check_enough_rows(config: Config, corpus: Corpus, uri: str) -> None:
    if len(corpus.ids) < config.clusters:
        skipped = f" ({len(corpus.rejected)} more skipped as unusable)" if corpus.rejected else ""
        raise ConfigError(f"{uri}: {len(corpus.ids)} usable embedding(s){skipped} cannot form "
                          f"{config.clusters} clusters; lower `clusters`")


def run(config: Config, run_dir: str) -> dict:
    """Images -> embeddings -> vocabulary -> stage 1 -> assignments (ARCHITECTURE.md)."""
    check_model(config)
    rd = open_run(config, run_dir)
    embed_images(config, rd)
    vocabulary_uri = embed_vocabulary(config, rd)
    if not any(storage.read_parquet(p, rd.options, ["id"]).num_rows
               for p in storage.parquet_files(rd.embeddings, rd.options)):
        raise ConfigError(f"no image could be embedded; see the errors in {rd.errors}")
    corpus = _read_corpus(config, rd, rd.embeddings, stage="embed")
    return _finish(config, rd, corpus, vocabulary_uri, rd.embeddings)


def embed(config: Config, run_dir: str) -> dict:
    """The embedding stage alone: manifest, embeddings, errors, thumbnails."""
    check_model(config)
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

    The inputs are checked before anything is written or Ray is started, so a wrong file fails
    in seconds. Unusable rows go to `<run>/errors/part-embeddings.parquet` and the rest are
    clustered (corpus.py).
    """
    if not storage.exists(embeddings, config.storage):
        raise ConfigError(f"--embeddings {embeddings} does not exist")
    if vocabulary is not None:
        if not storage.exists(vocabulary, config.storage):
            raise ConfigError(f"--vocabulary {vocabulary} does not exist")
        config.vocabulary.embeddings = vocabulary
    corpus = Corpus.read(embeddings, config.storage, stage="cluster-embeddings")
    _check_enough_rows(config, corpus, embeddings)
    dimension = corpus.features.shape[1]
    if config.vocabulary.embeddings:
        _, nouns = read_vocabulary(config.vocabulary.embeddings, config.storage)
        if nouns.shape[1] != dimension:
            raise ConfigError(
                f"{embeddings} has embeddings of dimension {dimension} but the vocabulary "
                f"{config.vocabulary.embeddings} has {nouns.shape[1]}: both must come from the "
                "same CLIP model")
        del nouns
    else:
        check_model(config, dimension)
    rd = open_run(config, run_dir)
    _write_rejected(rd, corpus)
    log.info("cluster-embeddings: %d embeddings of dimension %d", len(corpus.ids), dimension)
    vocabulary_uri = embed_vocabulary(config, rd)
    return _finish(config, rd, corpus, vocabulary_uri, embeddings)
