"""Batch statistics across data-parallel workers (plain torch.distributed, no Ray).

Losses built from whole-batch statistics (cluster-column contrast, centre generation, the
balancing regulariser) take `gather_distributed`: under DDP each worker's batch is a slice of the
global batch, and with the flag the loss sees the global batch. Gradients flow back to the local
slice through `torch.distributed.nn.functional.all_gather`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the gradient contiguous.

    The backward of `torch.distributed.nn.functional.all_gather` receives into
    `empty_like(grad)`; on gloo a transposed incoming gradient (a loss that uses `x.T`, such as
    the cluster-column contrast) keeps its strides there and comes back scrambled (torch 2.15,
    found by tests/method/test_distributed_losses.py)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Concatenate x (B, ...) from every rank along dim 0, differentiably; identity when alone."""
    if not is_distributed():
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat([_ContiguousGrad.apply(part) for part in all_gather(x)], dim=0)


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of a (non-differentiable) tensor over ranks; identity when alone."""
    if not is_distributed():
        return x
    x = x.clone()
    dist.all_reduce(x)
    return x
