"""Cluster heads (ALGORITHM.md 3.5, 4.2)."""

from __future__ import annotations

import math

import pytest
import torch

from rayclust.method.heads import SEICBranch, SEICHeads, TACHead, TACHeads

pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")


def test_tac_heads_forward_modes():
    torch.manual_seed(0)
    heads = TACHeads(16, 5)
    x = [torch.randn(8, 16) for _ in range(4)]
    assert heads(x[0]).shape == (8, 5)
    out = heads(*x)
    assert isinstance(out, tuple) and len(out) == 4
    assert all(o.shape == (8, 5) for o in out)
    # training mode: each set gets its own batch-norm statistics, image/text heads as specified
    assert torch.allclose(out[0], heads.image(x[0]), atol=1e-6)
    assert torch.allclose(out[1], heads.text(x[1]), atol=1e-6)
    assert torch.allclose(out[2], heads.text(x[2]), atol=1e-6)
    assert torch.allclose(out[3], heads.image(x[3]), atol=1e-6)
    # the image and text heads are separate modules
    assert heads.image.net[0].weight.data_ptr() != heads.text.net[0].weight.data_ptr()
    assert not torch.allclose(heads.image(x[0]), heads.text(x[0]))


def test_tac_head_layers_and_parameter_count():
    head = TACHead(32, 10)
    kinds = [type(m).__name__ for m in head.net]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    n = sum(p.numel() for p in head.parameters())
    assert n == 32 * 32 + 32 + 2 * 32 + 32 * 10 + 10


def test_trunc_normal_init_std():
    torch.manual_seed(1)
    head = TACHead(256, 10)
    w = head.net[0].weight
    assert float(w.std()) == pytest.approx(0.02, rel=0.03)
    assert float(w.mean()) == pytest.approx(0.0, abs=1e-3)
    assert float(head.net[3].weight.std()) == pytest.approx(0.02, rel=0.15)
    # TAC keeps PyTorch's default (non-zero) biases; SEIC zeroes them
    assert float(head.net[0].bias.abs().sum()) > 0
    branch = SEICBranch(256, 10)
    assert float(branch.projection.weight.std()) == pytest.approx(0.02, rel=0.03)
    assert float(branch.projection.bias.abs().sum()) == 0.0
    assert float(branch.cluster.bias.abs().sum()) == 0.0


def test_seic_heads_unit_z_and_modes():
    torch.manual_seed(2)
    heads = SEICHeads(12, 4)
    u, s = torch.randn(6, 12), torch.randn(6, 12)
    logits = heads(u)
    assert logits.shape == (6, 4)
    z_v, logits_v, z_t, logits_t, scale = heads(u, s)
    assert z_v.shape == (6, 12) and z_t.shape == (6, 12)
    assert torch.allclose(z_v.norm(dim=1), torch.ones(6), atol=1e-5)
    assert torch.allclose(z_t.norm(dim=1), torch.ones(6), atol=1e-5)
    assert torch.allclose(logits_v, logits) and logits_t.shape == (6, 4)
    assert torch.allclose(logits_v, heads.image.cluster(z_v), atol=1e-6)  # logits from z
    assert not torch.allclose(logits_v, logits_t)


def test_seic_logit_scale_init_and_clamp():
    heads = SEICHeads(8, 3)
    assert float(heads.logit_scale) == pytest.approx(math.log(1 / 0.07))
    assert float(heads.scale()) == pytest.approx(1 / 0.07, rel=1e-6)
    assert float(SEICHeads(8, 3, instance_temperature=0.2).scale()) == pytest.approx(5.0)
    with torch.no_grad():
        heads.logit_scale.fill_(math.log(250.0))
    assert float(heads.scale()) == pytest.approx(100.0)
    heads.scale().backward()
    assert float(heads.logit_scale.grad) == 0.0  # clamped: no gradient past the cap
