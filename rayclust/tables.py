"""Arrow schemas of the run directory's tables and the embedding-column conversions.

`embedding` is a `fixed_size_list<float32|float16>[D]` of L2-normalised vectors (Parquet stores it
as a LIST and pyarrow restores the fixed size from the embedded Arrow schema; DuckDB or Spark read
`list<float>`). Readers here accept both fixed-size and variable-size lists.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

ERRORS_SCHEMA = pa.schema([("uri", pa.string()), ("stage", pa.string()), ("error", pa.string())])


def embedding_array(matrix: np.ndarray, dtype: str = "float32") -> pa.FixedSizeListArray:
    """(N, D) -> fixed_size_list<dtype>[D]."""
    matrix = np.ascontiguousarray(matrix, dtype=np.dtype(dtype))
    n, d = matrix.shape
    return pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1)), d)


def embedding_matrix(column: pa.ChunkedArray | pa.Array, name: str = "embedding") -> np.ndarray:
    """fixed_size_list or list<float> column -> (N, D) float32; a clear error for ragged rows."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks else pa.array([], column.type)
    t = column.type
    if pa.types.is_fixed_size_list(t):
        d = t.list_size
    elif pa.types.is_list(t) or pa.types.is_large_list(t):
        lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
        if len(lengths) and (lengths.min() != lengths.max()):
            raise ValueError(f"column `{name}` has vectors of different lengths "
                             f"({lengths.min()} to {lengths.max()})")
        d = int(lengths[0]) if len(lengths) else 0
    else:
        raise ValueError(f"column `{name}` must be a list of floats, got {t}")
    if column.null_count:
        raise ValueError(f"column `{name}` has {column.null_count} null vectors")
    if not pa.types.is_floating(t.value_type) and not pa.types.is_integer(t.value_type):
        raise ValueError(f"column `{name}` must hold numbers, got {t.value_type}")
    values = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    return values.reshape(len(column), d)


def errors_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=ERRORS_SCHEMA)
