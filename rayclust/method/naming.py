"""Cluster names: each cluster's most typical nouns.

A noun is typical of cluster k when it is close to the cluster's mean image embedding *and* closer
to it than to the other clusters: score_kj = cos(c_k, e_j) - mean_k' cos(c_k', e_j). Ranking by the
distinctive part avoids naming every cluster after the same generic noun ("photo", "thing").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cluster_centres(features: torch.Tensor, labels: torch.Tensor, n_clusters: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised mean feature per cluster (K, d) and the cluster sizes (K,)."""
    sums = torch.zeros(n_clusters, features.shape[1], device=features.device,
                       dtype=torch.float32).index_add_(0, labels.to(features.device),
                                                       features.float())
    sizes = torch.bincount(labels.to(features.device), minlength=n_clusters)
    return F.normalize(sums, dim=1), sizes


def typical_nouns(features: torch.Tensor, labels: torch.Tensor, n_clusters: int,
                  noun_embeddings: torch.Tensor, nouns: list[str], top: int = 5
                  ) -> list[list[str]]:
    """For each cluster its `top` most typical nouns, best first (empty for empty clusters)."""
    centres, sizes = cluster_centres(features, labels, n_clusters)
    nouns_emb = noun_embeddings.to(centres.device).float()
    names: list[list[str]] = []
    present = sizes > 0
    chunk = 8192
    best_scores = torch.full((n_clusters, 0), float("-inf"), device=centres.device)
    best_index = torch.zeros((n_clusters, 0), dtype=torch.long, device=centres.device)
    for start in range(0, nouns_emb.shape[0], chunk):
        sims = centres @ nouns_emb[start:start + chunk].T  # (K, c)
        mean_other = sims[present].mean(dim=0, keepdim=True) if present.any() else 0
        scores = torch.cat([best_scores, sims - mean_other], dim=1)
        index = torch.cat([best_index, torch.arange(start, start + sims.shape[1],
                                                    device=centres.device).expand_as(sims)], 1)
        keep = scores.topk(min(top, scores.shape[1]), dim=1).indices
        best_scores, best_index = scores.gather(1, keep), index.gather(1, keep)
    for k in range(n_clusters):
        names.append([nouns[j] for j in best_index[k].tolist()] if present[k] else [])
    return names


def unique_names(top_nouns: list[list[str]], sizes: list[int]) -> list[str]:
    """One name per cluster: its most typical noun not already taken by a larger cluster."""
    names = [""] * len(top_nouns)
    taken: set[str] = set()
    for k in sorted(range(len(top_nouns)), key=lambda k: -sizes[k]):
        candidates = top_nouns[k]
        if not candidates:
            continue
        name = next((c for c in candidates if c not in taken), None)
        if name is None:
            base, i = candidates[0], 2
            while f"{base} ({i})" in taken:
                i += 1
            name = f"{base} ({i})"
        names[k] = name
        taken.add(name)
    return names
