"""Cluster heads on frozen CLIP features.

`TACHead`: Linear(d,d)-BN-ReLU-Linear(d,K) (ALGORITHM.md 3.5); TAC trains two separate,
identical ones (image, text). `SEICBranch`: Linear(d,d) then L2 normalisation (the instance
embedding z) then Linear(d,K) (4.2); `SEICHeads` holds one branch per modality and the learnable
instance temperature. Heads return logits; probabilities are a softmax over clusters.
"""

from __future__ import annotations

import math

import torch
from torch import nn
import torch.nn.functional as F


def _trunc_normal_init(module: nn.Module, zero_bias: bool) -> None:
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            nn.init.trunc_normal_(layer.weight, std=0.02)
            if zero_bias and layer.bias is not None:
                nn.init.zeros_(layer.bias)


class TACHead(nn.Module):
    """x (B, d) -> logits (B, K). TAC's head (its softmax output is `logits.softmax(-1)`)."""

    def __init__(self, dim: int, n_clusters: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, dim), nn.BatchNorm1d(dim), nn.ReLU(),
                                 nn.Linear(dim, n_clusters))
        _trunc_normal_init(self, zero_bias=False)  # TAC keeps PyTorch's default biases

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TACHeads(nn.Module):
    """The image head h^v and the text head h^t of TAC."""

    def __init__(self, dim: int, n_clusters: int):
        super().__init__()
        self.image = TACHead(dim, n_clusters)
        self.text = TACHead(dim, n_clusters)

    def forward(self, image: torch.Tensor, text: torch.Tensor | None = None,
                text_neighbours: torch.Tensor | None = None,
                image_neighbours: torch.Tensor | None = None):
        """Inference: image (B, d) -> logits. Training: four inputs -> four logits, each its own
        call so batch-norm statistics come from each set separately (TAC's code), inside one
        forward so a DDP wrapper sees a single forward per backward."""
        if text is None:
            return self.image(image)
        return (self.image(image), self.text(text), self.text(text_neighbours),
                self.image(image_neighbours))

    def image_classifier(self) -> nn.Module:
        """Image features -> logits: the image head (what stage 2 fine-tunes)."""
        return self.image


class SEICBranch(nn.Module):
    """x (B, d) -> (z (B, d) unit rows, logits (B, K))."""

    def __init__(self, dim: int, n_clusters: int):
        super().__init__()
        self.projection = nn.Linear(dim, dim)
        self.cluster = nn.Linear(dim, n_clusters)
        _trunc_normal_init(self, zero_bias=True)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = F.normalize(self.projection(x), dim=-1)
        return z, self.cluster(z)


class _BranchLogits(nn.Module):
    """A SEICBranch seen as a classifier: x -> logits (its z is not needed)."""

    def __init__(self, branch: SEICBranch):
        super().__init__()
        self.branch = branch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.branch(x)[1]


class SEICHeads(nn.Module):
    """Image and text branches plus one learnable logit scale log(1/T), exp clamped at 100."""

    def __init__(self, dim: int, n_clusters: int, instance_temperature: float = 0.07):
        super().__init__()
        self.image = SEICBranch(dim, n_clusters)
        self.text = SEICBranch(dim, n_clusters)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / instance_temperature)))

    def scale(self) -> torch.Tensor:
        return self.logit_scale.exp().clamp(max=100.0)

    def forward(self, image: torch.Tensor, text: torch.Tensor | None = None):
        """Inference: image (B, d) -> logits. Training: (z_v, logits_v, z_t, logits_t, scale)."""
        if text is None:
            return self.image(image)[1]
        z_v, logits_v = self.image(image)
        z_t, logits_t = self.text(text)
        return z_v, logits_v, z_t, logits_t, self.scale()

    def image_classifier(self) -> nn.Module:
        """Image features -> logits through the image branch (what stage 2 fine-tunes)."""
        return _BranchLogits(self.image)
