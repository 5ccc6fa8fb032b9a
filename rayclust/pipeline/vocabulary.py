"""Vocabulary stage: noun text embeddings (TAC's 7-template ensemble), cached per model.

Writes `<run>/vocabulary/part-00000.parquet` (noun, embedding). Encoding ~118k nouns x 7 prompts
is the most expensive text work of a run, so results are cached under
`vocabulary.cache_dir/<model cache key>/<hash of nouns, templates, variant>.parquet` and reused by
every later run with the same model. `vocabulary.embeddings` skips encoding entirely.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pyarrow as pa

from rayclust import storage
from rayclust.config import Config, ConfigError
from rayclust.pipeline.progress import Progress, log
from rayclust.pipeline.run_directory import RunDirectory, part_name
from rayclust.tables import embedding_array, embedding_matrix
from rayclust.vocabulary import TAC_TEMPLATES, load_nouns

DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "rayclust", "vocabulary")


def vocabulary_table(nouns: list[str], matrix: np.ndarray) -> pa.Table:
    return pa.table({"noun": pa.array(nouns, pa.string()),
                     "embedding": embedding_array(matrix, "float32")})


def read_vocabulary(uri: str, options) -> tuple[list[str], np.ndarray]:
    """(nouns, (n, D) matrix); a file that is not a usable vocabulary is a user error."""
    try:
        table = storage.read_parquet(uri, options)
    except pa.ArrowException as exc:  # not Parquet at all (magic bytes, footer)
        raise ConfigError(f"vocabulary {uri} is not a readable Parquet file ({exc})") from None
    missing = {"noun", "embedding"} - set(table.column_names)
    if missing:
        raise ConfigError(f"vocabulary {uri} lacks column(s) {', '.join(sorted(missing))}; "
                          "expected (noun, embedding)")
    try:
        matrix = embedding_matrix(table["embedding"])
    except ValueError as exc:  # ragged, null or non-numeric vectors
        raise ConfigError(f"vocabulary {uri}: {exc}") from None
    if not len(matrix):
        raise ConfigError(f"vocabulary {uri} has no rows")
    return table["noun"].to_pylist(), matrix


def _cache_uri(config: Config, cache_key: str, nouns: list[str]) -> str:
    digest = hashlib.sha256()
    for text in (*nouns, "\x00", *TAC_TEMPLATES, str(config.vocabulary.normalize_templates)):
        digest.update(text.encode("utf-8") + b"\n")
    root = config.vocabulary.cache_dir or DEFAULT_CACHE
    return storage.join(root, cache_key, f"{digest.hexdigest()[:20]}.parquet")


class EncodeNouns:
    """Ray Data callable class: the text tower of the same open_clip model, one prompt ensemble
    per noun (the same actor pattern as the image encoder)."""

    def __init__(self, config: Config):
        from rayclust.pipeline.embed import load_on_actor
        self.encoder = load_on_actor(config)
        self.config = config

    def __call__(self, batch: dict) -> dict:
        matrix = self.encoder.encode_prompt_ensemble(
            list(batch["noun"]), TAC_TEMPLATES, batch_size=self.config.model.text_batch_size,
            normalize_templates=self.config.vocabulary.normalize_templates).numpy()
        return {"index": batch["index"], "embedding": matrix}


def encode_nouns(config: Config, nouns: list[str]) -> np.ndarray:
    """(len(nouns), D) prompt-ensemble embeddings through a pool of encoder actors."""
    import ray
    from ray.data import ActorPoolStrategy

    from rayclust.pipeline.embed import actor_resources

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


def embed_vocabulary(config: Config, run: RunDirectory) -> str:
    """Write the run's vocabulary table, encoding the nouns only when no cache has them."""
    target = storage.join(run.vocabulary, part_name(0))
    if run.is_complete(run.vocabulary):
        return target
    vc = config.vocabulary
    if vc.embeddings:
        nouns, matrix = read_vocabulary(vc.embeddings, config.storage)
        if vc.max_nouns:
            nouns, matrix = nouns[: vc.max_nouns], matrix[: vc.max_nouns]
    else:
        nouns = load_nouns(vc.source, vc.max_nouns,
                           read_text=lambda uri: storage.read_text(uri, config.storage))
        from rayclust.pipeline.embed import describe_encoder
        from rayclust.pipeline.ray_runtime import configure_data, ensure_ray

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
    run.mark_complete(run.vocabulary, {"nouns": len(nouns)})
    return target
