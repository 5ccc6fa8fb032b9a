"""Image preprocessing of an open_clip model, without torch: decode workers import only this.

`ImagePreprocess.to_uint8` gives the model's eval geometry (resize, centre crop) as uint8 RGB; the
normalisation (mean/std) runs later on the encoder's device. Importing open_clip costs seconds
per process, so CPU decode tasks must not depend on it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB. Transparency is composited on white (a transparent
    background would otherwise turn black); 16/32-bit and float gray are scaled to 8 bit."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I") or mode == "F":
        a = np.asarray(image).astype(np.float64)
        if mode.startswith("I;16"):
            a = a / 257.0
        elif mode == "F" and a.size and a.min() >= 0.0 and a.max() <= 1.0:
            a = a * 255.0
        elif a.size and a.max() > 255.0:  # 'I' is how PIL often opens 16-bit PNGs
            a = a / 257.0 if a.min() >= 0 and a.max() <= 65535 else \
                (a - a.min()) * (255.0 / max(a.max() - a.min(), 1e-12))
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8)).convert("RGB")
    if mode in ("P", "PA", "RGBA", "RGBa", "LA", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")  # L, 1, CMYK, YCbCr, HSV, ...


@dataclass(frozen=True)
class ImagePreprocess:
    """The eval-time geometry + normalisation of an open_clip model.

    ``size`` is (H, W). Mirrors open_clip's ``image_transform(is_train=False)``.
    """
    size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"
    fill_color: int = 0

    @classmethod
    def from_cfg(cls, cfg: dict) -> "ImagePreprocess":
        """From ``model.visual.preprocess_cfg`` (open_clip >= 2.23)."""
        size = cfg["size"]
        size = (size, size) if isinstance(size, int) else tuple(size[-2:])
        three = lambda v: tuple(float(x) for x in (v if isinstance(v, (list, tuple)) else (v,) * 3))
        interp = "bilinear" if cfg.get("interpolation") == "bilinear" else "bicubic"  # 'random' -> bicubic at eval
        return cls((int(size[0]), int(size[1])), three(cfg["mean"]), three(cfg["std"]), interp,
                   cfg.get("resize_mode") or "shortest", int(cfg.get("fill_color") or 0))

    def to_uint8(self, image: Image.Image) -> np.ndarray:
        """PIL image (any mode/size) -> (H, W, 3) uint8 RGB at ``size``."""
        img = to_rgb(image)
        th, tw = self.size
        w, h = img.size
        if self.resize_mode == "squash":
            new_h, new_w = th, tw
        elif self.resize_mode == "shortest" and th == tw:
            # torchvision Resize(int): short side -> size, long side truncated
            short, long = min(w, h), max(w, h)
            new_short, new_long = th, int(th * long / short)
            new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
        else:  # open_clip's ResizeKeepRatio: 'longest', or 'shortest' with a non-square target
            ratio = (max if self.resize_mode == "longest" else min)(h / th, w / tw)
            new_h, new_w = round(h / ratio), round(w / ratio)
        if (new_w, new_h) != (w, h):
            resample = Image.Resampling.BILINEAR if self.interpolation == "bilinear" else Image.Resampling.BICUBIC
            img = img.resize((new_w, new_h), resample)
        if new_w < tw or new_h < th:  # only 'longest': pad centred like open_clip's CenterCropOrPad
            canvas = Image.new("RGB", (max(tw, new_w), max(th, new_h)), (self.fill_color,) * 3)
            canvas.paste(img, ((tw - new_w) // 2 if tw > new_w else 0, (th - new_h) // 2 if th > new_h else 0))
            img, (new_w, new_h) = canvas, canvas.size
        top, left = int(round((new_h - th) / 2.0)), int(round((new_w - tw) / 2.0))
        if (new_w, new_h) != (tw, th):
            img = img.crop((left, top, left + tw, top + th))
        return np.array(img, dtype=np.uint8)  # writable copy (torch warns on read-only arrays)
