"""knn (ALGORITHM.md 3.6) against a numpy brute force."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rayclust.method.neighbours import knn


def _unit(rng, n, d):
    x = rng.standard_normal((n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _brute(queries: np.ndarray, keys: np.ndarray, k: int, exclude_self: bool) -> np.ndarray:
    sims = queries @ keys.T
    if exclude_self:
        np.fill_diagonal(sims, -np.inf)
    return np.argsort(-sims, axis=1, kind="stable")[:, :k]


@pytest.mark.parametrize("chunk_size", [7, 16, 1000])
def test_matches_brute_force_over_chunks(chunk_size):
    rng = np.random.default_rng(0)
    x = _unit(rng, 53, 8)
    got = knn(torch.from_numpy(x), 6, chunk_size=chunk_size).numpy()
    assert got.shape == (53, 6) and got.dtype == np.int64
    np.testing.assert_array_equal(got, _brute(x, x, 6, exclude_self=True))


def test_exact_duplicates_self_never_listed_duplicate_is():
    rng = np.random.default_rng(1)
    x = _unit(rng, 40, 6)
    x[17] = x[3]
    x[29] = x[3]       # three identical rows: 3, 17, 29
    x[8] = x[35]       # a pair: 8, 35
    t = torch.from_numpy(x)
    got = knn(t, 5, chunk_size=9).numpy()  # rows 3/8 and 17/29/35 fall in different chunks
    rows = np.arange(len(x))
    assert not (got == rows[:, None]).any(), "a point is listed as its own neighbour"
    assert set(got[3, :2]) == {17, 29}
    assert set(got[17, :2]) == {3, 29}
    assert set(got[29, :2]) == {3, 17}
    assert got[8, 0] == 35 and got[35, 0] == 8
    # Similarities in the returned order equal the brute-force top-k similarities.
    sims = x @ x.T
    np.fill_diagonal(sims, -np.inf)
    expected = -np.sort(-sims, axis=1)[:, :5]
    np.testing.assert_allclose(np.take_along_axis(sims, got, 1), expected, atol=1e-12)


def test_all_rows_identical_still_gives_k_real_neighbours():
    x = torch.ones(6, 3) / 3 ** 0.5
    got = knn(x, 5, chunk_size=4)
    for i in range(6):
        assert sorted(got[i].tolist()) == [j for j in range(6) if j != i]


def test_k_too_large_raises():
    x = torch.from_numpy(_unit(np.random.default_rng(2), 10, 4))
    knn(x, 9)  # N - 1 candidates is fine
    with pytest.raises(ValueError):
        knn(x, 10)
    with pytest.raises(ValueError):
        knn(x, 5, keys=x[:4].clone())


def test_keys_differ_from_queries():
    rng = np.random.default_rng(3)
    queries, keys = _unit(rng, 23, 5), _unit(rng, 31, 5)
    got = knn(torch.from_numpy(queries), 4, chunk_size=5, keys=torch.from_numpy(keys)).numpy()
    assert got.shape == (23, 4)
    np.testing.assert_array_equal(got, _brute(queries, keys, 4, exclude_self=False))


def test_keys_equal_to_queries_by_identity_excludes_self_unless_disabled():
    x = torch.from_numpy(_unit(np.random.default_rng(4), 15, 4))
    np.testing.assert_array_equal(knn(x, 3, keys=x).numpy(), knn(x, 3).numpy())
    with_self = knn(x, 3, exclude_self=False, chunk_size=4).numpy()
    np.testing.assert_array_equal(with_self[:, 0], np.arange(15))
    np.testing.assert_array_equal(with_self, _brute(x.numpy(), x.numpy(), 3, exclude_self=False))
