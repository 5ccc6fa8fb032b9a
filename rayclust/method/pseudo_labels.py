"""Stage-2 pseudo-labels and SoftMatch-style confidence weights (ALGORITHM.md 4.4).

Two modes share the weighting rule w = 1 if c >= mu else exp(-(c - mu)^2 / (2 var)):

* **Table** (refresh period >= 1 epoch): the current model labels every image once per refresh;
  `PseudoLabelTable` holds (label, confidence, weight) per dense image index, with mu and var the
  table's own mean and population variance. Built in float64 on CPU from the gathered predictions,
  so every data-parallel worker derives the same table; `hash()` lets them check.
* **Online** (refresh period 0, VLM4Cluster): labels come from the weak view of each batch and
  `ConfidenceEMA` tracks mu and var with momentum 0.999, as SoftMatch does, but starting from the
  first batch's statistics rather than SoftMatch's prior (see `ConfidenceEMA`).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch import nn
import torch.nn.functional as F

from rayclust.method.distributed import all_reduce_sum


def soft_weights(confidence: torch.Tensor, mean: float | torch.Tensor,
                 var: float | torch.Tensor) -> torch.Tensor:
    """SoftMatch weights, float32, computed in float64 on ``confidence``'s device.

    ``var <= 0`` gives the limit var -> 0 of the Gaussian: a hard threshold (1 where c >= mean,
    0 below). With a table's own statistics that only happens when all confidences are equal, and
    then every weight is 1. mean/var may be device tensors (no host sync in the online mode).
    """
    c = confidence.double()
    mean = torch.as_tensor(mean, dtype=torch.float64, device=c.device)
    var = torch.as_tensor(var, dtype=torch.float64, device=c.device)
    gauss = torch.exp(-(c - mean) ** 2 / (2.0 * var.clamp(min=torch.finfo(torch.float64).tiny)))
    below = torch.where(var > 0, gauss, torch.zeros_like(c))
    return torch.where(c >= mean, torch.ones_like(c), below).float()


@dataclass
class PseudoLabelTable:
    """labels int64 (N,), confidence float32 (N,), weight float32 (N,), CPU, by dense image index."""

    labels: torch.Tensor
    confidence: torch.Tensor
    weight: torch.Tensor

    def __post_init__(self):
        self.labels = torch.as_tensor(self.labels).to("cpu", torch.int64).contiguous()
        self.confidence = torch.as_tensor(self.confidence).to("cpu", torch.float32).contiguous()
        self.weight = torch.as_tensor(self.weight).to("cpu", torch.float32).contiguous()
        n = self.labels.shape[0]
        if self.labels.ndim != 1 or self.confidence.shape != (n,) or self.weight.shape != (n,):
            raise ValueError(f"labels, confidence and weight must all be (N,), got "
                             f"{tuple(self.labels.shape)}, {tuple(self.confidence.shape)}, "
                             f"{tuple(self.weight.shape)}")

    def __len__(self) -> int:
        return self.labels.shape[0]

    @classmethod
    def from_predictions(cls, labels: torch.Tensor, confidence: torch.Tensor) -> "PseudoLabelTable":
        """Weights from the table's own mean and population variance of confidence.

        The sums are `math.fsum` (exactly rounded, so independent of thread count and summation
        order); the exp runs in float64 and is rounded to float32, so the weights are the same on
        every worker.
        """
        conf = torch.as_tensor(confidence).to("cpu", torch.float32)
        c64 = conf.double()
        n = c64.numel()
        mean = math.fsum(c64.tolist()) / n if n else 0.0
        var = math.fsum(((c64 - mean) ** 2).tolist()) / n if n else 0.0
        return cls(labels, conf, soft_weights(c64, mean, var))

    def hash(self) -> str:
        """sha256 hex over N and the bytes of labels, confidence and weight."""
        h = hashlib.sha256(len(self).to_bytes(8, "little"))
        for t in (self.labels, self.confidence, self.weight):
            h.update(t.numpy().tobytes())
        return h.hexdigest()

    def to_arrow(self, ids: list[str]) -> pa.Table:
        """id (string), label (int32), confidence (float32), weight (float32); row i is image i."""
        if len(ids) != len(self):
            raise ValueError(f"got {len(ids)} ids for a table of {len(self)} images")
        return pa.table({"id": pa.array(ids, pa.string()),
                         "label": pa.array(self.labels.numpy().astype(np.int32)),
                         "confidence": pa.array(self.confidence.numpy()),
                         "weight": pa.array(self.weight.numpy())})

    @classmethod
    def from_arrow(cls, table: pa.Table, ids: list[str]) -> "PseudoLabelTable":
        """Rows reordered to ``ids``; every id must appear in the table exactly once."""
        missing_cols = {"id", "label", "confidence", "weight"} - set(table.column_names)
        if missing_cols:
            raise ValueError(f"pseudo-label table lacks columns {sorted(missing_cols)}")
        table_ids, wanted = table.column("id").cast(pa.string()), pa.array(ids, pa.string())
        if pc.count_distinct(wanted).as_py() != len(wanted):
            raise ValueError("the requested ids contain duplicates")
        if pc.count_distinct(table_ids).as_py() != table.num_rows or table_ids.null_count:
            raise ValueError("pseudo-label table has duplicate or null ids")
        rows = pc.index_in(wanted, value_set=table_ids)
        if rows.null_count:
            absent = [ids[i] for i in np.flatnonzero(rows.is_null().to_numpy(zero_copy_only=False))[:5]]
            raise ValueError(f"{rows.null_count} ids are not in the pseudo-label table, e.g. {absent}")
        if table.num_rows != len(ids):
            raise ValueError(f"pseudo-label table has {table.num_rows - len(ids)} rows for ids "
                             "that were not requested (stale table?)")
        t = table.take(rows)
        col = lambda name, dtype: t.column(name).to_numpy().astype(dtype)  # noqa: E731
        return cls(torch.from_numpy(col("label", np.int64)),
                   torch.from_numpy(col("confidence", np.float32)),
                   torch.from_numpy(col("weight", np.float32)))

    def stats(self, n_clusters: int | None = None) -> dict:
        """n, mean confidence, mean weight and the cluster-size histogram (a list)."""
        n = len(self)
        sizes = torch.bincount(self.labels, minlength=n_clusters or 0) if n else torch.zeros(n_clusters or 0)
        return {"n": n,
                "mean_confidence": float(self.confidence.double().mean()) if n else 0.0,
                "mean_weight": float(self.weight.double().mean()) if n else 0.0,
                "cluster_sizes": [int(s) for s in sizes]}


class ConfidenceEMA(nn.Module):
    """Online SoftMatch statistics: EMAs of the batch mean and variance of the confidence.

    The first batch of at least two values sets mean and var to its own statistics; the EMA with
    ``momentum`` runs from there. SoftMatch instead starts at mean 1/K and var 1.0, which is a
    prior for a model trained from scratch; stage 2 starts from the trained stage-1 model, whose
    confidences sit far above 1/K, and with momentum 0.999 that prior would leave mean below
    almost every confidence, so almost every weight 1, for about 2,000 steps. Until then
    (`initialised` false) mean and var hold 1/K and 1.0. The batch variance is the unbiased one
    (SoftMatch's code). With ``gather_distributed`` the batch statistics are over all
    data-parallel workers, so every worker keeps the same EMA (all workers must then call
    `update` together).
    """

    def __init__(self, n_clusters: int, momentum: float = 0.999):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("mean", torch.tensor(1.0 / n_clusters, dtype=torch.float64))
        self.register_buffer("var", torch.tensor(1.0, dtype=torch.float64))
        self.register_buffer("initialised", torch.tensor(False))

    @torch.no_grad()
    def update(self, confidence: torch.Tensor, gather_distributed: bool = False) -> None:
        """Fold one batch in (no host sync). Batches of fewer than 2 values are ignored."""
        c = confidence.detach().to(self.mean.device, torch.float64).flatten()
        sums = torch.stack([c.new_tensor(float(c.numel())), c.sum(), (c * c).sum()])
        if gather_distributed:
            sums = all_reduce_sum(sums)
        n, total, squares = sums.unbind()
        mean = total / n.clamp(min=1)
        var = (squares - n * mean * mean).clamp(min=0) / (n - 1).clamp(min=1)
        counts = n > 1
        # momentum 0 on the first counted batch, 1 (no change) on a batch that does not count
        m = torch.where(counts, torch.where(self.initialised, n.new_tensor(self.momentum),
                                            n.new_tensor(0.0)), n.new_tensor(1.0))
        self.mean.copy_(m * self.mean + (1 - m) * mean)
        self.var.copy_(m * self.var + (1 - m) * var)
        self.initialised.logical_or_(counts.to(self.initialised.device))

    def weights(self, confidence: torch.Tensor) -> torch.Tensor:
        return soft_weights(confidence, self.mean, self.var)


def weighted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(1/B) sum_i w_i CE(logits_i, y_i), in float32 whatever the logits' dtype."""
    ce = F.cross_entropy(logits.float(), labels, reduction="none")
    return (weights.to(ce.device, torch.float32) * ce).mean()
