"""Stage-1 training loop shared by every method (ALGORITHM.md 3.7, 10).

Features, counterparts and neighbour tables stay on the device as tensors; a batch is a slice of a
device-side permutation and neighbours are drawn with tensor indexing (one `randint` per epoch for
all anchors), never through a per-sample `__getitem__`. That is the gap PERFORMANCE.md measures
between TAC's "one minute" and the compute floor.

Data parallelism: `batch_size` is the global batch. With `world_size > 1` every rank draws the
same global permutation (same seed), cuts the same global batches and trains its own slice of
each, so the run takes the same optimiser steps as one process, whatever the worker count. The
model may be wrapped in DDP by the caller; losses gather batch statistics themselves.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
from torch import nn


@dataclass
class Stage1Inputs:
    """The global pieces of stage 1, computed once (and cached by the pipeline).

    image (N, d) and text (N, d) unit rows; neighbour tables (N, k) int64 of global row indices
    or None when the method needs none.
    """

    image: torch.Tensor
    text: torch.Tensor
    image_neighbours: torch.Tensor | None = None
    text_neighbours: torch.Tensor | None = None

    def to(self, device: torch.device) -> "Stage1Inputs":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Stage1Inputs(move(self.image), move(self.text), move(self.image_neighbours),
                            move(self.text_neighbours))

    @property
    def n(self) -> int:
        return self.image.shape[0]


class Objective(Protocol):
    """What a method contributes to the loop."""

    epochs: int
    batch_size: int
    drop_last: bool

    def build(self, dim: int) -> tuple[nn.Module, nn.Module]: ...           # (model, criterion)
    def optimizer(self, params) -> torch.optim.Optimizer: ...
    def epoch_views(self, inputs: Stage1Inputs, generator: torch.Generator) -> dict: ...
    def loss(self, model: nn.Module, criterion: nn.Module, inputs: Stage1Inputs,
             idx: torch.Tensor, views: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...


@dataclass
class EpochLog:
    epoch: int
    loss: float
    parts: dict[str, float]
    seconds: float
    steps: int


@dataclass
class TrainState:
    model: nn.Module
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    epoch: int = 0  # epochs completed
    history: list[EpochLog] = field(default_factory=list)

    @property
    def module(self) -> nn.Module:
        """The model without a DistributedDataParallel wrapper (what checkpoints hold)."""
        return getattr(self.model, "module", self.model)

    def state_dict(self) -> dict:
        return {"model": self.module.state_dict(), "criterion": self.criterion.state_dict(),
                "optimizer": self.optimizer.state_dict(), "epoch": self.epoch,
                "history": [vars(h) for h in self.history]}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["model"])
        self.criterion.load_state_dict(state["criterion"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.epoch = state["epoch"]
        self.history = [EpochLog(**h) for h in state["history"]]


def adam(params, **kwargs) -> torch.optim.Optimizer:
    """Adam, fused into one kernel per step when every parameter is on CUDA (the head steps are
    launch-bound there)."""
    params = list(params)
    fused = bool(params) and all(p.is_cuda for p in params)
    # capturable: the step may be recorded in a CUDA graph (Stage1Trainer on CUDA)
    return torch.optim.Adam(params, fused=fused or None, capturable=fused, **kwargs)


def batches(n: int, batch_size: int, drop_last: bool, generator: torch.Generator,
            device: torch.device, rank: int = 0, world_size: int = 1) -> list[torch.Tensor]:
    """This rank's anchor batches of one epoch. `batch_size` is the GLOBAL batch.

    The epoch's global batches are cut from one permutation exactly as a single process would
    cut them; rank r then takes the r-th of `world_size` equal slices of each. So 1 and W
    workers take the same optimiser steps over the same global batches (the batch-statistic
    terms gather the slices back, DDP averages the gradients), and every rank gets the same
    count. A global batch whose slices would hold fewer than two rows (batch norm and the
    contrastive terms need two) is skipped by every rank; a slice drops at most W-1 rows of a
    trailing batch that W does not divide.
    """
    perm = torch.randperm(n, generator=generator).to(device)
    count = n // batch_size if drop_last and n >= batch_size else math.ceil(n / batch_size)
    out = []
    for i in range(count):
        batch = perm[i * batch_size:(i + 1) * batch_size]
        share = len(batch) // world_size
        if share >= 2:
            out.append(batch[rank * share:(rank + 1) * share])
    return out


class Stage1Trainer:
    """Runs an Objective over Stage1Inputs. Example::

        trainer = Stage1Trainer(SEICObjective(SEICConfig(), n_clusters=10), device="cpu")
        state = trainer.fit(inputs)
        probs = predict_proba(state.model, inputs.image)
    """

    def __init__(self, objective: Objective, device: torch.device | str = "cpu", seed: int = 0,
                 rank: int = 0, world_size: int = 1,
                 on_epoch_end: Callable[[TrainState, EpochLog], None] | None = None,
                 wrap_model: Callable[[nn.Module], nn.Module] | None = None,
                 cuda_graphs: bool = True):
        self.objective = objective
        # On CUDA a head step is ~200 tiny kernels and launch-bound: capture one full-size step
        # (forward, backward, Adam) as a CUDA graph and replay it. Not with a DDP wrapper.
        self.cuda_graphs = cuda_graphs and self.device_is_cuda(device) and wrap_model is None
        self.device = torch.device(device)
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.on_epoch_end = on_epoch_end
        self.wrap_model = wrap_model

    @staticmethod
    def device_is_cuda(device) -> bool:
        return torch.device(device).type == "cuda"

    def init_state(self, dim: int) -> TrainState:
        torch.manual_seed(self.seed)  # identical initial weights on every rank
        model, criterion = self.objective.build(dim)
        model, criterion = model.to(self.device), criterion.to(self.device)
        if self.wrap_model is not None:
            model = self.wrap_model(model)
        return TrainState(model, criterion, self.objective.optimizer(
            list(model.parameters()) + list(criterion.parameters())))

    def fit(self, inputs: Stage1Inputs, state: TrainState | None = None) -> TrainState:
        inputs = inputs.to(self.device)
        state = state or self.init_state(inputs.image.shape[1])
        obj = self.objective
        # (nothing to capture when a resumed state has completed every epoch)
        step = (_GraphedStep(obj, state, inputs, self.device)
                if self.cuda_graphs and state.epoch < obj.epochs else None)
        while state.epoch < obj.epochs:
            # One generator per epoch, seeded by (seed, epoch): a resumed run replays exactly.
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + state.epoch)
            views = obj.epoch_views(inputs, generator)
            state.model.train()
            state.criterion.train()
            started = time.perf_counter()
            sums: dict[str, torch.Tensor] = {}
            plan = batches(inputs.n, obj.batch_size, obj.drop_last, generator, self.device,
                           self.rank, self.world_size)
            for idx in plan:
                if step is not None and len(idx) == obj.batch_size:
                    step.run(idx, views, sums)
                    continue
                loss, parts = obj.loss(state.model, state.criterion, inputs, idx, views)
                state.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                state.optimizer.step()
                _accumulate(sums, {"loss": loss, **parts})
                # drop the autograd graph now: a graph kept alive into a CUDA-graph capture
                # pins its AccumulateGrad nodes to this stream and breaks the capture
                del loss, parts
            steps = max(len(plan), 1)
            total = {k: float(v) / steps for k, v in sums.items()}
            log = EpochLog(epoch=state.epoch, loss=total.pop("loss", 0.0), parts=total,
                           seconds=time.perf_counter() - started, steps=len(plan))
            state.epoch += 1
            state.history.append(log)
            if self.on_epoch_end is not None:
                self.on_epoch_end(state, log)
        return state


def _accumulate(sums: dict[str, torch.Tensor], values: dict[str, torch.Tensor]) -> None:
    """Add a step's loss and parts into per-epoch device-side sums (no host sync per step)."""
    for name, value in values.items():
        value = value.detach()
        if name in sums:
            sums[name].add_(value)
        else:
            sums[name] = value.clone()


class StaticViews:
    """Fixed-address copies of an epoch's views for a captured CUDA graph.

    A graph reads its inputs from fixed addresses, so each epoch's views (N-long neighbour
    draws) are copied into buffers made once. The copy runs only when the epoch hands over new
    tensors, once per epoch, not per step (an N-long copy per step is 1.6 GB at N = 100M).
    """

    def __init__(self):
        self.buffers: dict[str, torch.Tensor] = {}
        self._sources: dict[str, torch.Tensor] = {}
        self.copies = 0  # how many tensors were copied (tests count them)

    def update(self, views: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        for name, value in views.items():
            if self._sources.get(name) is value:
                continue
            if name not in self.buffers:
                self.buffers[name] = value.clone()
            else:
                self.buffers[name].copy_(value)
            self._sources[name] = value
            self.copies += 1
        return self.buffers


class _GraphedStep:
    """A full-size training step captured once as a CUDA graph and replayed.

    The batch indices and the epoch's neighbour views are copied into static buffers before each
    replay; the step's loss parts are returned through static outputs. The first steps run
    eagerly on a side stream (required before capture); they are real training steps.
    """

    WARMUP = 3

    def __init__(self, objective: Objective, state: TrainState, inputs: Stage1Inputs,
                 device: torch.device):
        self.obj, self.state, self.inputs = objective, state, inputs
        self.idx = torch.zeros(objective.batch_size, dtype=torch.long, device=device)
        self.static_views = StaticViews()
        self.views: dict[str, torch.Tensor] = self.static_views.buffers
        self.graph: torch.cuda.CUDAGraph | None = None
        self.outputs: dict[str, torch.Tensor] = {}
        self.warmed = 0
        self.stream = torch.cuda.Stream(device)

    def _eager(self) -> dict[str, torch.Tensor]:
        loss, parts = self.obj.loss(self.state.model, self.state.criterion, self.inputs, self.idx,
                                    self.views)
        loss.backward()
        self.state.optimizer.step()
        return {"loss": loss.detach(), **{k: v.detach() for k, v in parts.items()}}

    def run(self, idx: torch.Tensor, views: dict, sums: dict[str, torch.Tensor]) -> None:
        self.idx.copy_(idx)
        self.static_views.update(views)
        optimizer = self.state.optimizer
        if self.graph is None and self.warmed < self.WARMUP:
            self.stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.stream):
                optimizer.zero_grad(set_to_none=True)
                out = self._eager()
            torch.cuda.current_stream().wait_stream(self.stream)
            self.warmed += 1
        else:
            if self.graph is None:
                optimizer.zero_grad(set_to_none=True)
                self.graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(self.graph):
                    self.outputs = self._eager()
            self.graph.replay()  # capture records only; every step, the first too, replays
            out = self.outputs
        _accumulate(sums, out)


@torch.no_grad()
def predict_proba(model: nn.Module, x: torch.Tensor, batch_size: int = 65536) -> torch.Tensor:
    """Cluster probabilities (N, K) from the image head, in eval mode."""
    model.eval()
    device = next(model.parameters()).device
    out = [torch.softmax(model(x[i:i + batch_size].to(device)).float(), dim=1)
           for i in range(0, x.shape[0], batch_size)]
    return torch.cat(out)
