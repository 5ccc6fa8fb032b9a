"""Clustering metrics: with labels (ACC, NMI, ARI; ALGORITHM.md 9) and label-free scores.

ACC uses the Hungarian matching of scipy on the contingency matrix padded to square, so a
cluster count different from the class count is handled (extra clusters or classes match
nothing). NMI uses the arithmetic-mean normaliser (scikit-learn's default); ARI is Hubert and
Arabie's. The label-free scores here (neighbour agreement, size statistics) are reported for
every clustering, in the fixed image-embedding space; model selection and the language guard use
`rayclust.method.selection`, which also scores a text view and penalises merges.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from rayclust.method.neighbours import knn


def _encode(values: np.ndarray) -> np.ndarray:
    return np.unique(np.asarray(values), return_inverse=True)[1].reshape(-1)


def contingency(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    p, t = _encode(pred), _encode(true)
    table = np.zeros((p.max() + 1, t.max() + 1), dtype=np.int64)
    np.add.at(table, (p, t), 1)
    return table


def cluster_accuracy(true: np.ndarray, pred: np.ndarray) -> float:
    """Best one-to-one matching of clusters to classes (Hungarian), as a fraction of N."""
    table = contingency(pred, true)
    size = max(table.shape)
    padded = np.zeros((size, size), dtype=np.int64)
    padded[: table.shape[0], : table.shape[1]] = table
    rows, cols = linear_sum_assignment(-padded)
    return float(padded[rows, cols].sum() / len(true))


def _entropy(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def normalized_mutual_info(true: np.ndarray, pred: np.ndarray) -> float:
    table = contingency(pred, true).astype(np.float64)
    n = table.sum()
    h_pred, h_true = _entropy(table.sum(1)), _entropy(table.sum(0))
    if h_pred == 0 and h_true == 0:
        return 1.0
    nz = table > 0
    outer = np.outer(table.sum(1), table.sum(0))
    mi = float((table[nz] / n * np.log(table[nz] * n / outer[nz])).sum())
    denom = (h_pred + h_true) / 2
    return float(mi / denom) if denom > 0 else 0.0


def adjusted_rand_index(true: np.ndarray, pred: np.ndarray) -> float:
    if len(true) <= 1:  # no pairs: identical partitions by convention (as scikit-learn)
        return 1.0
    table = contingency(pred, true).astype(np.float64)
    comb = lambda x: x * (x - 1) / 2  # noqa: E731
    index = comb(table).sum()
    a, b = comb(table.sum(1)).sum(), comb(table.sum(0)).sum()
    expected = a * b / comb(table.sum())
    maximum = (a + b) / 2
    if maximum == expected:
        return 1.0
    return float((index - expected) / (maximum - expected))


def label_metrics(true, pred) -> dict[str, float]:
    true, pred = np.asarray(true), np.asarray(pred)
    return {"acc": cluster_accuracy(true, pred), "nmi": normalized_mutual_info(true, pred),
            "ari": adjusted_rand_index(true, pred)}


def neighbour_agreement(features: torch.Tensor, labels: torch.Tensor, k: int = 10,
                        sample: int = 20000, seed: int = 0) -> float:
    """Chance-corrected agreement of a clustering with the kNN graph of `features`.

    kappa = (a - e) / (1 - e): a is the fraction of (point, neighbour) pairs in one cluster, e the
    same fraction expected from random labels with these cluster sizes (sum_k p_k^2). 1 is perfect
    agreement, 0 chance; collapsing everything into one cluster scores 0, not 1. Computed on a
    uniform sample (kNN within the sample) to stay O(sample^2). Dividing by 1 - e cancels the
    cost of a merge (a merge cuts no neighbour pair, so kappa stays 1): report it, but select
    with rayclust.method.selection.
    """
    n = features.shape[0]
    generator = torch.Generator().manual_seed(seed)
    idx = torch.randperm(n, generator=generator)[: min(sample, n)].to(features.device)
    x, y = features[idx].float(), labels.to(features.device)[idx]
    k = min(k, x.shape[0] - 1)
    if k < 1:
        return 0.0
    neighbours = knn(x, k)
    agree = float((y[neighbours] == y[:, None]).float().mean())
    p = torch.bincount(y).float() / len(y)
    expected = float((p * p).sum())
    return 0.0 if expected >= 1.0 else (agree - expected) / (1.0 - expected)


def size_statistics(labels: np.ndarray, n_clusters: int) -> dict[str, float]:
    counts = np.bincount(np.asarray(labels), minlength=n_clusters)
    entropy = _entropy(counts)
    return {"empty_clusters": int((counts == 0).sum()),
            "largest_cluster_fraction": float(counts.max() / counts.sum()),
            "smallest_cluster_fraction": float(counts.min() / counts.sum()),
            "size_entropy_normalized": float(entropy / np.log(n_clusters)) if n_clusters > 1
            else 1.0}


def label_free_scores(features: torch.Tensor, labels: torch.Tensor, n_clusters: int,
                      confidence: torch.Tensor | None = None, k: int = 10, sample: int = 20000,
                      seed: int = 0) -> dict[str, float]:
    """Scores that need no labels, in the image-embedding space."""
    scores = {"neighbour_agreement": neighbour_agreement(features, labels, k, sample, seed)}
    scores.update(size_statistics(labels.cpu().numpy(), n_clusters))
    if confidence is not None:
        scores["mean_confidence"] = float(confidence.float().mean())
    return scores
