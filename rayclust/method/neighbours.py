"""Exact k-nearest neighbours by chunked matrix products (ALGORITHM.md 3.6, 10).

Inner product on unit vectors (= cosine). Self is excluded by *index*, not by dropping column 0,
so exact duplicates and identical text counterparts still get k real neighbours (the TAC/TEMI
caveats in ALGORITHM.md). Memory is O(chunk_size * N) per step.
"""

from __future__ import annotations

import torch


def knn(x: torch.Tensor, k: int, chunk_size: int = 4096, exclude_self: bool = True,
        keys: torch.Tensor | None = None) -> torch.Tensor:
    """Indices of the k most similar rows of `keys` (default x) for every row of x.

    x (N, d) queries, keys (M, d). Returns (N, k) int64, most similar first. With
    exclude_self (only meaningful when keys is x) row i never lists i.
    """
    keys = x if keys is None else keys
    self_search = exclude_self and keys is x
    limit = keys.shape[0] - (1 if self_search else 0)
    if k > limit:
        raise ValueError(f"k={k} neighbours requested but only {limit} candidates exist")
    out = torch.empty(x.shape[0], k, dtype=torch.long, device=x.device)
    for start in range(0, x.shape[0], chunk_size):
        stop = min(start + chunk_size, x.shape[0])
        sims = x[start:stop] @ keys.T
        if self_search:
            rows = torch.arange(stop - start, device=x.device)
            sims[rows, rows + start] = float("-inf")
        out[start:stop] = sims.topk(k, dim=1).indices
    return out
