"""gather_distributed: two DDP workers on halves of a batch == one process on the whole batch.

Pure PyTorch (no Ray): two ranks run on the gloo backend (CPU). For SEIC stage 1 every rank builds
the same heads (same seed), wraps them in DistributedDataParallel and trains on its contiguous half
of each global batch with a `gather_distributed=True` criterion; the reference is one plain
process with `gather_distributed=False` on the whole batch. Over two Adam steps (so the balancing
history and the optimiser state both carry over) the loss, its parts, every DDP-averaged parameter
gradient, the criterion buffers and the updated parameters must match.

With gather_distributed every gathered term is the *global* loss on every rank, and the backward
of all_gather sums the W ranks' gradients into each local slice (W x the global gradient); DDP's
mean over ranks then gives exactly the global gradient. A term left local (TAC's per-sample
instance consistency) gives W x the global gradient on its slice as well, so the same averaging
holds; only its *value* is per rank, and the mean over ranks is the global one.

TAC's criterion is checked on fixed probabilities (its heads hold batch norm, per process by
design). Its gradients once did not match on gloo (_GLOO_STRIDED_GRAD); gather_rows now makes the
incoming gradient contiguous, and a minimal gather_rows probe with a transposed upstream gradient
guards the fix.
"""

from __future__ import annotations


import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from gloo_ranks import run_ranks
from rayclust.config import SEICConfig, TACConfig
from rayclust.method.distributed import gather_rows
from rayclust.method.seic import SEICObjective
from rayclust.method.tac import TACObjective
from rayclust.method.trainer import Stage1Inputs

WORLD = 2
N, DIM, K, STEPS = 32, 16, 4, 2  # a global batch of N rows per step, N / WORLD per rank
ATOL, RTOL = 1e-5, 1e-5


def _data(seed: int = 0) -> dict[str, torch.Tensor]:
    """SEIC: per step, unit image rows and text rows near them; TAC: four (N, K) probability
    matrices; the gather_rows probe: an (N, K) input and an (N, K) upstream gradient."""
    g = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(STEPS, N, DIM, generator=g), dim=-1)
    text = F.normalize(image + 0.5 * torch.randn(STEPS, N, DIM, generator=g), dim=-1)
    tac_probs = [torch.softmax(2 * torch.randn(N, K, generator=g), dim=1) for _ in range(4)]
    probe = torch.randn(N, K, generator=g)
    probe_weight = torch.randn(N, K, generator=g)
    return {"image": image, "text": text, "tac_probs": tac_probs, "probe": probe,
            "probe_weight": probe_weight}


def _rows(rank: int | None) -> slice:
    """Rank r holds rows r*N/W:(r+1)*N/W (the order torch.cat(all_gather) restores); None = all."""
    if rank is None:
        return slice(None)
    b = N // WORLD
    return slice(rank * b, (rank + 1) * b)


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.detach().clone() for name, p in model.named_parameters()}


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _run_seic(rank: int | None, data) -> list[dict]:
    """SEIC stage 1 for STEPS steps; rank None = the single-process reference."""
    distributed = rank is not None
    objective = SEICObjective(SEICConfig(), K, gather_distributed=distributed)
    torch.manual_seed(0)
    heads, criterion = objective.build(DIM)
    model = DistributedDataParallel(heads) if distributed else heads
    optimizer = objective.optimizer(model.parameters())
    records = []
    for step in range(STEPS):
        inputs = Stage1Inputs(data["image"][step], data["text"][step])
        idx = torch.arange(N)[_rows(rank)]
        loss, parts = objective.loss(model, criterion, inputs, idx, {})
        optimizer.zero_grad()
        loss.backward()
        records.append({"loss": loss.detach().clone(),
                        "parts": {k: v.detach().clone() for k, v in parts.items()},
                        "grads": _grads(heads),
                        "buffers": {k: v.clone() for k, v in criterion.state_dict().items()}})
        optimizer.step()
        records[-1]["params"] = _params(heads)
    return records


def _run_tac(rank: int | None, data) -> dict:
    """TAC's criterion on fixed probabilities (no heads: TAC's heads hold batch norm, whose
    statistics are per process by design); rank None = the reference."""
    distributed = rank is not None
    _, criterion = TACObjective(TACConfig(), K, gather_distributed=distributed).build(DIM)
    probs = [p[_rows(rank)].clone().requires_grad_() for p in data["tac_probs"]]
    loss, parts = criterion(*probs)
    loss.backward()
    return {"loss": loss.detach(), "parts": {k: v.detach() for k, v in parts.items()},
            "prob_grads": [p.grad for p in probs]}


def _run_gather_probe(rank: int | None, data) -> dict:
    """d/dx of sum(gather_rows(x) * M) with the upstream gradient M (N, K) contiguous and
    transposed (the layout ClusterContrastiveLoss's column contrast sends back)."""
    x = data["probe"][_rows(rank)].clone().requires_grad_()
    m = data["probe_weight"]
    out = {}
    for layout, weight in (("contiguous", m), ("transposed", m.T.contiguous().T)):
        x.grad = None
        (gather_rows(x) * weight).sum().backward()
        out[layout] = x.grad.clone()
    return out


def _rank_results(rank: int) -> dict:
    data = _data()
    return {"seic": _run_seic(rank, data), "tac": _run_tac(rank, data),
            "probe": _run_gather_probe(rank, data)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(reference records, [rank 0 records, rank 1 records]) for both methods."""
    assert not dist.is_initialized()  # the reference must run as a lone process
    data = _data()
    # first, so the workers inherit what it lazily imports (Adam's first step imports
    # torch._dynamo: seconds of CPU that each spawned worker would pay again)
    reference = {"seic": _run_seic(None, data), "tac": _run_tac(None, data),
                 "probe": _run_gather_probe(None, data)}
    ranks = run_ranks(_rank_results, WORLD, tmp_path_factory.mktemp("ddp"), timeout_s=60)
    return reference, ranks


def _assert_close(actual, expected, what):
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=RTOL, msg=lambda m: f"{what}: {m}")


def test_seic_gathered_loss_and_ddp_gradients_match_one_process(runs):
    reference, ranks = runs
    ref = reference["seic"]
    # the checks below mean something: the centre term is live and the history moves
    assert all(r["parts"]["centre"] > 0 for r in ref)
    uniform = torch.full((K,), 1.0 / K)
    assert not torch.allclose(ref[0]["buffers"]["balance.history"], uniform)
    assert not torch.allclose(ref[1]["buffers"]["balance.history"],
                              ref[0]["buffers"]["balance.history"])
    for rank, result in enumerate(ranks):
        records = result["seic"]
        for step, (got, want) in enumerate(zip(records, ref)):
            where = f"SEIC rank {rank} step {step}"
            _assert_close(got["loss"], want["loss"], f"{where} loss")
            for key in want["parts"]:
                _assert_close(got["parts"][key], want["parts"][key], f"{where} {key}")
            assert got["grads"].keys() == want["grads"].keys()
            for name in want["grads"]:
                _assert_close(got["grads"][name], want["grads"][name], f"{where} grad {name}")
            assert got["buffers"].keys() == want["buffers"].keys()
            for name in want["buffers"]:
                _assert_close(got["buffers"][name], want["buffers"][name], f"{where} {name}")
            for name in want["params"]:
                _assert_close(got["params"][name], want["params"][name], f"{where} param {name}")


def test_tac_gathered_loss_values_match_one_process(runs):
    reference, results = runs
    want = reference["tac"]
    ranks = [result["tac"] for result in results]
    # the gathered terms are global on every rank; the per-sample consistency term is each
    # rank's own mean, so it and the total loss are global only as the mean over ranks
    for key in ("distill", "entropy"):
        for rank, got in enumerate(ranks):
            _assert_close(got["parts"][key], want["parts"][key], f"TAC rank {rank} {key}")
    mean = torch.stack([got["parts"]["consistency"] for got in ranks]).mean()
    _assert_close(mean, want["parts"]["consistency"], "TAC consistency (mean over ranks)")
    mean = torch.stack([got["loss"] for got in ranks]).mean()
    _assert_close(mean, want["loss"], "TAC loss (mean over ranks)")


# The bug these tests caught (fixed in rayclust.method.distributed._ContiguousGrad):
_GLOO_STRIDED_GRAD = (
    "torch.distributed.nn.functional.all_gather's backward on gloo (an all-to-all emulated with "
    "scatter into torch.empty_like(grad)) scrambles a non-contiguous incoming gradient: the "
    "received buffers keep the transposed strides but are filled as if contiguous. "
    "ClusterContrastiveLoss contrasts columns (cat([a.T, b.T])), so the gradient reaching "
    "gather_rows is transposed and TAC's distill gradients are wrong under gloo DDP")


def test_tac_gathered_gradients_match_one_process(runs):
    reference, results = runs
    names = ("p_v", "p_t", "q_v", "q_t")
    # a local slice gets W x the global gradient (every rank backpropagates the same global
    # loss; all_gather's backward sums them); DDP's mean over ranks divides by W upstream
    for i, name in enumerate(names):
        got = torch.cat([result["tac"]["prob_grads"][i] for result in results]) / WORLD
        _assert_close(got, reference["tac"]["prob_grads"][i], f"TAC d loss / d {name}")


def test_gather_rows_gradient_with_contiguous_upstream_gradient(runs):
    reference, results = runs
    got = torch.cat([result["probe"]["contiguous"] for result in results]) / WORLD
    _assert_close(got, reference["probe"]["contiguous"], "gather_rows gradient")


def test_gather_rows_gradient_with_transposed_upstream_gradient(runs):
    reference, results = runs
    got = torch.cat([result["probe"]["transposed"] for result in results]) / WORLD
    _assert_close(got, reference["probe"]["transposed"], "gather_rows gradient (transposed)")
