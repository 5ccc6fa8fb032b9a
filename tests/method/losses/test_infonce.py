"""info_nce / SymmetricInfoNCE (SEIC 4.3) against hand arithmetic."""

from __future__ import annotations

import math

import pytest
import torch

from rayclust.method.losses import SymmetricInfoNCE, info_nce


def test_identity_closed_form():
    # Rows e1, e2 on both sides, scale 2: each CE = -log(e^2/(e^2+e^0)) = log(1 + e^-2).
    eye = torch.eye(2)
    assert float(info_nce(eye, eye, 2.0)) == pytest.approx(math.log(1 + math.exp(-2)), rel=1e-6)


def test_asymmetric_case_mean_of_row_and_column_ce():
    # x rows (3,4)->(0.6,0.8), (1,0); y rows (0,2)->(0,1), (1,1)->(r,r) with r = 1/sqrt 2.
    r = 1 / math.sqrt(2)
    s = [[0.8, 0.6 * r + 0.8 * r], [0.0, r]]  # s[i][j] = x_i . y_j
    t = 0.5
    row0 = -s[0][0] / t + math.log(math.exp(s[0][0] / t) + math.exp(s[0][1] / t))
    row1 = -s[1][1] / t + math.log(math.exp(s[1][0] / t) + math.exp(s[1][1] / t))
    col0 = -s[0][0] / t + math.log(math.exp(s[0][0] / t) + math.exp(s[1][0] / t))
    col1 = -s[1][1] / t + math.log(math.exp(s[0][1] / t) + math.exp(s[1][1] / t))
    expected = 0.5 * ((row0 + row1) / 2 + (col0 + col1) / 2)
    x = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    y = torch.tensor([[0.0, 2.0], [1.0, 1.0]])
    assert float(info_nce(x, y, 1 / t)) == pytest.approx(expected, rel=1e-6)
    assert float(SymmetricInfoNCE(t)(x, y)) == pytest.approx(expected, rel=1e-6)
    # The row-only CE differs from the column-only CE here, so a one-sided loss would fail.
    assert abs((row0 + row1) - (col0 + col1)) > 1e-3


def test_tensor_scale_gets_gradient():
    x = torch.randn(4, 3, requires_grad=True)
    y = torch.randn(4, 3, requires_grad=True)
    scale = torch.tensor(10.0, requires_grad=True)
    info_nce(x, y, scale).backward()
    for g in (x.grad, y.grad, scale.grad):
        assert g is not None and torch.isfinite(g).all()
    assert float(scale.grad) != 0.0
