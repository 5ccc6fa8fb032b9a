"""Spherical k-means with k-means++ seeding (ALGORITHM.md 3.2, 4.1).

Points and centroids live on the unit sphere; similarity is the inner product. Like faiss, the fit
runs on a uniform subsample of at most `max_points_per_centroid * k` points when N is large, and
every point is then assigned to its nearest centroid. Assignment runs in row chunks so memory stays
O(chunk * k).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class KMeansResult:
    centroids: torch.Tensor  # (k, d), unit norm
    labels: torch.Tensor     # (N,) int64, nearest centroid of every point
    inertia: float           # sum over points of (1 - cos(point, its centroid))


def assign(x: torch.Tensor, centroids: torch.Tensor, chunk_size: int = 65536
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid by inner product. x (N, d), centroids (k, d) -> labels (N,), sims (N,)."""
    labels = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    sims = torch.empty(x.shape[0], dtype=x.dtype, device=x.device)
    for start in range(0, x.shape[0], chunk_size):
        block = x[start:start + chunk_size] @ centroids.T
        sims[start:start + chunk_size], labels[start:start + chunk_size] = block.max(dim=1)
    return labels, sims


def kmeans_plus_plus(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding with distance 1 - cos. x (n, d) unit rows -> (k, d) seeds."""
    n = x.shape[0]
    first = torch.randint(n, (1,), generator=generator, device="cpu").item()
    centres = [x[first]]
    dist = (1.0 - x @ x[first]).clamp_min(0)
    for _ in range(1, k):
        total = dist.sum()
        if total <= 0:  # fewer distinct points than k: pick uniformly among the rest
            idx = torch.randint(n, (1,), generator=generator, device="cpu").item()
        else:
            probs = (dist / total).double().cpu()
            idx = torch.multinomial(probs, 1, generator=generator).item()
        centres.append(x[idx])
        dist = torch.minimum(dist, (1.0 - x @ x[idx]).clamp_min(0))
    return torch.stack(centres)


def spherical_kmeans(x: torch.Tensor, k: int, iterations: int = 100, restarts: int = 3,
                     max_points_per_centroid: int = 256, seed: int = 0,
                     tolerance: float = 1e-6) -> KMeansResult:
    """Fit spherical k-means on unit-norm rows of x (N, d); returns centroids and all labels.

    Empty clusters are re-seeded from the points farthest from their centroid, so exactly k
    non-degenerate centroids come back whenever N >= k.
    """
    if x.ndim != 2:
        raise ValueError(f"expected a (N, d) matrix, got shape {tuple(x.shape)}")
    n = x.shape[0]
    if n < k:
        raise ValueError(f"cannot form {k} clusters from {n} points")
    x = F.normalize(x.float(), dim=1)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    fit = x
    if n > max_points_per_centroid * k:
        sample = torch.randperm(n, generator=generator)[: max_points_per_centroid * k]
        fit = x[sample.to(x.device)]

    best: tuple[float, torch.Tensor] | None = None
    for _ in range(restarts):
        centroids = kmeans_plus_plus(fit, k, generator)
        previous = None
        for _ in range(iterations):
            labels, sims = assign(fit, centroids)
            sums = torch.zeros_like(centroids).index_add_(0, labels, fit)
            counts = torch.bincount(labels, minlength=k)
            empty = (counts == 0).nonzero().flatten()
            if len(empty):
                far = torch.argsort(sims)[: len(empty)]
                sums[empty] = fit[far]
            centroids = F.normalize(sums, dim=1)
            objective = float(sims.sum())
            if previous is not None and abs(objective - previous) <= tolerance * abs(previous):
                break
            previous = objective
        _, sims = assign(fit, centroids)
        inertia = float((1.0 - sims).sum())
        if best is None or inertia < best[0]:
            best = (inertia, centroids)

    centroids = best[1]
    labels, sims = assign(x, centroids)
    return KMeansResult(centroids=centroids, labels=labels, inertia=float((1.0 - sims).sum()))
