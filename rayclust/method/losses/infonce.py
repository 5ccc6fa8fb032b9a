"""Symmetric InfoNCE between paired rows, cross-modal negatives only (SEIC, ALGORITHM.md 4.3).

NCE_T(X, Y): rows L2-normalised, logits = X Y^T / T, targets the diagonal, the mean of the row-wise
and column-wise cross-entropies. Used at instance level (Z^v, Z^t with a learnable temperature),
assignment level ((P^v)^T, (P^t)^T: cluster columns) and centre level (C^v, C^t).
"""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F


def info_nce(x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """x, y (n, d) paired rows; scale = 1/T (a tensor when learnable) -> scalar."""
    logits = F.normalize(x, dim=1) @ F.normalize(y, dim=1).T * scale
    targets = torch.arange(x.shape[0], device=x.device)
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))


class SymmetricInfoNCE(nn.Module):
    """x, y (n, d) -> scalar, with a fixed temperature. Example::

        loss = SymmetricInfoNCE(0.5)(p_v.T, p_t.T)   # assignment level: contrast cluster columns
    """

    def __init__(self, temperature: float):
        super().__init__()
        self.temperature = temperature

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return info_nce(x, y, 1.0 / self.temperature)
