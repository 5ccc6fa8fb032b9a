"""Batched, on-device image views for stage 2 (ALGORITHM.md 4.4).

Inputs are the uint8 (B, H, W, 3) images the pipeline already decodes, resized and centre-cropped
to the model's input size, so the *weak* view is just CLIP normalisation. The *strong* view is
torchvision's RandomResizedCrop(scale (0.5, 1)) + flip + ColorJitter(0.32, 0.32, 0.32, 0.08) with
p=0.8 + grayscale p=0.2, re-implemented over the whole batch on the model's device: per-sample
parameters are tensors, crops and flips are one `affine_grid` + `grid_sample`, and nothing loops
over images. A per-image PIL/torchvision pipeline would need CPU decode workers per GPU step.

Differences from torchvision, all deliberate:

* Crop boxes are sub-pixel (continuous size and offset) and resampled bilinearly; torchvision
  rounds them to whole pixels. The area/aspect sampling (10 tries, then the central fallback) is
  torchvision's (so a scale of (1, 1) on an image whose aspect is outside ``ratio`` gives
  torchvision's central crop, not the identity). The crop is taken from the already centre-cropped image, not the original.
* Hue is torchvision's RGB -> HSV -> RGB shift with a closed-form HSV -> RGB; at a shift of 0
  the round trip is the identity up to float rounding (about 1e-7).
* The four jitter ops run in a random order per image (as torchvision does), implemented by
  applying all four ops at each of the four positions with identity factors except the chosen one
  (16 elementwise passes over the batch: a few ms at B=128, 224 px, small next to a ViT step).

Randomness comes from a CPU `torch.Generator`, so a seed gives the same views on CPU and CUDA
(up to floating-point rounding of the resampling).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

# ITU-R 601-2 luma, as torchvision's rgb_to_grayscale.
_LUMA = (0.2989, 0.587, 0.114)


def _as_images(uint8) -> torch.Tensor:
    x = torch.as_tensor(uint8)
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected uint8 (B, H, W, 3) images, got {x.dtype} {tuple(x.shape)}")
    return x


def _to_unit(x: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [0, 1] (same ops as ClipEncoder.encode_uint8)."""
    return x.permute(0, 3, 1, 2).float().div_(255.0)


def _normalise(x: torch.Tensor, mean, std) -> torch.Tensor:
    mean = torch.as_tensor(mean, dtype=torch.float32).to(x.device).view(1, 3, 1, 1)
    std = torch.as_tensor(std, dtype=torch.float32).to(x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def weak_view(uint8, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W), CLIP-normalised, on the input's device.

    Bit-identical to what `ClipEncoder.encode_uint8` feeds the model.
    """
    return _normalise(_to_unit(_as_images(uint8)), mean, std)


def _gray(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    return (_LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b).unsqueeze(1)


def _per_image(v: torch.Tensor) -> torch.Tensor:
    return v.view(-1, 1, 1, 1)


def _brightness(x, f):
    return (x * _per_image(f)).clamp_(0, 1)


def _contrast(x, f):
    mean = _gray(x).mean(dim=(1, 2, 3), keepdim=True)
    f = _per_image(f)
    return (f * x + (1 - f) * mean).clamp_(0, 1)


def _saturation(x, f):
    f = _per_image(f)
    return (f * x + (1 - f) * _gray(x)).clamp_(0, 1)


def _hue(x, h):
    """torchvision's hue shift: RGB -> HSV, h += shift (mod 1), -> RGB, per-image shifts."""
    maxc, minc = x.amax(dim=1), x.amin(dim=1)
    delta = maxc - minc
    sat = delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc))
    d = torch.where(delta > 0, delta, torch.ones_like(delta))
    r, g, b = x.unbind(1)
    hue = torch.where(maxc == r, (g - b) / d, torch.where(maxc == g, 2 + (b - r) / d, 4 + (r - g) / d))
    hue6 = torch.remainder(hue + 6 * h.view(-1, 1, 1), 6.0)  # hue in sixths, shifted
    # HSV -> RGB in closed form: channel n in (R, G, B) = (5, 3, 1) is v - v s clamp(min(k, 4 - k), 0, 1)
    k = torch.remainder(torch.tensor([5.0, 3.0, 1.0], device=x.device).view(1, 3, 1, 1) + hue6.unsqueeze(1), 6.0)
    ramp = torch.minimum(k, 4 - k).clamp_(0, 1)
    return (maxc.unsqueeze(1) * (1 - sat.unsqueeze(1) * ramp)).clamp_(0, 1)


class StrongAugment:
    """uint8 (B, H, W, 3) -> strongly augmented, normalised float (B, 3, H, W) on the same device."""

    def __init__(self, mean: Sequence[float], std: Sequence[float],
                 scale: tuple[float, float] = (0.5, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
                 flip_p: float = 0.5, brightness: float = 0.32, contrast: float = 0.32,
                 saturation: float = 0.32, hue: float = 0.08, jitter_p: float = 0.8,
                 grayscale_p: float = 0.2, crop_tries: int = 10):
        self.mean, self.std = tuple(mean), tuple(std)
        self.scale, self.ratio = scale, ratio
        self.flip_p, self.jitter_p, self.grayscale_p = flip_p, jitter_p, grayscale_p
        self.brightness, self.contrast, self.saturation, self.hue = brightness, contrast, saturation, hue
        self.crop_tries = crop_tries

    def _crop_flip_theta(self, b: int, h: int, w: int, g: torch.Generator) -> torch.Tensor:
        """(B, 2, 3) affine maps from output to input coordinates (align_corners=False)."""
        uniform = lambda lo, hi, *shape: lo + (hi - lo) * torch.rand(*shape, generator=g, dtype=torch.float64)  # noqa: E731
        t = self.crop_tries
        area = uniform(*self.scale, b, t) * (h * w)
        aspect = torch.exp(uniform(math.log(self.ratio[0]), math.log(self.ratio[1]), b, t))
        cw, ch = torch.sqrt(area * aspect), torch.sqrt(area / aspect)
        ok = (cw <= w) & (ch <= h)
        first = ok.to(torch.uint8).argmax(dim=1, keepdim=True)  # first valid try
        cw, ch, found = cw.gather(1, first)[:, 0], ch.gather(1, first)[:, 0], ok.any(dim=1)
        # torchvision's fallback: the whole image, clipped to the ratio range
        fw, fh = float(w), float(h)
        if w / h < self.ratio[0]:
            fh = w / self.ratio[0]
        elif w / h > self.ratio[1]:
            fw = h * self.ratio[1]
        cw, ch = torch.where(found, cw, fw), torch.where(found, ch, fh)
        u = torch.where(found.unsqueeze(1), uniform(0, 1, b, 2), 0.5)  # the fallback is central
        x0, y0 = u[:, 0] * (w - cw), u[:, 1] * (h - ch)
        flip = torch.where(torch.rand(b, generator=g) < self.flip_p, -1.0, 1.0).double()
        theta = torch.zeros(b, 2, 3, dtype=torch.float64)
        theta[:, 0, 0], theta[:, 0, 2] = flip * cw / w, (2 * x0 + cw) / w - 1
        theta[:, 1, 1], theta[:, 1, 2] = ch / h, (2 * y0 + ch) / h - 1
        return theta.float()

    def _jitter_factors(self, b: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 4) factors (brightness, contrast, saturation, hue) and (B, 4) op order."""
        apply = torch.rand(b, generator=g) < self.jitter_p
        cols = []
        for amount, identity in ((self.brightness, 1.0), (self.contrast, 1.0),
                                 (self.saturation, 1.0), (self.hue, 0.0)):
            lo, hi = (-amount, amount) if identity == 0.0 else (max(0.0, 1 - amount), 1 + amount)
            f = lo + (hi - lo) * torch.rand(b, generator=g)
            cols.append(torch.where(apply, f, identity))
        order = torch.rand(b, 4, generator=g).argsort(dim=1)
        return torch.stack(cols, dim=1), order

    def __call__(self, uint8, generator: torch.Generator) -> torch.Tensor:
        images = _as_images(uint8)
        b, h, w, _ = images.shape
        theta = self._crop_flip_theta(b, h, w, generator)
        factors, order = self._jitter_factors(b, generator)
        gray = torch.rand(b, generator=generator) < self.grayscale_p

        x = _to_unit(images)
        dev = x.device
        theta, factors, order, gray = theta.to(dev), factors.to(dev), order.to(dev), gray.to(dev)
        grid = F.affine_grid(theta, [b, 3, h, w], align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        ops = (_brightness, _contrast, _saturation, _hue)
        identity = torch.tensor([1.0, 1.0, 1.0, 0.0], device=dev)
        for position in range(4):  # each image applies exactly one real op per position
            chosen = order[:, position]
            for k, op in enumerate(ops):
                x = op(x, torch.where(chosen == k, factors[:, k], identity[k]))
        x = torch.where(_per_image(gray), _gray(x).expand_as(x), x)
        return _normalise(x, self.mean, self.std)
