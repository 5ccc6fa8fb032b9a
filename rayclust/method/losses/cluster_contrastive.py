"""Cluster-level contrastive loss L_cc of TAC / Contrastive Clustering (ALGORITHM.md 3.8a).

Columns a_k = A[:, k] and b_k = B[:, k] (B-dim vectors over the batch) are L2-normalised; each of
the 2K column vectors has its partner (same k, other matrix) as positive and every other of the
2K vectors, intra- and cross-modal, as negatives:

    l(v) = -log exp(v.v+/T) / sum_{v' != v} exp(v.v'/T),    L_cc = (1/2K) sum_v l(v)
"""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from rayclust.method.distributed import gather_rows


class ClusterContrastiveLoss(nn.Module):
    """a, b (B, K) assignment probabilities -> scalar.

    With gather_distributed the columns span the global batch across DDP workers.
    Example::

        loss = ClusterContrastiveLoss(temperature=0.5)(p_v, q_t)
    """

    def __init__(self, temperature: float = 0.5, gather_distributed: bool = False):
        super().__init__()
        self.temperature = temperature
        self.gather_distributed = gather_distributed

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self.gather_distributed:
            a, b = gather_rows(a), gather_rows(b)
        k = a.shape[1]
        columns = F.normalize(torch.cat([a.T, b.T], dim=0), dim=1)  # (2K, B)
        sims = columns @ columns.T / self.temperature
        sims = sims.masked_fill(torch.eye(2 * k, dtype=torch.bool, device=a.device),
                                float("-inf"))
        targets = torch.arange(2 * k, device=a.device).roll(k)  # partner of column i is i +- K
        return F.cross_entropy(sims, targets)
