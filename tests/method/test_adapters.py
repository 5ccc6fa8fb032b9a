"""Adapters on an open_clip vision tower (ALGORITHM.md 4.4)."""

from __future__ import annotations

import pickle

import pytest
import torch
from open_clip.transformer import Attention, VisionTransformer
from torch import nn

from rayclust.method.adapters import (adapter_state_dict, apply_adapter, count_parameters,
                                      load_adapter_state_dict, merge_adapter)

WIDTH, LAYERS = 32, 3


def tower(seed: int = 0) -> VisionTransformer:
    torch.manual_seed(seed)
    return VisionTransformer(image_size=32, patch_size=16, width=WIDTH, layers=LAYERS, heads=2,
                             mlp_ratio=2.0, output_dim=16).eval()


def images(n: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def randomise_up(visual: nn.Module) -> None:
    """Non-zero B matrices so LoRA actually changes the tower."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in visual.named_parameters():
            if "lora_b" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def test_lora_equals_base_at_init_exactly():
    visual, x = tower(), images()
    with torch.no_grad():
        base_eval = visual(x)
    base_train = visual.train()(x).detach()
    params = apply_adapter(visual, "lora", rank=4)
    assert len(params) == 4 * LAYERS and all("lora" in n for n, p in visual.named_parameters() if p.requires_grad)
    with torch.no_grad():
        assert torch.equal(visual.eval()(x), base_eval)  # eval, fused fast path
    assert torch.equal(visual.train()(x).detach(), base_train)  # grad-enabled slow path


def test_lora_touches_q_and_v_only_and_scales_by_alpha():
    visual = tower()
    w0 = visual.transformer.resblocks[0].attn.in_proj_weight.detach().clone()
    apply_adapter(visual, "lora", rank=4, alpha=8.0)
    randomise_up(visual)
    attn = visual.transformer.resblocks[0].attn
    w = attn.in_proj_weight.detach()
    d = WIDTH
    assert torch.equal(w[d:2 * d], w0[d:2 * d])  # K untouched
    lora = attn.parametrizations.in_proj_weight[0]
    assert torch.allclose(w[:d] - w0[:d], 2.0 * lora.lora_b_q @ lora.lora_a_q, atol=1e-6)
    assert torch.allclose(w[2 * d:] - w0[2 * d:], 2.0 * lora.lora_b_v @ lora.lora_a_v, atol=1e-6)
    assert lora.lora_a_q.shape == (4, d) and lora.lora_b_q.shape == (d, 4)
    assert float(lora.lora_a_q.detach().abs().max()) <= d ** -0.5  # Kaiming-uniform(a=sqrt(5)) bound


def test_lora_init_is_seeded():
    a, b, c = tower(0), tower(1), tower(0)
    apply_adapter(a, "lora", rank=4, seed=3)
    apply_adapter(b, "lora", rank=4, seed=3)  # different base weights, same adapter seed
    apply_adapter(c, "lora", rank=4, seed=4)
    sa, sb, sc = adapter_state_dict(a), adapter_state_dict(b), adapter_state_dict(c)
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["transformer.resblocks.0.attn.parametrizations.in_proj_weight.0.lora_a_q"],
                           sc["transformer.resblocks.0.attn.parametrizations.in_proj_weight.0.lora_a_q"])


def test_gradients_reach_only_the_adapter():
    visual = tower()
    apply_adapter(visual, "lora", rank=4)
    randomise_up(visual)
    visual.train()(images()).square().sum().backward()
    for name, p in visual.named_parameters():
        assert (p.grad is not None) == ("lora" in name), name
    assert all(float(p.grad.abs().sum()) > 0 for n, p in visual.named_parameters() if "lora" in n)


def test_merge_keeps_outputs_and_removes_parametrization():
    visual, x = tower(), images()
    with torch.no_grad():
        base = visual(x)
    apply_adapter(visual, "lora", rank=4)
    randomise_up(visual)
    with torch.no_grad():
        adapted = visual(x)
    assert not torch.allclose(adapted, base, atol=1e-3)  # the eval (fused) path sees the delta
    merge_adapter(visual)
    assert not any("parametrizations" in n for n, _ in visual.named_parameters())
    with torch.no_grad():
        assert torch.allclose(visual(x), adapted, atol=1e-5)
    pickle.dumps(visual)  # plain module again
    apply_adapter(visual, "lora", rank=2)  # and can be adapted again


def test_state_dict_roundtrip_and_strictness():
    src, dst, x = tower(), tower(), images()
    apply_adapter(src, "lora", rank=4)
    apply_adapter(dst, "lora", rank=4, seed=9)
    randomise_up(src)
    state = adapter_state_dict(src)
    total = sum(v.numel() for v in state.values())
    assert total == count_parameters(src)[0] == LAYERS * 4 * 4 * WIDTH
    load_adapter_state_dict(dst, state)
    with torch.no_grad():
        assert torch.equal(dst(x), src(x))
    with pytest.raises(ValueError, match="missing"):
        load_adapter_state_dict(dst, dict(list(state.items())[1:]))
    with pytest.raises(ValueError, match="unexpected"):
        load_adapter_state_dict(dst, {**state, "extra": torch.zeros(1)})
    other = tower()
    apply_adapter(other, "lora", rank=2)
    with pytest.raises(ValueError, match="shape"):
        load_adapter_state_dict(other, state)  # same names, rank 4 vs 2


def test_other_kinds():
    visual = tower()
    params = apply_adapter(visual, "last_blocks", blocks=1)
    names = {n for n, p in visual.named_parameters() if p.requires_grad}
    assert names and all(n.startswith(("transformer.resblocks.2.", "ln_post.", "proj")) for n in names)
    assert "proj" in names and "ln_post.weight" in names and len(params) == len(names)
    assert set(adapter_state_dict(visual)) == names

    visual = tower()
    trainable, total = count_parameters(visual)
    assert trainable == total  # a fresh module trains everything
    assert len(apply_adapter(visual, "none")) == 0 and count_parameters(visual)[0] == 0
    visual = tower()
    assert count_parameters(visual) == (total, total) and len(apply_adapter(visual, "full")) > 0
    with pytest.raises(ValueError, match="unknown adapter"):
        apply_adapter(tower(), "prefix")


def test_lora_on_open_clip_custom_attention_and_errors():
    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = Attention(16, num_heads=2)

        def forward(self, x):
            return self.attn(x)

    torch.manual_seed(0)
    m, x = Wrapper().eval(), torch.randn(2, 5, 16)
    with torch.no_grad():
        base = m(x)
    assert len(apply_adapter(m, "lora", rank=2)) == 4
    with torch.no_grad():
        assert torch.equal(m(x), base)
    with pytest.raises(ValueError, match="already applied"):
        apply_adapter(m, "lora")

    conv_tower = nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with pytest.raises(ValueError, match="'last_blocks' or 'full'"):
        apply_adapter(conv_tower, "lora")
