"""LAIC-RS's relational consistency loss (our reading): values by hand, and its gradient."""

from __future__ import annotations

import math

import pytest
import torch

from rayclust.method.losses import relational_consistency


def test_agreeing_one_hot_pairs_over_balanced_clusters():
    p = torch.eye(4)  # each anchor sure of its own cluster, all clusters used once
    loss, parts = relational_consistency(p, p.clone(), entropy_weight=2.0)
    assert float(parts["agreement"]) == pytest.approx(0.0, abs=1e-6)
    assert float(parts["balance"]) == pytest.approx(math.log(4))
    assert float(loss) == pytest.approx(-2.0 * math.log(4))


def test_values_by_hand_and_gradient_towards_agreement():
    p = torch.tensor([[0.5, 0.5], [0.9, 0.1]])
    q = torch.tensor([[0.2, 0.8], [0.6, 0.4]])
    loss, parts = relational_consistency(p, q, entropy_weight=0.5)
    agreement = -(math.log(0.5 * 0.2 + 0.5 * 0.8) + math.log(0.9 * 0.6 + 0.1 * 0.4)) / 2
    mean = [0.7, 0.3]
    balance = -sum(m * math.log(m) for m in mean)
    assert float(parts["agreement"]) == pytest.approx(agreement)
    assert float(parts["balance"]) == pytest.approx(balance)
    assert float(loss) == pytest.approx(agreement - 0.5 * balance)
    # a step on the neighbour's logits moves it towards the anchor's cluster
    logits = torch.tensor([[0.0, 1.0]], requires_grad=True)
    loss, _ = relational_consistency(torch.tensor([[1.0, 0.0]]), logits.softmax(-1), 0.0)
    loss.backward()
    assert logits.grad[0, 0] < 0 < logits.grad[0, 1]
