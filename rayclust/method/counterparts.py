"""Noun selection and text counterparts: TAC (ALGORITHM.md 3.2-3.3) and SEIC (4.1).

A text counterpart s_i is a softmax-weighted mixture of selected noun embeddings, retrieved by the
image embedding u_i. TAC selects nouns "in reverse" (each noun votes for its nearest of M
semantic centres, centres keep their top-5 voters) and mixes over all selected nouns; SEIC takes
the top-k1 nouns of each of K centres as candidates and mixes each image's top-k2 candidates.
All inputs are L2-normalised float tensors on one device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rayclust.method.kmeans import spherical_kmeans


def default_semantic_centres(n_images: int, n_clusters: int, n_nouns: int,
                             nouns_per_centre: int = 5) -> int:
    """TAC's M: max(round(N/300), 3K), capped so every centre can win nouns (ALGORITHM.md 3.2)."""
    m = max(round(n_images / 300), 3 * n_clusters)
    m = min(m, max(2, n_nouns // nouns_per_centre), n_images)
    return max(m, 2)


def class_mean_centres(u: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """Renormalised mean of the points of each label (TAC uses these, not the k-means centroids)."""
    sums = torch.zeros(k, u.shape[1], device=u.device, dtype=u.dtype).index_add_(0, labels, u)
    return F.normalize(sums, dim=1)


def tac_select_nouns(centres: torch.Tensor, nouns: torch.Tensor, per_centre: int = 5,
                     chunk_size: int = 65536) -> torch.Tensor:
    """TAC's reverse classification of nouns into semantic centres.

    centres (M, d), nouns (Nw, d). Each noun j goes to argmax_m softmax_m(mu_m . e_j) (no
    temperature) with that probability as its confidence; each centre keeps its `per_centre` most
    confident nouns. Returns the sorted indices of the selected nouns (<= per_centre * M).
    """
    m = centres.shape[0]
    owner = torch.empty(nouns.shape[0], dtype=torch.long, device=nouns.device)
    conf = torch.empty(nouns.shape[0], dtype=nouns.dtype, device=nouns.device)
    for start in range(0, nouns.shape[0], chunk_size):
        probs = torch.softmax(nouns[start:start + chunk_size] @ centres.T, dim=1)
        conf[start:start + chunk_size], owner[start:start + chunk_size] = probs.max(dim=1)
    # Rank nouns by (owner, -confidence) with one sort, then keep the first per_centre per owner.
    order = torch.argsort(conf, descending=True, stable=True)
    order = order[torch.argsort(owner[order], stable=True)]
    owners_sorted = owner[order]
    counts = torch.bincount(owners_sorted, minlength=m)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(len(order), device=nouns.device) - starts[owners_sorted]
    return torch.sort(order[rank < per_centre]).values


def retrieve_counterparts(u: torch.Tensor, nouns: torch.Tensor, temperature: float,
                          top_k: int | None = None, chunk_size: int = 8192) -> torch.Tensor:
    """s_i = normalize(sum_j softmax_j(u_i . e_j / tau) e_j) over all nouns or the top_k per image.

    u (N, d), nouns (S, d) -> (N, d) unit rows. top_k=None is TAC (softmax over every selected
    noun); an integer is SEIC (softmax over the image's top_k nouns).
    """
    out = torch.empty(u.shape[0], nouns.shape[1], device=u.device, dtype=u.dtype)
    for start in range(0, u.shape[0], chunk_size):
        sims = u[start:start + chunk_size] @ nouns.T
        if top_k is not None and top_k < nouns.shape[0]:
            vals, idx = sims.topk(top_k, dim=1)
            weights = torch.softmax(vals / temperature, dim=1)
            mix = torch.einsum("bk,bkd->bd", weights, nouns[idx])
        else:
            mix = torch.softmax(sims / temperature, dim=1) @ nouns
        out[start:start + chunk_size] = F.normalize(mix, dim=1)
    return out


def tac_counterparts(u: torch.Tensor, nouns: torch.Tensor, n_clusters: int,
                     semantic_centres: int | None = None, per_centre: int = 5,
                     temperature: float = 0.005, seed: int = 0, kmeans_kwargs: dict | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """TAC's text space and counterparts. Returns (counterparts (N, d), selected noun indices)."""
    m = semantic_centres or default_semantic_centres(u.shape[0], n_clusters, nouns.shape[0],
                                                     per_centre)
    fit = spherical_kmeans(u, m, seed=seed, **(kmeans_kwargs or {}))
    centres = class_mean_centres(u, fit.labels, m)
    selected = tac_select_nouns(centres, nouns, per_centre)
    return retrieve_counterparts(u, nouns[selected], temperature), selected


def seic_candidate_nouns(centroids: torch.Tensor, nouns: torch.Tensor, per_centre: int = 200
                         ) -> torch.Tensor:
    """Union over the K centroids of their top-k1 nouns by cosine; sorted unique indices."""
    k1 = min(per_centre, nouns.shape[0])
    return torch.unique((centroids @ nouns.T).topk(k1, dim=1).indices.flatten())


def seic_counterparts(u: torch.Tensor, nouns: torch.Tensor, centroids: torch.Tensor,
                      per_centre: int = 200, per_image: int = 50, temperature: float = 0.01
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """SEIC's counterparts from k-means centroids. Returns (counterparts, candidate indices)."""
    candidates = seic_candidate_nouns(centroids, nouns, per_centre)
    top_k = min(per_image, len(candidates))
    return retrieve_counterparts(u, nouns[candidates], temperature, top_k=top_k), candidates
