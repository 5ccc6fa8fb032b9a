"""Entropy of the batch-mean assignment, H(mean_i p_i) (TAC 3.8c, SEIC 4.3 with weights)."""

from __future__ import annotations

import torch


def marginal_entropy(probs: torch.Tensor, weights: torch.Tensor | None = None,
                     eps: float = 1e-9) -> torch.Tensor:
    """probs (B, K) rows on the simplex; weights (K,) or None -> scalar H_w(mean p).

    H_w(p) = -sum_k w_k p_k log p_k, with p clamped at eps before the log (TAC's code).
    Example::

        h = marginal_entropy(torch.softmax(logits, -1))   # log(K) when perfectly balanced
    """
    mean = probs.mean(dim=0)
    terms = mean * torch.log(mean.clamp_min(eps))
    if weights is not None:
        terms = terms * weights
    return -terms.sum()
