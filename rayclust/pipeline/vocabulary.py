"""Vocabulary stage: noun text embeddings (TAC's 7-template ensemble), cached per model.

Writes `<run>/vocabulary/part-00000.parquet` (noun, embedding; `run_tables` reads it). Encoding
~118k nouns x 7 prompts is the most expensive text work of a run, so results are cached under
`vocabulary.cache_dir/<model cache key>/<hash of nouns, templates, variant>.parquet` and reused by
every later run with the same model. `vocabulary.embeddings` skips encoding entirely.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pyarrow as pa

from rayclust import storage
from rayclust.config import Config
from rayclust.pipeline.clip_actors import EncodeNouns, actor_resources, describe_encoder
from rayclust.pipeline.progress import Progress, log
from rayclust.pipeline.ray_runtime import configure_data, ensure_ray
from rayclust.pipeline.run_directory import RunDirectory
from rayclust.pipeline.run_tables import read_vocabulary, vocabulary_table
from rayclust.vocabulary import TAC_TEMPLATES, load_nouns

DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "rayclust", "vocabulary")


def _cache_uri(config: Config, cache_key: str, nouns: list[str]) -> str:
    digest = hashlib.sha256()
    for text in (*nouns, "\x00", *TAC_TEMPLATES, str(config.vocabulary.normalize_templates)):
        digest.update(text.encode("utf-8") + b"\n")
    root = config.vocabulary.cache_dir or DEFAULT_CACHE
    return storage.join(root, cache_key, f"{digest.hexdigest()[:20]}.parquet")


def encode_nouns(config: Config, nouns: list[str]) -> np.ndarray:
    """(len(nouns), D) prompt-ensemble embeddings through a pool of encoder actors."""
    import ray
    from ray.data import ActorPoolStrategy

    actors, gpus = actor_resources(config)
    per_batch = max(1, config.model.text_batch_size // len(TAC_TEMPLATES))
    ds = ray.data.from_arrow(pa.table({"index": np.arange(len(nouns)), "noun": nouns}))
    ds = ds.map_batches(EncodeNouns, batch_size=per_batch, batch_format="numpy",
                        compute=ActorPoolStrategy(size=actors), num_gpus=gpus,
                        num_cpus=config.embed.cpus_per_actor,
                        fn_constructor_kwargs={"config": config})
    matrix = None
    with Progress(len(nouns), "encoding nouns", "noun",
                  config.embed.progress_seconds) as progress:
        for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
            if matrix is None:
                matrix = np.zeros((len(nouns), batch["embedding"].shape[1]), np.float32)
            matrix[batch["index"]] = batch["embedding"]
            progress.update(len(batch["index"]))
    return matrix


def run_vocabulary(config: Config, run: RunDirectory) -> list[str]:
    """The vocabulary stage: write the run's vocabulary table, encoding the nouns only when no
    cache has them (or taking `vocabulary.embeddings`)."""
    target = run.vocabulary_table()
    if run.is_complete(run.vocabulary):
        return [target]
    vc = config.vocabulary
    if vc.embeddings:
        nouns, matrix = read_vocabulary(vc.embeddings, config.storage)
        if vc.max_nouns:
            nouns, matrix = nouns[: vc.max_nouns], matrix[: vc.max_nouns]
    else:
        nouns = load_nouns(vc.source, vc.max_nouns,
                           read_text=lambda uri: storage.read_text(uri, config.storage))
        ensure_ray(config)
        configure_data(config)
        cache = _cache_uri(config, describe_encoder(config).cache_key, nouns)
        if storage.exists(cache, config.storage):
            log.info("vocabulary: %d nouns from cache %s", len(nouns), cache)
            nouns, matrix = read_vocabulary(cache, config.storage)
        else:
            matrix = encode_nouns(config, nouns)
            try:
                storage.write_parquet(vocabulary_table(nouns, matrix), cache, config.storage)
            except OSError as exc:  # a read-only cache must not fail the run
                log.warning("vocabulary: could not write cache %s: %s", cache, exc)
    run.write_table(vocabulary_table(nouns, matrix), target)
    run.mark_complete(run.vocabulary, {"nouns": len(nouns), "dimension": int(matrix.shape[1])})
    return [target]
