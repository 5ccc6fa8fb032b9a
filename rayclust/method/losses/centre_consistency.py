"""SEIC's centre-level consistency with confidence-weighted centres (ALGORITHM.md 4.3).

Per batch, centre k of a modality is c_k = sum_i 1[argmax p_i = k] p_ik z_i: the hard members of
k weighted by their confidence (the "higher-quality centre" generator). Clusters present in both
modalities are kept, and their image and text centres are contrasted with a symmetric InfoNCE;
the loss is 0 when fewer than two clusters are valid.
"""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from rayclust.method.distributed import gather_rows


def confidence_weighted_centres(z: torch.Tensor, probs: torch.Tensor
                                ) -> tuple[torch.Tensor, torch.Tensor]:
    """z (B, d), probs (B, K) -> (centres (K, d), present (K,) bool)."""
    k = probs.shape[1]
    conf, hard = probs.max(dim=1)
    weights = torch.zeros(z.shape[0], k, device=z.device, dtype=z.dtype)
    weights = weights.scatter(1, hard[:, None], conf[:, None])
    # counts by scatter, not bincount: bincount syncs with the host on CUDA (no graph capture)
    present = torch.zeros(k, device=z.device, dtype=conf.dtype).index_add_(
        0, hard, torch.ones_like(conf)) > 0
    return weights.T @ z, present


class CentreConsistencyLoss(nn.Module):
    """z_image, p_image, z_text, p_text (B, d)/(B, K) -> scalar. Example::

        loss = CentreConsistencyLoss(0.5)(z_v, p_v, z_t, p_t)
    """

    def __init__(self, temperature: float = 0.5, gather_distributed: bool = False):
        super().__init__()
        self.temperature = temperature
        self.gather_distributed = gather_distributed

    def forward(self, z_image: torch.Tensor, p_image: torch.Tensor, z_text: torch.Tensor,
                p_text: torch.Tensor) -> torch.Tensor:
        if self.gather_distributed:
            z_image, p_image = gather_rows(z_image), gather_rows(p_image)
            z_text, p_text = gather_rows(z_text), gather_rows(p_text)
        c_image, present_image = confidence_weighted_centres(z_image, p_image)
        c_text, present_text = confidence_weighted_centres(z_text, p_text)
        valid = present_image & present_text
        return masked_info_nce(c_image, c_text, valid, 1.0 / self.temperature)


def masked_info_nce(x: torch.Tensor, y: torch.Tensor, valid: torch.Tensor, scale: float
                    ) -> torch.Tensor:
    """info_nce(x[valid], y[valid]) computed on all K rows with masks, so it needs no host sync
    (no boolean indexing, no `.item()`) and keeps a fixed shape; 0 when fewer than 2 are valid."""
    logits = F.normalize(x, dim=1) @ F.normalize(y, dim=1).T * scale
    pair = valid[:, None] & valid[None, :]
    # invalid pairs get a large finite negative (not -inf, which would make NaN gradients)
    logits = torch.where(pair, logits, torch.full_like(logits, -1e9))
    eye = torch.eye(len(valid), dtype=torch.bool, device=x.device)
    logits = torch.where(eye & ~pair, torch.zeros_like(logits), logits)  # finite invalid rows
    rows = -torch.diagonal(torch.log_softmax(logits, dim=1))
    cols = -torch.diagonal(torch.log_softmax(logits, dim=0))
    weight = valid.to(logits.dtype)
    count = weight.sum()
    loss = 0.5 * ((rows * weight).sum() + (cols * weight).sum()) / count.clamp_min(1.0)
    return loss * (count >= 2).to(logits.dtype)
