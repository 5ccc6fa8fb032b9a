"""Stage-1 training loop (ALGORITHM.md 3.7, 10): batching, training, resume, prediction."""

from __future__ import annotations

import io
import itertools

import pytest
import torch
import torch.nn.functional as F

from rayclust.config import SEICConfig, TACConfig
from rayclust.method.neighbours import knn
from rayclust.method.seic import SEICObjective
from rayclust.method.tac import TACObjective
from rayclust.method.trainer import Stage1Inputs, Stage1Trainer, TrainState, batches, predict_proba

CPU = torch.device("cpu")


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("n,bs,drop_last", list(itertools.product([1, 2, 3, 9, 10, 11, 17],
                                                                   [2, 3, 5, 16],
                                                                   [True, False])))
def test_batches_disjoint_never_size_one(n, bs, drop_last):
    out = batches(n, bs, drop_last, _gen(), CPU)
    flat = torch.cat(out).tolist() if out else []
    assert len(flat) == len(set(flat)), "an anchor appears twice in one epoch"
    assert all(0 <= i < n for i in flat)
    assert all(len(b) >= 2 for b in out), "a batch of size 1"
    assert all(len(b) <= bs for b in out)
    if drop_last and n >= bs:
        assert len(out) == n // bs and all(len(b) == bs for b in out)
    elif n >= 2:
        covered = n - (1 if n % bs == 1 or n == 1 else 0)
        assert len(flat) == covered
        assert all(len(b) == bs for b in out[:-1])


def test_batches_examples():
    assert [len(b) for b in batches(10, 3, True, _gen(), CPU)] == [3, 3, 3]
    assert [len(b) for b in batches(10, 3, False, _gen(), CPU)] == [3, 3, 3]  # trailing 1 dropped
    assert [len(b) for b in batches(11, 3, False, _gen(), CPU)] == [3, 3, 3, 2]
    assert [len(b) for b in batches(4, 8, True, _gen(), CPU)] == [4]  # N < batch: one batch
    assert batches(1, 4, False, _gen(), CPU) == []
    # the permutation comes from the generator: same seed, same batches
    a, b = batches(20, 6, False, _gen(3), CPU), batches(20, 6, False, _gen(3), CPU)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(torch.cat(a), torch.cat(batches(20, 6, False, _gen(4), CPU)))


@pytest.mark.parametrize("n,bs,drop_last", [(11, 4, False), (11, 4, True), (20, 6, False),
                                            (21, 4, True), (7, 5, False), (5, 4, False),
                                            (23, 8, False)])
def test_batches_two_ranks_split_the_global_batches(n, bs, drop_last):
    """batch_size is the global batch: two ranks take the two halves of each batch one process
    would train, so they run the same steps over the same anchors."""
    single = batches(n, bs, drop_last, _gen(5), CPU)
    r0 = batches(n, bs, drop_last, _gen(5), CPU, rank=0, world_size=2)
    r1 = batches(n, bs, drop_last, _gen(5), CPU, rank=1, world_size=2)
    assert len(r0) == len(r1), "ranks would disagree on the number of collective steps"
    assert [len(b) for b in r0] == [len(b) for b in r1]
    assert all(len(x) >= 2 for x in r0 + r1)
    whole = [b for b in single if len(b) // 2 >= 2]  # a batch too small to split is skipped
    assert len(r0) == len(whole)
    for a, b, g in zip(r0, r1, whole):
        assert not set(a.tolist()) & set(b.tolist())
        assert set(a.tolist()) | set(b.tolist()) <= set(g.tolist())
        assert len(g) - len(a) - len(b) <= 1  # at most world-1 rows of an odd batch left out
    full = [b for b in single if len(b) == bs]
    assert [len(b) for b in r0[:len(full)]] == [bs // 2] * len(full)


def test_static_views_copy_once_per_epoch_not_per_step():
    """The CUDA-graph step's view buffers are refreshed only when an epoch hands over new
    tensors (the old check compared a buffer with itself and copied N rows every step)."""
    from rayclust.method.trainer import StaticViews

    views = StaticViews()
    epoch1 = {"text_neighbour": torch.arange(10), "image_neighbour": torch.arange(10) + 1}
    buffers = views.update(epoch1)
    address = buffers["text_neighbour"].data_ptr()
    for _ in range(5):  # the steps of one epoch
        assert views.update(epoch1) is buffers
    assert views.copies == 2
    epoch2 = {"text_neighbour": torch.arange(10) * 2, "image_neighbour": torch.arange(10) * 3}
    views.update(epoch2)
    assert views.copies == 4
    assert buffers["text_neighbour"].data_ptr() == address  # the graph's fixed address
    assert torch.equal(buffers["text_neighbour"], epoch2["text_neighbour"])


def _toy(n_per=20, k=3, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.eye(d)[:k]
    y = torch.arange(k).repeat_interleave(n_per)
    u = F.normalize(centres[y] + 0.15 * torch.randn(len(y), d, generator=g), dim=1)
    s = F.normalize(centres[y] + 0.05 * torch.randn(len(y), d, generator=g), dim=1)
    return u, s, y


def _seic_objective(epochs):
    return SEICObjective(SEICConfig(epochs=epochs, batch_size=16, learning_rate=5e-3), 3)


def _tac_objective(epochs):
    return TACObjective(TACConfig(epochs=epochs, batch_size=16, knn=5), 3)


def _tac_inputs(u, s):
    return Stage1Inputs(u, s, knn(u, 5), knn(s, 5))


def test_seic_training_reduces_loss_and_predicts():
    u, s, y = _toy()
    # 40 epochs, not fewer: the toy is learnt with margin across torch versions
    state = Stage1Trainer(_seic_objective(40), seed=0).fit(Stage1Inputs(u, s))
    assert state.epoch == 40 and len(state.history) == 40
    losses = [h.loss for h in state.history]
    assert losses[-1] < losses[0] - 0.1
    assert state.history[0].steps == 4  # 60 anchors, batch 16, no drop_last -> 16,16,16,12
    assert set(state.history[0].parts) == {"instance", "assignment", "centre", "balance"}
    probs = predict_proba(state.model, u, batch_size=7)
    assert probs.shape == (60, 3)
    assert torch.allclose(probs.sum(dim=1), torch.ones(60), atol=1e-5)
    assert torch.allclose(probs, predict_proba(state.model, u), atol=1e-6)
    from rayclust.method.metrics import cluster_accuracy
    assert cluster_accuracy(y.numpy(), probs.argmax(1).numpy()) > 0.9


def test_tac_training_reduces_loss():
    u, s, _ = _toy()
    state = Stage1Trainer(_tac_objective(10), seed=1).fit(_tac_inputs(u, s))
    losses = [h.loss for h in state.history]
    assert losses[-1] < losses[0]
    assert state.history[0].steps == 3  # drop_last: 60 // 16
    assert set(state.history[0].parts) == {"distill", "consistency", "entropy"}
    probs = predict_proba(state.model, u)
    assert torch.allclose(probs.sum(dim=1), torch.ones(60), atol=1e-5)


def _snapshot_at(epoch):
    saved = {}

    def hook(state: TrainState, log):
        if state.epoch == epoch:
            buf = io.BytesIO()
            torch.save(state.state_dict(), buf)
            saved["bytes"] = buf.getvalue()
    return saved, hook


@pytest.mark.parametrize("method", ["seic", "tac"])
def test_resume_reproduces_uninterrupted_run_exactly(method):
    u, s, _ = _toy()
    if method == "seic":
        inputs, make = Stage1Inputs(u, s), _seic_objective
    else:
        inputs, make = _tac_inputs(u, s), _tac_objective
    saved, hook = _snapshot_at(2)
    full = Stage1Trainer(make(5), seed=3, on_epoch_end=hook).fit(inputs)

    torch.manual_seed(12345)  # the global RNG state must not matter
    trainer = Stage1Trainer(make(5), seed=3)
    state = trainer.init_state(u.shape[1])
    state.load_state_dict(torch.load(io.BytesIO(saved["bytes"]), weights_only=False))
    assert state.epoch == 2 and len(state.history) == 2
    resumed = trainer.fit(inputs, state)

    assert resumed.epoch == 5
    for (name, a), (_, b) in zip(full.model.state_dict().items(),
                                 resumed.model.state_dict().items()):
        assert torch.equal(a, b), f"{name} differs after resume"
    for (name, a), (_, b) in zip(full.criterion.state_dict().items(),
                                 resumed.criterion.state_dict().items()):
        assert torch.equal(a, b), f"criterion {name} differs after resume"
    assert [h.loss for h in full.history] == [h.loss for h in resumed.history]
    # and a run with another seed really is different (the comparison has teeth)
    other = Stage1Trainer(make(5), seed=4).fit(inputs)
    assert not all(torch.equal(a, b) for a, b in zip(full.model.state_dict().values(),
                                                     other.model.state_dict().values()))


def test_same_seed_same_weights_and_on_epoch_end_called():
    u, s, _ = _toy()
    calls = []
    a = Stage1Trainer(_seic_objective(3), seed=7,
                      on_epoch_end=lambda st, log: calls.append((st.epoch, log.epoch))).fit(
        Stage1Inputs(u, s))
    b = Stage1Trainer(_seic_objective(3), seed=7).fit(Stage1Inputs(u, s))
    assert calls == [(1, 0), (2, 1), (3, 2)]
    assert all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(),
                                                 b.model.state_dict().values()))
