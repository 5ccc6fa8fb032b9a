"""DynamicBalanceRegulariser (SEIC, ALGORITHM.md 4.3) against hand arithmetic."""

from __future__ import annotations

import math

import pytest
import torch

from rayclust.method.losses import DynamicBalanceRegulariser

P_V = [[0.6, 0.3, 0.1], [0.2, 0.2, 0.6]]  # mean (0.4, 0.25, 0.35); argmax 0, 2
P_T = [[0.5, 0.5, 0.0], [0.1, 0.7, 0.2]]  # mean (0.3, 0.6, 0.1)


def _hw(mean, w):
    return -sum(wk * pk * math.log(max(pk, 1e-9)) for wk, pk in zip(w, mean))


def test_initial_history_uniform_weights_one():
    reg = DynamicBalanceRegulariser(3)
    assert torch.allclose(reg.history, torch.full((3,), 1 / 3))
    assert torch.allclose(reg.weights(), torch.ones(3))
    reg.eval()
    expected = -(_hw([0.4, 0.25, 0.35], [1, 1, 1]) + _hw([0.3, 0.6, 0.1], [1, 1, 1]))
    assert float(reg(torch.tensor(P_V), torch.tensor(P_T))) == pytest.approx(expected, rel=1e-6)


def test_weights_floor_cap_and_mean_one():
    reg = DynamicBalanceRegulariser(3, floor=0.01, max_weight=5.0)
    reg.history.copy_(torch.tensor([0.7, 0.295, 0.005]))
    # floor: (0.7, 0.295, 0.01) / 1.005 ; w = (1/3)/h = 1.005/(3 h_raw) ; w_2 = 33.5 -> cap 5
    raw = [1.005 / 2.1, 1.005 / 0.885, 5.0]
    mean = sum(raw) / 3
    expected = [r / mean for r in raw]
    assert reg.weights().tolist() == pytest.approx(expected, rel=1e-5)
    assert expected == pytest.approx([0.217068, 0.515075, 2.267857], rel=1e-5)
    assert float(reg.weights().mean()) == pytest.approx(1.0, rel=1e-6)


def test_loss_value_with_weights_and_ema_update_in_train_only():
    reg = DynamicBalanceRegulariser(3, momentum=0.9)
    start = torch.tensor([0.7, 0.295, 0.005])
    reg.history.copy_(start)
    raw = [1.005 / 2.1, 1.005 / 0.885, 5.0]
    w = [r / (sum(raw) / 3) for r in raw]
    expected = -(_hw([0.4, 0.25, 0.35], w) + _hw([0.3, 0.6, 0.1], w))

    reg.eval()
    loss = reg(torch.tensor(P_V), torch.tensor(P_T))
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    assert torch.equal(reg.history, start)  # no update in eval mode

    reg.train()
    loss = reg(torch.tensor(P_V), torch.tensor(P_T))
    assert float(loss) == pytest.approx(expected, rel=1e-5)  # computed before the update
    # hard histogram of the image head: argmax (0, 2) -> (0.5, 0, 0.5)
    new = [0.9 * 0.7 + 0.1 * 0.5, 0.9 * 0.295 + 0.1 * 0.0, 0.9 * 0.005 + 0.1 * 0.5]
    assert reg.history.tolist() == pytest.approx(new, rel=1e-6)
    assert new == pytest.approx([0.68, 0.2655, 0.0545])
    assert "history" in reg.state_dict()


def test_underused_cluster_gets_larger_weight_over_steps():
    reg = DynamicBalanceRegulariser(4)
    reg.train()
    always_zero = torch.tensor([[0.7, 0.1, 0.1, 0.1]] * 8)
    for _ in range(5):
        reg(always_zero, always_zero)
    w = reg.weights()
    assert float(w[0]) < float(w[1]) == pytest.approx(float(w[2]))
    assert float(reg.history.sum()) == pytest.approx(1.0, rel=1e-6)


def test_gradients_flow():
    reg = DynamicBalanceRegulariser(3)
    reg.history.copy_(torch.tensor([0.5, 0.3, 0.2]))
    lv = torch.randn(6, 3, requires_grad=True)
    lt = torch.randn(6, 3, requires_grad=True)
    reg(lv.softmax(1), lt.softmax(1)).backward()
    for g in (lv.grad, lt.grad):
        assert torch.isfinite(g).all() and g.abs().sum() > 0
