"""Metrics (ALGORITHM.md 9) against scikit-learn and brute force."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from rayclust.method.metrics import (adjusted_rand_index, cluster_accuracy, contingency,
                                     label_free_scores, label_metrics, neighbour_agreement,
                                     normalized_mutual_info, size_statistics)


def _brute_acc(true, pred) -> float:
    classes, clusters = sorted(set(true)), sorted(set(pred))
    best = 0
    if len(clusters) >= len(classes):
        for perm in itertools.permutations(clusters, len(classes)):
            best = max(best, sum(1 for t, p in zip(true, pred) if p == perm[classes.index(t)]))
    else:
        for perm in itertools.permutations(classes, len(clusters)):
            best = max(best, sum(1 for t, p in zip(true, pred) if t == perm[clusters.index(p)]))
    return best / len(true)


def test_accuracy_hand_cases():
    assert cluster_accuracy(np.array([0, 0, 1, 1]), np.array([1, 1, 0, 0])) == 1.0
    assert cluster_accuracy(np.array([0, 0, 1, 1, 2, 2]), np.array([0, 0, 0, 1, 1, 1])) \
        == pytest.approx(4 / 6)
    # more clusters than classes: the extra cluster matches nothing
    assert cluster_accuracy(np.array([0, 0, 0, 1, 1, 1]), np.array([0, 0, 2, 1, 1, 1])) \
        == pytest.approx(5 / 6)
    # fewer clusters than classes
    assert cluster_accuracy(np.array([0, 1, 2, 2]), np.array([5, 5, 5, 5])) == pytest.approx(0.5)


@pytest.mark.parametrize("n_classes,n_clusters", [(3, 3), (3, 5), (4, 2), (2, 4), (5, 5)])
def test_accuracy_matches_permutation_search(n_classes, n_clusters):
    rng = np.random.default_rng(n_classes * 10 + n_clusters)
    for _ in range(15):
        true = rng.integers(0, n_classes, 14)
        pred = rng.integers(0, n_clusters, 14)
        assert cluster_accuracy(true, pred) == pytest.approx(_brute_acc(list(true), list(pred)))


def test_nmi_and_ari_match_sklearn_on_random_labelings():
    rng = np.random.default_rng(0)
    for trial in range(120):
        n = int(rng.integers(2, 60))
        true = rng.integers(0, int(rng.integers(1, 7)), n)
        if trial % 3 == 0:  # correlated
            pred = np.where(rng.random(n) < 0.7, true, rng.integers(0, 5, n))
        else:
            pred = rng.integers(0, int(rng.integers(1, 7)), n)
        assert normalized_mutual_info(true, pred) == pytest.approx(
            normalized_mutual_info_score(true, pred), abs=1e-10)
        assert adjusted_rand_index(true, pred) == pytest.approx(
            adjusted_rand_score(true, pred), abs=1e-10)


def test_string_labels_and_edge_cases_match_sklearn():
    true = np.array(["cat", "cat", "dog", "dog", "car", "car", "car"])
    pred = np.array(["b", "b", "a", "b", "c", "c", "a"])
    cases = [
        (true, pred),
        (np.zeros(8, int), np.zeros(8, int)),             # both a single cluster
        (np.zeros(8, int), np.arange(8)),                 # single vs all singletons
        (np.arange(8), np.zeros(8, int)),
        (np.arange(8), np.arange(8)[::-1]),               # all singletons, both
        (np.array([0, 0, 1, 1]), np.array([7, 7, 7, 7])),
        (np.array([3, 3, 1, 1]), np.array([1, 1, 3, 3])),
        (np.array([0, 1]), np.array([0, 0])),
    ]
    for t, p in cases:
        assert normalized_mutual_info(t, p) == pytest.approx(normalized_mutual_info_score(t, p),
                                                             abs=1e-10), (t, p)
        assert adjusted_rand_index(t, p) == pytest.approx(adjusted_rand_score(t, p),
                                                          abs=1e-10), (t, p)
    assert cluster_accuracy(true, pred) == pytest.approx(_brute_acc(list(true), list(pred)))
    m = label_metrics(list(true), list(pred))
    assert set(m) == {"acc", "nmi", "ari"}


def test_single_point_edge_case_matches_sklearn():
    t, p = np.array([4]), np.array([9])
    assert normalized_mutual_info(t, p) == pytest.approx(normalized_mutual_info_score(t, p))
    assert cluster_accuracy(t, p) == 1.0
    with np.errstate(all="ignore"):
        ari = adjusted_rand_index(t, p)
    assert ari == pytest.approx(adjusted_rand_score(t, p)), f"ARI of one point is {ari}"


def test_contingency_table():
    table = contingency(np.array([1, 1, 0, 2]), np.array(["x", "y", "y", "y"]))
    np.testing.assert_array_equal(table, [[0, 1], [1, 1], [0, 1]])


def _blobs(k=4, per=50, d=12, noise=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(k, d, generator=g), dim=1)
    x = centres.repeat_interleave(per, 0) + noise * torch.randn(k * per, d, generator=g)
    return F.normalize(x, dim=1), torch.arange(k).repeat_interleave(per)


def test_neighbour_agreement():
    x, y = _blobs()
    perfect = neighbour_agreement(x, y, k=10)
    assert perfect > 0.99
    g = torch.Generator().manual_seed(1)
    rand = neighbour_agreement(x, torch.randint(0, 4, (200,), generator=g), k=10)
    assert abs(rand) < 0.1
    assert neighbour_agreement(x, torch.zeros(200, dtype=torch.long), k=10) == 0.0
    # splitting one blob at random into two clusters lowers the score but keeps it above chance
    split = torch.where((y == 3) & (torch.arange(200) % 2 == 0), torch.tensor(4), y)
    assert 0.5 < neighbour_agreement(x, split, k=10) < perfect - 0.05
    # merging two blobs keeps every neighbour pair together: kappa stays 1 (a known limit)
    merged = torch.where(y == 3, torch.tensor(2), y)
    assert neighbour_agreement(x, merged, k=10) == pytest.approx(1.0)
    # the sampled path (sample < N) still scores perfect blobs near 1
    assert neighbour_agreement(x, y, k=5, sample=80, seed=3) > 0.95


def test_neighbour_agreement_kappa_by_hand():
    # Two exact pairs far apart; labels split one pair: a = 1/2 of (point, neighbour) pairs agree.
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    labels = torch.tensor([0, 1, 1, 1])
    # k=1: 0->1 (disagree), 1->0 (disagree), 2->3, 3->2 (agree): a = 0.5
    # e = (1/4)^2 + (3/4)^2 = 0.625 ; kappa = (0.5 - 0.625) / 0.375 = -1/3
    assert neighbour_agreement(x, labels, k=1) == pytest.approx(-1 / 3, rel=1e-6)


def test_size_statistics():
    stats = size_statistics(np.array([0, 0, 0, 1, 2, 2]), 4)  # counts (3, 1, 2, 0)
    entropy = -(0.5 * math.log(0.5) + (1 / 6) * math.log(1 / 6) + (1 / 3) * math.log(1 / 3))
    assert stats == pytest.approx({"empty_clusters": 1, "largest_cluster_fraction": 0.5,
                                   "smallest_cluster_fraction": 0.0,
                                   "size_entropy_normalized": entropy / math.log(4)})
    balanced = size_statistics(np.array([0, 1, 2, 0, 1, 2]), 3)
    assert balanced["size_entropy_normalized"] == pytest.approx(1.0)
    assert balanced["empty_clusters"] == 0
    assert size_statistics(np.array([0, 0]), 1)["size_entropy_normalized"] == 1.0


def test_label_free_scores_keys():
    x, y = _blobs()
    scores = label_free_scores(x, y, 4, confidence=torch.full((200,), 0.75), k=5)
    assert scores["neighbour_agreement"] > 0.99
    assert scores["mean_confidence"] == pytest.approx(0.75)
    assert scores["empty_clusters"] == 0
