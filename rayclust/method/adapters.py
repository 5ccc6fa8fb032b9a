"""Parameter-efficient fine-tuning of a CLIP vision tower (stage 2 of SEIC, ALGORITHM.md 4.4).

`apply_adapter(visual, kind)` freezes the tower and makes a small part of it trainable:

* ``"lora"``: LoRA on the Q and V slices of every attention block's fused ``in_proj_weight``
  (VLM4Cluster's reading of SEIC). It is a `torch.nn.utils.parametrize` parametrization, so the
  attention module's own forward (and PyTorch's fused attention kernels) keep running unchanged:
  the module just sees ``W + scale * delta`` when it reads ``in_proj_weight``. The up-matrix
  starts at zero, so the adapted tower equals the base tower exactly at init.
* ``"last_blocks"``: the last ``blocks`` transformer blocks plus the final norm and projection.
* ``"full"``: every parameter. ``"none"``: nothing (only the heads train).

Parametrized modules cannot be pickled (PyTorch refuses), so build the adapter on each worker
from the same seed, ship weights with `adapter_state_dict`, and `merge_adapter` for inference.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils import parametrize

from rayclust.method.hyperparameters import ADAPTER_KINDS, LORA_RANK


class QVLoRA(nn.Module):
    """Parametrization W (3d, d) -> W + (alpha/rank) [B_q A_q; 0; B_v A_v] (K slice untouched).

    A (rank, d): Kaiming-uniform with a=sqrt(5), i.e. U(-1/sqrt(d), 1/sqrt(d)) (nn.Linear's and
    PEFT's default), drawn from ``generator``. B (d, rank): zeros. Adapter weights are float32
    whatever the base dtype; the delta is cast to W's dtype.
    """

    def __init__(self, dim: int, rank: int, alpha: float, generator: torch.Generator,
                 device: torch.device | None = None):
        super().__init__()
        self.scale = alpha / rank
        bound = 1.0 / math.sqrt(dim)

        def down() -> nn.Parameter:
            a = torch.empty(rank, dim).uniform_(-bound, bound, generator=generator)
            return nn.Parameter(a.to(device))

        self.lora_a_q, self.lora_a_v = down(), down()
        self.lora_b_q = nn.Parameter(torch.zeros(dim, rank, device=device))
        self.lora_b_v = nn.Parameter(torch.zeros(dim, rank, device=device))

    def delta(self) -> torch.Tensor:
        d = self.lora_b_q.shape[0]
        zeros = self.lora_b_q.new_zeros(d, d)
        return self.scale * torch.cat([self.lora_b_q @ self.lora_a_q, zeros,
                                       self.lora_b_v @ self.lora_a_v])

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.delta().to(weight.dtype)


def _fused_attention_modules(visual: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every module with a fused (3d, d) ``in_proj_weight``: nn.MultiheadAttention with equal
    q/k/v dims and open_clip's own `Attention` (CustomResidualAttentionBlock)."""
    found = []
    for name, module in visual.named_modules():
        if parametrize.is_parametrized(module, "in_proj_weight"):
            found.append((name, module))
            continue
        w = getattr(module, "in_proj_weight", None)
        if isinstance(w, torch.Tensor) and w.ndim == 2 and w.shape[0] == 3 * w.shape[1]:
            found.append((name, module))
    return found


def _blocks_and_head(visual: nn.Module) -> tuple[list[nn.Module], list[nn.Module | nn.Parameter]]:
    """(ordered blocks, final norm/pool/projection parts) of the towers open_clip builds."""
    get = lambda *names: [x for n in names if (x := getattr(visual, n, None)) is not None]  # noqa: E731
    if hasattr(visual, "transformer") and hasattr(visual.transformer, "resblocks"):  # open_clip ViT
        return list(visual.transformer.resblocks), get("attn_pool", "attn_pool_contrastive",
                                                       "ln_post", "proj")
    if hasattr(visual, "layer4"):  # open_clip ModifiedResNet (RN50, ...)
        return [visual.layer1, visual.layer2, visual.layer3, visual.layer4], get("attnpool")
    trunk = getattr(visual, "trunk", None)  # open_clip TimmModel
    if trunk is not None:
        for name in ("blocks", "stages", "layers"):
            if isinstance(getattr(trunk, name, None), nn.Sequential | nn.ModuleList):
                parts = [x for n in ("norm", "fc_norm", "head") if (x := getattr(trunk, n, None)) is not None]
                return list(getattr(trunk, name)), parts + get("head")
    raise ValueError(f"cannot find the transformer blocks of a {type(visual).__name__} tower for "
                     "adapter 'last_blocks'; use 'full' or 'none'")


def apply_adapter(visual: nn.Module, kind: str, rank: int = LORA_RANK, alpha: float | None = None,
                  blocks: int = 2, seed: int = 0) -> list[nn.Parameter]:
    """Freeze ``visual`` and add/unfreeze the adapter ``kind``; returns the trainable parameters.

    LoRA weights are drawn from a CPU generator seeded with ``seed`` in module order, so every
    data-parallel worker builds identical adapters. ``alpha`` defaults to ``rank`` (scale 1).
    """
    if kind not in ADAPTER_KINDS:
        raise ValueError(f"unknown adapter {kind!r}; choose one of {', '.join(ADAPTER_KINDS)}")
    if any(parametrize.is_parametrized(m) for m in visual.modules()):
        raise ValueError("an adapter is already applied to this tower (merge_adapter it first)")
    visual.requires_grad_(kind == "full")
    if kind == "lora":
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        modules = _fused_attention_modules(visual)
        if not modules:
            raise ValueError(f"no attention block with a fused (3d, d) in_proj_weight found in a "
                             f"{type(visual).__name__} tower, so LoRA cannot be applied; use adapter "
                             "'last_blocks' or 'full' instead")
        generator = torch.Generator().manual_seed(seed)
        for _, module in modules:
            w = module.in_proj_weight
            lora = QVLoRA(w.shape[1], rank, float(rank if alpha is None else alpha), generator, w.device)
            parametrize.register_parametrization(module, "in_proj_weight", lora)
    elif kind == "last_blocks":
        if blocks < 0:
            raise ValueError(f"blocks must be >= 0, got {blocks}")
        block_list, head = _blocks_and_head(visual)
        for part in block_list[len(block_list) - min(blocks, len(block_list)):] + head:
            part.requires_grad_(True)
    return [p for p in visual.parameters() if p.requires_grad]


def adapter_state_dict(visual: nn.Module) -> dict[str, torch.Tensor]:
    """Only the trainable tensors (detached CPU clones): a LoRA checkpoint is a few MB."""
    return {n: p.detach().cpu().clone() for n, p in visual.named_parameters() if p.requires_grad}


def load_adapter_state_dict(visual: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy `adapter_state_dict` output back in; strict about the set of names."""
    params = {n: p for n, p in visual.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(params.keys() - state.keys()), sorted(state.keys() - params.keys())
    if missing or unexpected:
        raise ValueError(f"adapter state does not match this tower's adapter: missing {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''} ({len(missing)}), unexpected "
                         f"{unexpected[:5]}{' ...' if len(unexpected) > 5 else ''} ({len(unexpected)}); "
                         "apply the same adapter kind/rank before loading")
    with torch.no_grad():
        for name, p in params.items():
            if state[name].shape != p.shape:
                raise ValueError(f"adapter tensor {name!r} has shape {tuple(state[name].shape)}, "
                                 f"expected {tuple(p.shape)}")
            p.copy_(state[name])


def merge_adapter(visual: nn.Module) -> nn.Module:
    """Bake LoRA into plain ``in_proj_weight`` parameters (same outputs, no per-forward delta,
    picklable again). A no-op for the other kinds. Returns ``visual``."""
    for _, module in _fused_attention_modules(visual):
        if parametrize.is_parametrized(module, "in_proj_weight"):
            parametrize.remove_parametrizations(module, "in_proj_weight", leave_parametrized=True)
    return visual


def count_parameters(visual: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, adapter weights included."""
    params = list(visual.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
