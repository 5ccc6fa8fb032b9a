"""marginal_entropy (TAC 3.8c, SEIC 4.3 weighted) against hand arithmetic."""

from __future__ import annotations

import math

import pytest
import torch

from rayclust.method.losses import marginal_entropy


def test_unweighted_by_hand():
    # mean of rows (0.5,0.5) and (1,0) is (0.75, 0.25)
    probs = torch.tensor([[0.5, 0.5], [1.0, 0.0]])
    expected = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert float(marginal_entropy(probs)) == pytest.approx(expected, rel=1e-6)


def test_balanced_is_log_k():
    probs = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    assert float(marginal_entropy(probs)) == pytest.approx(math.log(3), rel=1e-6)


def test_weighted_by_hand():
    # mean = (0.2+0.6)/2, (0.3+0.1)/2, (0.5+0.3)/2 = (0.4, 0.2, 0.4); weights (2, 0.5, 1)
    probs = torch.tensor([[0.2, 0.3, 0.5], [0.6, 0.1, 0.3]])
    w = torch.tensor([2.0, 0.5, 1.0])
    expected = -(2.0 * 0.4 * math.log(0.4) + 0.5 * 0.2 * math.log(0.2) + 1.0 * 0.4 * math.log(0.4))
    assert float(marginal_entropy(probs, w)) == pytest.approx(expected, rel=1e-6)


def test_eps_clamp_only_inside_log():
    # mean = (0.9, 0.1); with eps = 0.5 the log of 0.1 becomes log 0.5, the factor stays 0.1.
    probs = torch.tensor([[1.0, 0.0], [0.8, 0.2]])
    expected = -(0.9 * math.log(0.9) + 0.1 * math.log(0.5))
    assert float(marginal_entropy(probs, eps=0.5)) == pytest.approx(expected, rel=1e-6)
    # A cluster with zero mass contributes 0 (not NaN) under the default eps.
    collapsed = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert float(marginal_entropy(collapsed)) == pytest.approx(0.0, abs=1e-12)


def test_gradients_flow_including_zero_mass():
    logits = torch.randn(8, 3, requires_grad=True)
    marginal_entropy(logits.softmax(1), torch.tensor([1.0, 2.0, 0.5])).backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    probs = torch.tensor([[1.0, 0.0], [1.0, 0.0]], requires_grad=True)
    marginal_entropy(probs).backward()
    # d/dp_k of -(mean_k log max(mean_k, eps)) / B: finite where mean_k = 0 (-log(eps) / B).
    assert torch.isfinite(probs.grad).all()
    assert float(probs.grad[0, 1]) == pytest.approx(-math.log(1e-9) / 2, rel=1e-4)
