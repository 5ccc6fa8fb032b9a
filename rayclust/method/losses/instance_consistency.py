"""TAC's instance-level cross-modal consistency (ALGORITHM.md 3.8b).

L_con = -(1/B) sum_i log(p^t_i . p^v_i), computed like TAC's code as binary cross-entropy of the
dot product against 1, so the log is clamped at -100 exactly as in PyTorch's BCE.
"""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F


class InstanceConsistencyLoss(nn.Module):
    """p_image, p_text (B, K) probabilities -> scalar.

    Example::

        loss = InstanceConsistencyLoss()(p_v, p_t)
    """

    def forward(self, p_image: torch.Tensor, p_text: torch.Tensor) -> torch.Tensor:
        agreement = (p_image * p_text).sum(dim=1).clamp(0.0, 1.0)
        # BCE against 1 (TAC's formula): its log is clamped at -100 *with a finite gradient*,
        # where -log(x).clamp(...) would give 0 * inf = NaN when the agreement underflows to 0.
        return F.binary_cross_entropy(agreement, torch.ones_like(agreement))
