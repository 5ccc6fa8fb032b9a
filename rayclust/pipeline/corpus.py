"""The embedded corpus in memory, read from an embeddings Parquet with row-level validation.

Both `rayclust run` (the run's own `embeddings/`) and `rayclust cluster-embeddings` (a user's
Parquet) come through `Corpus.read`. Problems are sorted into two kinds:

* whole-input problems (not Parquet, no `embedding` column, a column that is not a list of
  numbers, no usable row at all) raise `ConfigError`: the CLI prints one line and exits 2;
* bad rows (a null, NaN/inf or all-zero vector; a vector whose length differs from the common
  one; a null or repeated `id`) are set aside in `Corpus.rejected` with the reason, and the rest
  are clustered. The driver writes them to `<run>/errors/` (see `run._read_corpus`).

The filtering is a pure function of the file, so Ray Train workers that read the same URI get
exactly the rows the driver kept, in the same order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rayclust import storage
from rayclust.config import ConfigError


@dataclass
class Corpus:
    """The embedded corpus in memory: ids, uris, optional labels, features (N, d).

    `rejected`: the rows of the source that were not kept, as errors-table rows (`uri`, `stage`,
    `error`); `uri` holds the row's id when the row has no uri.
    """

    ids: list[str]
    uris: list[str | None]
    labels: list[str] | None
    features: np.ndarray
    rejected: list[dict] = field(default_factory=list)

    @classmethod
    def read(cls, uri: str, options, stage: str = "cluster-embeddings") -> "Corpus":
        try:
            table = storage.read_parquet(uri, options)
        except pa.ArrowException as exc:  # ArrowInvalid: magic bytes not found, bad footer, ...
            raise ConfigError(f"{uri} is not a readable Parquet file or folder of Parquet "
                              f"files ({exc})") from None
        return cls.from_table(table, uri, stage)

    @classmethod
    def from_table(cls, table: pa.Table, uri: str, stage: str = "cluster-embeddings"
                   ) -> "Corpus":
        if "embedding" not in table.column_names:
            raise ConfigError(f"{uri} has no `embedding` column (columns: "
                              f"{', '.join(table.column_names) or 'none'})")
        column = table["embedding"]
        column = (column.combine_chunks() if column.num_chunks
                  else pa.array([], column.type))
        t = column.type
        if not (pa.types.is_fixed_size_list(t) or pa.types.is_list(t)
                or pa.types.is_large_list(t)):
            raise ConfigError(f"{uri}: column `embedding` must be a list of floats, got {t}")
        if not (pa.types.is_floating(t.value_type) or pa.types.is_integer(t.value_type)):
            raise ConfigError(f"{uri}: column `embedding` must hold numbers, got {t.value_type}")
        n = table.num_rows
        if n == 0:
            raise ConfigError(f"{uri} has no rows")

        ids = (table["id"].cast(pa.string()).to_pylist() if "id" in table.column_names
               else [f"row-{i:09d}" for i in range(n)])
        uris = (table["uri"].cast(pa.string()).to_pylist() if "uri" in table.column_names
                else [None] * n)
        labels = (table["label"].cast(pa.string()).to_pylist()
                  if "label" in table.column_names else None)

        reasons: list[str | None] = [None] * n
        # Vector length: the common one wins; the others are rows of another model or broken.
        lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
        valid = column.is_valid().to_numpy(zero_copy_only=False)
        lengths = np.where(valid, np.nan_to_num(lengths.astype(float), nan=0), -1).astype(int)
        if not valid.any():
            raise ConfigError(f"{uri}: every `embedding` is null")
        sizes, counts = np.unique(lengths[valid], return_counts=True)
        d = int(sizes[counts == counts.max()].max())  # a tie goes to the longer vectors
        if d == 0:
            raise ConfigError(f"{uri}: the embeddings are empty lists")
        for i in np.flatnonzero(~valid):
            reasons[i] = "null embedding"
        for i in np.flatnonzero(valid & (lengths != d)):
            reasons[i] = f"embedding has {lengths[i]} values, the others have {d}"

        shaped = valid & (lengths == d)
        if shaped.all():  # the usual case: no second copy of the matrix
            features = _values(column, n, d)
        else:
            features = np.zeros((n, d), np.float32)
            features[shaped] = _values(column.filter(pa.array(shaped)), int(shaped.sum()), d)
        # null values inside a vector arrive as NaN
        finite = np.isfinite(features).all(axis=1)
        squares = np.einsum("ij,ij->i", features, features)
        for i in np.flatnonzero(shaped & ~finite):
            reasons[i] = "embedding has NaN or infinite values"
        for i in np.flatnonzero(shaped & finite & (squares == 0)):
            reasons[i] = "embedding is all zeros"

        # Ids: a null id cannot be written to assignments; a repeated one keeps its first row.
        seen: set[str] = set()
        for i, row_id in enumerate(ids):
            if row_id is None:
                reasons[i] = reasons[i] or "null id"
            elif row_id in seen:
                reasons[i] = reasons[i] or f"duplicate id {row_id!r} (the first row is kept)"
            elif reasons[i] is None:
                seen.add(row_id)

        keep = np.array([r is None for r in reasons], dtype=bool)
        rejected = [{"uri": uris[i] if uris[i] is not None else (ids[i] or f"row {i}"),
                     "stage": stage, "error": f"row {i}: {reasons[i]}"}
                    for i in np.flatnonzero(~keep)]
        if not keep.any():
            first = rejected[0]["error"]
            raise ConfigError(f"{uri}: none of the {n} rows is usable (e.g. {first})")
        if keep.all():
            return cls(ids, uris, labels, features, rejected)
        index = np.flatnonzero(keep)
        return cls([ids[i] for i in index], [uris[i] for i in index],
                   [labels[i] for i in index] if labels is not None else None,
                   features[index], rejected)


def _values(column: pa.Array, rows: int, d: int) -> np.ndarray:
    """The (rows, d) float32 matrix of a list column whose vectors all have length d."""
    values = column.flatten().to_numpy(zero_copy_only=False)
    return np.asarray(values, dtype=np.float32).reshape(rows, d)
