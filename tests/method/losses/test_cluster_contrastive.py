"""ClusterContrastiveLoss (TAC L_cc, ALGORITHM.md 3.8a) against hand arithmetic."""

from __future__ import annotations

import math

import pytest
import torch

from rayclust.method.losses import ClusterContrastiveLoss


def _hand_lcc(a: list[list[float]], b: list[list[float]], tau: float) -> float:
    """Plain-Python L_cc: 2K unit column vectors, positive = same k in the other matrix,
    denominator over every other vector (intra- and cross-modal), mean over the 2K vectors."""
    rows, k = len(a), len(a[0])
    cols = []
    for mat in (a, b):
        for j in range(k):
            col = [mat[i][j] for i in range(rows)]
            norm = math.sqrt(sum(c * c for c in col))
            cols.append([c / norm for c in col])
    total = 0.0
    for v in range(2 * k):
        partner = v + k if v < k else v - k
        dots = {w: sum(x * y for x, y in zip(cols[v], cols[w])) / tau
                for w in range(2 * k) if w != v}
        total += -(dots[partner] - math.log(sum(math.exp(d) for d in dots.values())))
    return total / (2 * k)


def test_orthogonal_identity_columns_closed_form():
    # A = B = I (2x2): columns e1, e2, e1, e2. Each vector: positive sim 1, two negatives sim 0.
    # l = -log(e^{1/T} / (e^{1/T} + 2)) = log(1 + 2 e^{-1/T}); with T = 0.5: log(1 + 2 e^-2).
    eye = torch.eye(2)
    loss = ClusterContrastiveLoss(temperature=0.5)(eye, eye)
    assert float(loss) == pytest.approx(math.log(1 + 2 * math.exp(-2)), rel=1e-6)
    assert float(loss) == pytest.approx(0.23954, abs=1e-5)


def test_two_by_two_written_out():
    # A columns a1=(0.9,0.2), a2=(0.1,0.8); B columns b1=(0.7,0.4), b2=(0.3,0.6); T = 1.
    a = [[0.9, 0.1], [0.2, 0.8]]
    b = [[0.7, 0.3], [0.4, 0.6]]
    n_a1, n_a2 = math.hypot(0.9, 0.2), math.hypot(0.1, 0.8)
    n_b1, n_b2 = math.hypot(0.7, 0.4), math.hypot(0.3, 0.6)
    a1, a2 = (0.9 / n_a1, 0.2 / n_a1), (0.1 / n_a2, 0.8 / n_a2)
    b1, b2 = (0.7 / n_b1, 0.4 / n_b1), (0.3 / n_b2, 0.6 / n_b2)
    dot = lambda p, q: p[0] * q[0] + p[1] * q[1]  # noqa: E731
    # l(a1): positive b1, negatives {a2, b1, b2}; etc.
    l_a1 = -dot(a1, b1) + math.log(math.exp(dot(a1, a2)) + math.exp(dot(a1, b1)) + math.exp(dot(a1, b2)))
    l_a2 = -dot(a2, b2) + math.log(math.exp(dot(a2, a1)) + math.exp(dot(a2, b1)) + math.exp(dot(a2, b2)))
    l_b1 = -dot(b1, a1) + math.log(math.exp(dot(b1, a1)) + math.exp(dot(b1, a2)) + math.exp(dot(b1, b2)))
    l_b2 = -dot(b2, a2) + math.log(math.exp(dot(b2, a1)) + math.exp(dot(b2, a2)) + math.exp(dot(b2, b1)))
    expected = (l_a1 + l_a2 + l_b1 + l_b2) / 4
    loss = ClusterContrastiveLoss(temperature=1.0)(torch.tensor(a), torch.tensor(b))
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    assert float(loss) == pytest.approx(_hand_lcc(a, b, 1.0), rel=1e-6)


def test_three_by_two_and_temperature():
    a = [[0.6, 0.4], [0.3, 0.7], [0.95, 0.05]]
    b = [[0.5, 0.5], [0.1, 0.9], [0.8, 0.2]]
    for tau in (0.5, 2.0, 5.0):
        loss = ClusterContrastiveLoss(tau)(torch.tensor(a, dtype=torch.float64),
                                           torch.tensor(b, dtype=torch.float64))
        assert float(loss) == pytest.approx(_hand_lcc(a, b, tau), rel=1e-9)


def test_three_clusters_column_scale_invariant_and_symmetric():
    a = [[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6], [0.3, 0.3, 0.4]]
    b = [[0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.1, 0.1, 0.8], [0.5, 0.25, 0.25]]
    ta, tb = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    crit = ClusterContrastiveLoss(0.5)
    assert float(crit(ta, tb)) == pytest.approx(_hand_lcc(a, b, 0.5), rel=1e-9)
    # Columns are normalised: scaling a column does not change the loss.
    scaled = ta * torch.tensor([3.0, 0.5, 7.0], dtype=torch.float64)
    assert float(crit(scaled, tb)) == pytest.approx(float(crit(ta, tb)), rel=1e-9)
    # The set of 2K vectors and their partners is symmetric in (A, B).
    assert float(crit(tb, ta)) == pytest.approx(float(crit(ta, tb)), rel=1e-9)


def test_gradients_flow():
    logits_a = torch.randn(6, 3, requires_grad=True)
    logits_b = torch.randn(6, 3, requires_grad=True)
    loss = ClusterContrastiveLoss(0.5)(logits_a.softmax(1), logits_b.softmax(1))
    loss.backward()
    for g in (logits_a.grad, logits_b.grad):
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0
