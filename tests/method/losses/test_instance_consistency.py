"""InstanceConsistencyLoss (TAC L_con, ALGORITHM.md 3.8b) against hand arithmetic."""

from __future__ import annotations

import math

import pytest
import torch

from rayclust.method.losses import InstanceConsistencyLoss


def test_value_by_hand():
    # agreements: 0.9*0.8 + 0.1*0.2 = 0.74 ; 0.3*0.6 + 0.7*0.4 = 0.46
    p_v = torch.tensor([[0.9, 0.1], [0.3, 0.7]])
    p_t = torch.tensor([[0.8, 0.2], [0.6, 0.4]])
    expected = -(math.log(0.74) + math.log(0.46)) / 2
    assert float(InstanceConsistencyLoss()(p_v, p_t)) == pytest.approx(expected, rel=1e-6)


def test_three_clusters_by_hand():
    p_v = torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.1, 0.8], [1 / 3, 1 / 3, 1 / 3]])
    p_t = torch.tensor([[0.2, 0.4, 0.4], [0.0, 0.5, 0.5], [0.7, 0.2, 0.1]])
    agree = [0.5 * 0.2 + 0.25 * 0.4 + 0.25 * 0.4, 0.1 * 0.5 + 0.8 * 0.5, 1 / 3]
    expected = -sum(math.log(a) for a in agree) / 3
    assert float(InstanceConsistencyLoss()(p_v, p_t)) == pytest.approx(expected, rel=1e-6)


def test_log_clamped_at_minus_100_when_agreement_is_zero():
    # Row 0: p_t . p_v = 0 -> -log(0) clamped to 100 (PyTorch BCE's clamp, as in TAC's code).
    p_v = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    p_t = torch.tensor([[0.0, 1.0], [0.5, 0.5]])
    loss = InstanceConsistencyLoss()(p_v, p_t)
    assert float(loss) == pytest.approx((100.0 + math.log(2.0)) / 2, rel=1e-6)
    # Same value as TAC's formulation: BCE of the dot product against 1.
    agreement = (p_v * p_t).sum(1)
    bce = torch.nn.functional.binary_cross_entropy(agreement, torch.ones(2))
    assert float(loss) == pytest.approx(float(bce), rel=1e-6)


def test_gradients_flow():
    lv = torch.randn(5, 4, requires_grad=True)
    lt = torch.randn(5, 4, requires_grad=True)
    InstanceConsistencyLoss()(lv.softmax(1), lt.softmax(1)).backward()
    for g in (lv.grad, lt.grad):
        assert torch.isfinite(g).all() and g.abs().sum() > 0


def test_gradient_finite_when_agreement_underflows_to_zero():
    """Confident, disagreeing softmax rows make p_t . p_v exactly 0 in float32.

    TAC's BCE has a finite gradient there (PyTorch clamps its denominator), so training goes
    on; -log(x).clamp_min(-100) back-propagates 0 * inf = NaN into every logit of the batch.
    """
    lv = torch.tensor([[100.0, -100.0], [1.0, 0.0]], requires_grad=True)
    lt = torch.tensor([[-100.0, 100.0], [0.0, 1.0]], requires_grad=True)
    p_v, p_t = lv.softmax(1), lt.softmax(1)
    assert float((p_v * p_t).sum(1)[0].detach()) == 0.0  # the underflow this test is about
    loss = InstanceConsistencyLoss()(p_v, p_t)
    assert math.isfinite(float(loss.detach()))
    loss.backward()
    assert torch.isfinite(lv.grad).all(), f"NaN/inf gradient: {lv.grad}"
    assert torch.isfinite(lt.grad).all(), f"NaN/inf gradient: {lt.grad}"
    # The second row still gets its ordinary gradient.
    assert lv.grad[1].abs().sum() > 0
