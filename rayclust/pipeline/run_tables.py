"""Readers and writers of the run directory's tables that several stages share (torch-free).

The vocabulary (noun, embedding), the embedded corpus, the `errors/` parts and stage 2's dense
image index. The stages' clusterings are in `stage_results`.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from rayclust import storage
from rayclust.config import ConfigError
from rayclust.pipeline.corpus import Corpus
from rayclust.pipeline.progress import log
from rayclust.pipeline.run_directory import RunDirectory
from rayclust.tables import embedding_array, embedding_matrix, errors_table


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


def read_run_vocabulary(run: RunDirectory) -> tuple[list[str], np.ndarray]:
    return read_vocabulary(run.vocabulary_table(), run.options)


def read_corpus(run: RunDirectory) -> Corpus:
    """The run's embedded corpus (`embeddings/`). The embed stage writes usable rows only, so
    a row set aside here is a bug, never input."""
    if not any(storage.read_parquet(p, run.options, ["id"]).num_rows
               for p in storage.parquet_files(run.embeddings, run.options)):
        raise ConfigError(f"no image could be embedded; see the errors in {run.errors}")
    corpus = Corpus.read(run.embeddings, run.options, stage="embed")
    if corpus.rejected:
        raise RuntimeError(f"{run.embeddings} holds {len(corpus.rejected)} unusable row(s), "
                           f"e.g. {corpus.rejected[0]}")
    return corpus


def write_rejected(run: RunDirectory, rejected: list[dict], part: str) -> None:
    """Rows set aside by `part`'s producer to `errors/part-<part>.parquet`, or remove a part an
    earlier run over a different input left (fixed name: a re-run rewrites, never adds)."""
    target = run.errors_part(part)
    if rejected:
        run.write_table(errors_table(rejected), target)
        log.warning("%d row(s) of the embeddings skipped (NaN, zero, wrong length or repeated "
                    "id); see %s", len(rejected), target)
    elif run.exists(target):
        storage.delete(target, run.options)


def count_errors(run: RunDirectory) -> int:
    if not run.exists(run.errors):
        return 0
    return sum(storage.read_parquet(f, run.options, ["uri"]).num_rows
               for f in storage.parquet_files(run.errors, run.options))


def images_table(corpus: Corpus) -> pa.Table:
    """idx, id, uri: stage 2's dense index of the corpus (row i is image i)."""
    return pa.table({"idx": pa.array(np.arange(len(corpus.ids), dtype=np.int64)),
                     "id": pa.array(corpus.ids, pa.string()),
                     "uri": pa.array(corpus.uris, pa.string())})


def read_images(run: RunDirectory) -> pa.Table:
    """stage2/images.parquet (idx, id, uri), checked to be in idx order (row i is image i)."""
    uri = run.stage2_file("images.parquet")
    images = run.read_table(uri, ["idx", "id", "uri"])
    if not np.array_equal(images["idx"].to_numpy(), np.arange(images.num_rows)):
        raise RuntimeError(f"{uri} is not the dense index 0..N-1 in order")
    return images
