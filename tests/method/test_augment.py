"""Batched weak/strong views (ALGORITHM.md 4.4)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rayclust.method.augment import StrongAugment, weak_view

MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
OFF = dict(flip_p=0.0, jitter_p=0.0, grayscale_p=0.0, scale=(1.0, 1.0), ratio=(0.5, 2.0))


def batch(b: int = 6, h: int = 32, w: int = 32) -> torch.Tensor:
    return torch.randint(0, 256, (b, h, w, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_weak_view_matches_manual_normalisation():
    u = batch()
    x = weak_view(u, MEAN, STD)
    assert x.shape == (6, 3, 32, 32) and x.dtype == torch.float32
    manual = (u.permute(0, 3, 1, 2).float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    assert torch.allclose(x, manual, atol=1e-6)
    with pytest.raises(ValueError, match="uint8"):
        weak_view(u.float(), MEAN, STD)


@pytest.mark.parametrize("shape", [(32, 32), (24, 40)])
def test_strong_view_shape_dtype_finite(shape):
    u = batch(8, *shape)
    x = StrongAugment(MEAN, STD)(u, gen())
    assert x.shape == (8, 3, *shape) and x.dtype == torch.float32 and torch.isfinite(x).all()
    lo = (0 - torch.tensor(MEAN)) / torch.tensor(STD)
    hi = (1 - torch.tensor(MEAN)) / torch.tensor(STD)
    assert (x >= lo.view(1, 3, 1, 1) - 1e-5).all() and (x <= hi.view(1, 3, 1, 1) + 1e-5).all()
    assert not torch.allclose(x, weak_view(u, MEAN, STD), atol=1e-2)


@pytest.mark.parametrize("shape", [(32, 32), (24, 40)])
def test_identity_when_everything_is_off(shape):
    u = batch(4, *shape)
    x = StrongAugment(MEAN, STD, **OFF)(u, gen())
    assert torch.allclose(x, weak_view(u, MEAN, STD), atol=1e-4)


def test_fallback_is_torchvisions_central_crop():
    u = batch(2, 24, 40)  # aspect 5/3 > 4/3: the whole-image box is clipped to 32 x 24, centred
    x = StrongAugment(MEAN, STD, **{**OFF, "ratio": (3 / 4, 4 / 3)})(u, gen())
    weak = weak_view(u, MEAN, STD)
    expected = F.interpolate(weak[..., 4:36], size=(24, 40), mode="bilinear", align_corners=False)
    # edge columns differ: torchvision clamps at the crop border, grid_sample reads the neighbours
    assert torch.allclose(x[..., 1:-1], expected[..., 1:-1], atol=1e-4)


def test_deterministic_given_the_generator():
    u, aug = batch(), StrongAugment(MEAN, STD)
    a, b, c = aug(u, gen(3)), aug(u, gen(3)), aug(u, gen(4))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    g = gen(3)
    assert not torch.equal(aug(u, g), aug(u, g))  # the generator advances


def test_flip_mirrors():
    u = batch()
    x = StrongAugment(MEAN, STD, **{**OFF, "flip_p": 1.0})(u, gen())
    assert torch.allclose(x, weak_view(u, MEAN, STD).flip(-1), atol=1e-4)


def test_grayscale_makes_channels_equal():
    u = batch()
    x = StrongAugment(MEAN, STD, **{**OFF, "grayscale_p": 1.0})(u, gen())
    unit = x * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)
    assert torch.allclose(unit[:, 0], unit[:, 1], atol=1e-5) and torch.allclose(unit[:, 1], unit[:, 2], atol=1e-5)


def test_crops_zoom_in_and_jitter_changes_colour_only():
    u = batch(16)
    weak = weak_view(u, MEAN, STD)
    cropped = StrongAugment(MEAN, STD, **{**OFF, "scale": (0.25, 0.25)})(u, gen())
    assert not torch.allclose(cropped, weak, atol=1e-2)
    # colour jitter with hue only: a grey image stays grey
    grey = u[..., :1].expand(-1, -1, -1, 3).contiguous()
    hue_only = StrongAugment(MEAN, STD, **{**OFF, "jitter_p": 1.0, "brightness": 0.0, "contrast": 0.0,
                                           "saturation": 0.0})
    out = hue_only(grey, gen())
    assert torch.allclose(out, weak_view(grey, MEAN, STD), atol=1e-4)
    coloured = hue_only(u, gen())
    assert not torch.allclose(coloured, weak, atol=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    u, aug = batch(), StrongAugment(MEAN, STD)
    assert torch.allclose(aug(u.cuda(), gen(5)).cpu(), aug(u, gen(5)), atol=1e-3)


def test_colour_ops_match_torchvision():
    from torchvision.transforms.v2 import functional as TF

    from rayclust.method.augment import _brightness, _contrast, _hue, _saturation

    x = batch(2).permute(0, 3, 1, 2).float() / 255
    x[0, :, :3] = 0.5  # grey pixels (no hue)
    for ours, theirs, factors in ((_brightness, TF.adjust_brightness, (0.68, 1.32)),
                                  (_contrast, TF.adjust_contrast, (0.68, 1.32)),
                                  (_saturation, TF.adjust_saturation, (0.68, 1.32)),
                                  (_hue, TF.adjust_hue, (-0.08, 0.0, 0.05, 0.5))):
        for f in factors:
            assert torch.allclose(ours(x.clone(), torch.full((2,), f)), theirs(x, f), atol=1e-5), (ours, f)
