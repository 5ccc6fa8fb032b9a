"""CentreConsistencyLoss (SEIC centre level, ALGORITHM.md 4.3) against hand arithmetic."""

from __future__ import annotations

import math

import pytest
import torch

from rayclust.method.losses import CentreConsistencyLoss
from rayclust.method.losses.centre_consistency import confidence_weighted_centres

# Image branch: hard clusters 0,0,1,2,1 with confidences .9,.6,.7,.8,.5
P_V = [[0.9, 0.05, 0.05], [0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.1, 0.1, 0.8], [0.3, 0.5, 0.2]]
Z_V = [[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [-1.0, 0.0], [0.8, -0.6]]
# Text branch: hard clusters 0,1,1,1,0 with confidences .8,.85,.4,.7,.5 (cluster 2 absent)
P_T = [[0.8, 0.1, 0.1], [0.1, 0.85, 0.05], [0.3, 0.4, 0.3], [0.2, 0.7, 0.1], [0.5, 0.25, 0.25]]
Z_T = [[0.6, 0.8], [0.0, 1.0], [1.0, 0.0], [-0.6, 0.8], [0.0, -1.0]]

# Hand centres c_k = sum over hard members of conf * z
C_V = [[0.9 * 1.0 + 0.6 * 0.0, 0.9 * 0.0 + 0.6 * 1.0],            # (0.9, 0.6)
       [0.7 * 0.6 + 0.5 * 0.8, 0.7 * 0.8 + 0.5 * -0.6],            # (0.82, 0.26)
       [0.8 * -1.0, 0.0]]                                          # (-0.8, 0)
C_T = [[0.8 * 0.6 + 0.5 * 0.0, 0.8 * 0.8 + 0.5 * -1.0],            # (0.48, 0.14)
       [0.85 * 0.0 + 0.4 * 1.0 + 0.7 * -0.6, 0.85 * 1.0 + 0.4 * 0.0 + 0.7 * 0.8],  # (-0.02, 1.41)
       [0.0, 0.0]]


def _t(x):
    return torch.tensor(x, dtype=torch.float64)


def _hand_nce(xs, ys, scale):
    unit = lambda v: [c / math.sqrt(sum(e * e for e in v)) for c in v]  # noqa: E731
    xs, ys = [unit(v) for v in xs], [unit(v) for v in ys]
    n = len(xs)
    s = [[sum(a * b for a, b in zip(xs[i], ys[j])) * scale for j in range(n)] for i in range(n)]
    rows = sum(-s[i][i] + math.log(sum(math.exp(s[i][j]) for j in range(n))) for i in range(n)) / n
    cols = sum(-s[j][j] + math.log(sum(math.exp(s[i][j]) for i in range(n))) for j in range(n)) / n
    return 0.5 * (rows + cols)


def test_confidence_weighted_hard_centres():
    centres, present = confidence_weighted_centres(_t(Z_V), _t(P_V))
    assert torch.allclose(centres, _t(C_V), atol=1e-12)
    assert present.tolist() == [True, True, True]
    centres, present = confidence_weighted_centres(_t(Z_T), _t(P_T))
    assert torch.allclose(centres, _t(C_T), atol=1e-12)
    assert present.tolist() == [True, True, False]


def test_loss_uses_only_clusters_present_in_both():
    loss = CentreConsistencyLoss(temperature=0.5)(_t(Z_V), _t(P_V), _t(Z_T), _t(P_T))
    expected = _hand_nce(C_V[:2], C_T[:2], 1 / 0.5)
    assert float(loss) == pytest.approx(expected, rel=1e-9)
    # Sanity: unweighted or soft centres would give a different number.
    assert abs(expected - _hand_nce([[1, 1], [1.4, 0.2]], C_T[:2], 2.0)) > 1e-3


def test_zero_with_fewer_than_two_valid_clusters_and_differentiable():
    z_v = torch.randn(4, 3, requires_grad=True)
    z_t = torch.randn(4, 3, requires_grad=True)
    lv = torch.tensor([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 2.0], [2.0, 0.0, 0.0]],
                      requires_grad=True)
    lt = torch.tensor([[2.0, 0.0, 0.0]] * 4, requires_grad=True)  # text uses cluster 0 only
    loss = CentreConsistencyLoss(0.5)(z_v, lv.softmax(1), z_t, lt.softmax(1))
    assert float(loss.detach()) == 0.0
    assert loss.requires_grad
    loss.backward()
    assert z_v.grad is not None and torch.all(z_v.grad == 0)


def test_gradients_flow():
    torch.manual_seed(0)
    z_v = torch.randn(12, 4, requires_grad=True)
    z_t = torch.randn(12, 4, requires_grad=True)
    lv = torch.randn(12, 3, requires_grad=True)
    lt = torch.randn(12, 3, requires_grad=True)
    loss = CentreConsistencyLoss(0.5)(z_v, lv.softmax(1), z_t, lt.softmax(1))
    loss.backward()
    for g in (z_v.grad, z_t.grad, lv.grad, lt.grad):
        assert torch.isfinite(g).all()
    assert z_v.grad.abs().sum() > 0 and lv.grad.abs().sum() > 0
