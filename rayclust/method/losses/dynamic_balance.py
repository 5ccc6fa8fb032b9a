"""SEIC's dynamic balancing regulariser (ALGORITHM.md 4.3, VLM4Cluster's reading).

A history h (K,) is an EMA (momentum m) of the image head's hard-assignment histogram per batch,
starting uniform. With h floored at `floor` and renormalised, the weights are
w_k = min((1/K) / h_k, max_weight), rescaled to mean 1, and

    L_bal = -(H_w(mean p^v) + H_w(mean p^t)),   H_w(p) = -sum_k w_k p_k log p_k

so clusters that have been under-used get a larger entropy weight. The history is a buffer (it is
saved in checkpoints) and is updated after the loss is computed, from the global batch under DDP.
"""

from __future__ import annotations

import torch
from torch import nn

from rayclust.method.distributed import all_reduce_sum, gather_rows
from rayclust.method.losses.marginal_entropy import marginal_entropy


class DynamicBalanceRegulariser(nn.Module):
    """p_image, p_text (B, K) -> scalar; updates the usage history when training. Example::

        balance = DynamicBalanceRegulariser(n_clusters=10)
        loss = balance(p_v, p_t)      # negative weighted entropies
    """

    history: torch.Tensor

    def __init__(self, n_clusters: int, momentum: float = 0.9, floor: float = 0.01,
                 max_weight: float = 5.0, gather_distributed: bool = False):
        super().__init__()
        self.n_clusters = n_clusters
        self.momentum = momentum
        self.floor = floor
        self.max_weight = max_weight
        self.gather_distributed = gather_distributed
        self.register_buffer("history", torch.full((n_clusters,), 1.0 / n_clusters))

    def weights(self) -> torch.Tensor:
        h = self.history.clamp_min(self.floor)
        h = h / h.sum()
        w = ((1.0 / self.n_clusters) / h).clamp(max=self.max_weight)
        return w / w.mean()

    def forward(self, p_image: torch.Tensor, p_text: torch.Tensor) -> torch.Tensor:
        if self.gather_distributed:
            p_image, p_text = gather_rows(p_image), gather_rows(p_text)
        w = self.weights()
        loss = -(marginal_entropy(p_image, w) + marginal_entropy(p_text, w))
        if self.training:
            with torch.no_grad():
                hard = p_image.argmax(dim=1)  # counted by scatter: bincount syncs on CUDA
                counts = torch.zeros(self.n_clusters, device=hard.device).index_add_(
                    0, hard, torch.ones_like(hard, dtype=torch.float32))
                if not self.gather_distributed:  # gathered rows already hold every rank's batch
                    counts = all_reduce_sum(counts)
                histogram = counts / counts.sum()
                self.history.mul_(self.momentum).add_((1 - self.momentum) * histogram)
        return loss
