"""Stage 2 of SEIC: self-enhanced fine-tuning of the vision tower (ALGORITHM.md 4.4).

The stage-1 heads become a classifier on top of the (adapted, see `adapters`) CLIP vision tower:
logits = heads.image(normalize(visual(x))). Each step trains it with the weighted cross-entropy
of its strong-view logits against pseudo-labels from the weak view (a global `PseudoLabelTable`,
or per batch with `SelfEnhanceStep.online`). Only the adapter and the image branch train; the
text branch is frozen so a DDP wrapper finds no unused trainable parameters.
"""

from __future__ import annotations

import contextlib
from typing import Sequence

import torch
from torch import nn
import torch.nn.functional as F

from rayclust.method.augment import StrongAugment, weak_view
from rayclust.method.pseudo_labels import ConfidenceEMA, weighted_cross_entropy


class SelfEnhancedModel(nn.Module):
    """Normalised images (B, 3, H, W) -> cluster logits (B, K), float32.

    ``heads`` is a stage-1 heads module (SEICHeads, TACHeads) whose one-argument call gives image
    logits; features are L2-normalised in float32 first, exactly as stage 1 saw them. Under an
    autocast region only the tower runs in reduced precision: the heads run in float32 as in
    stage 1 (bf16 heads quantise the logits, so table confidences collapse onto a few values and
    argmaxes flip against stage 1's), and they are a negligible share of the compute.
    """

    def __init__(self, visual: nn.Module, heads: nn.Module, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.visual, self.heads = visual, heads
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = F.normalize(self.visual(x).float(), dim=-1)
        with torch.autocast(device_type=features.device.type, enabled=False):
            return self.heads(features)


def freeze_text_branch(heads: nn.Module) -> nn.Module:
    """Make only ``heads.image`` trainable (the text branch and SEIC's instance temperature are
    unused in stage 2). Returns ``heads``."""
    for name, p in heads.named_parameters():
        p.requires_grad_(name.startswith("image."))
    return heads


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def make_optimizer(params, lr: float = 5e-5, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """AdamW over the trainable ``params`` (VLM4Cluster: lr 5e-5, no weight decay), fused on CUDA."""
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters: apply an adapter or unfreeze the image head")
    fused = all(p.is_cuda for p in params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None)


def compile_tower(visual: nn.Module, backend: str = "inductor") -> nn.Module:
    """torch.compile ``visual``'s forward in place; returns ``visual``.

    Compiling the bound forward rather than the module keeps parameter names (and so the adapter
    state dict, checkpoints and DDP's view of the parameters) as they are; a compiled module
    would prefix every key with ``_orig_mod.``. ``backend``: torch.compile's; the CPU tests use
    "aot_eager" (the same graph capture and autograd split without code generation, which costs
    about 30 s of CPU for a tiny tower).
    """
    visual.forward = torch.compile(visual.forward, backend=backend)
    return visual


def _autocast(device: torch.device, enabled: bool):
    if not enabled or device.type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda", dtype=torch.bfloat16)


def _core(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)  # through a DDP wrapper


def _model_device(model: nn.Module) -> torch.device:
    return next(_core(model).parameters()).device


@torch.no_grad()
def _predict(model: nn.Module, x: torch.Tensor, autocast: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode argmax and max-probability on the model's device; restores the train flag."""
    was_training = model.training
    model.eval()
    try:
        with _autocast(x.device, autocast):
            logits = model(x)
    finally:
        model.train(was_training)
    confidence, labels = logits.float().softmax(dim=-1).max(dim=-1)
    return labels, confidence


def predict_uint8(model: nn.Module, uint8, mean: Sequence[float] | None = None,
                  std: Sequence[float] | None = None, autocast: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Weak views of uint8 (B, H, W, 3) -> (labels int64, confidence float32), both on CPU.

    mean/std default to the model's own; ``autocast`` means bf16 and applies on CUDA only.
    """
    core = _core(model)
    mean = core.mean if mean is None else mean
    std = core.std if std is None else std
    x = weak_view(torch.as_tensor(uint8).to(_model_device(model), non_blocking=True), mean, std)
    labels, confidence = _predict(model, x, autocast)
    return labels.cpu(), confidence.cpu()


class SelfEnhanceStep:
    """One optimisation step of stage 2 on a uint8 batch. Example::

        step = SelfEnhanceStep(model, make_optimizer(trainable_parameters(model)), mean, std, "cuda")
        labels, weights = table.labels[idx], table.weight[idx]      # or: step.online(images, ema)
        parts = step(images, labels, weights, generator)             # {'loss': tensor, ...}

    ``model`` may be DDP-wrapped. With ``gather_distributed`` the online confidence statistics
    are all-reduced over workers (identity when not distributed).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, mean: Sequence[float],
                 std: Sequence[float], device: torch.device | str, augment: StrongAugment | None = None,
                 autocast: bool | None = None, gather_distributed: bool = True):
        self.model, self.optimizer = model, optimizer
        self.mean, self.std = tuple(mean), tuple(std)
        self.device = torch.device(device)
        self.augment = augment if augment is not None else StrongAugment(mean, std)
        self.autocast = (self.device.type == "cuda") if autocast is None else (autocast and self.device.type == "cuda")
        self.gather_distributed = gather_distributed

    def _images(self, uint8) -> torch.Tensor:
        return torch.as_tensor(uint8).to(self.device, non_blocking=True)

    def __call__(self, uint8_batch, labels: torch.Tensor, weights: torch.Tensor,
                 generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Strong view -> logits -> weighted CE -> backward -> optimizer step. Returns detached
        device tensors (no host sync): loss, mean_weight, agreement (strong argmax == label)."""
        labels = labels.to(self.device, torch.int64, non_blocking=True)
        weights = weights.to(self.device, torch.float32, non_blocking=True)
        x = self.augment(self._images(uint8_batch), generator)
        self.model.train()
        with _autocast(self.device, self.autocast):
            logits = self.model(x)
        loss = weighted_cross_entropy(logits, labels, weights)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        agreement = (logits.detach().argmax(dim=-1) == labels).float().mean()
        return {"loss": loss.detach(), "mean_weight": weights.mean(), "agreement": agreement}

    def online(self, uint8_batch, ema: ConfidenceEMA) -> tuple[torch.Tensor, torch.Tensor]:
        """Refresh period 0: pseudo-labels and SoftMatch weights of this batch from the current
        model's weak view (no grad); updates ``ema`` first, as SoftMatch does."""
        x = weak_view(self._images(uint8_batch), self.mean, self.std)
        labels, confidence = _predict(self.model, x, self.autocast)
        ema.update(confidence, gather_distributed=self.gather_distributed)
        return labels, ema.weights(confidence)
