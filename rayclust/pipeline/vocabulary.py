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
    table = storage.read_parquet(uri, options)
    missing = {"noun", "embedding"} - set(table.column_names)
    if missing:
        raise ConfigError(f"vocabulary {uri} lacks column(s) {', '.join(sorted(missing))}; "
                          "expected (noun, embedding)")
    return table["noun"].to_pylist(), embedding_matrix(table["embedding"])


def _cache_uri(config: Config, cache_key: str, nouns: list[str]) -> str:
    digest = hashlib.sha256()
    for text in (*nouns, "\x00", *TAC_TEMPLATES, str(config.vocabulary.normalize_templates)):
        digest.update(text.encode("utf-8") + b"\n")
    root = config.vocabulary.cache_dir or DEFAULT_CACHE
    return storage.join(root, cache_key, f"{digest.hexdigest()[:20]}.parquet")


def embed_vocabulary(config: Config, run: RunDirectory, encoder_factory) -> str:
    """Write the run's vocabulary table; `encoder_factory()` is called only when encoding."""
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
        encoder = encoder_factory()
        cache = _cache_uri(config, encoder.cache_key, nouns)
        if storage.exists(cache, config.storage):
            log.info("vocabulary: %d nouns from cache %s", len(nouns), cache)
            nouns, matrix = read_vocabulary(cache, config.storage)
        else:
            total = len(nouns) * len(TAC_TEMPLATES)
            with Progress(total, "encoding nouns", config.progress, unit="prompt") as progress:
                last = [0]

                def report(done: int, _total: int) -> None:
                    progress.update(done - last[0])
                    last[0] = done

                matrix = encoder.encode_prompt_ensemble(
                    nouns, TAC_TEMPLATES, batch_size=config.model.text_batch_size,
                    normalize_templates=vc.normalize_templates, progress=report).numpy()
            try:
                storage.write_parquet(vocabulary_table(nouns, matrix), cache, config.storage)
            except OSError as exc:  # a read-only cache must not fail the run
                log.warning("vocabulary: could not write cache %s: %s", cache, exc)
    run.write_table(vocabulary_table(nouns, matrix), target)
    run.mark_complete(run.vocabulary, {"nouns": len(nouns)})
    return target
