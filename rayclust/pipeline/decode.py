"""CPU decode UDFs for Ray Data (embedding, stage-2 training and table refresh).

Kept free of torch and open_clip on purpose: every Ray worker process that runs a decode task
imports this module, and on small machines a torch import per fresh process costs seconds.
A bad image never raises: it gets a readable `error` (and zero pixels).
"""

from __future__ import annotations

import io

import numpy as np

from rayclust import storage
from rayclust.images import ImageDecodeError, decode_image
from rayclust.preprocess import ImagePreprocess, to_rgb


def _thumbnail(image, size: int) -> bytes:
    thumb = to_rgb(image)
    thumb.thumbnail((size, size))
    buffer = io.BytesIO()
    thumb.save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def decode_batch(batch: dict, *, options, preprocess: ImagePreprocess,
                 thumbnail_size: int) -> dict:
    """Ray Data UDF (CPU): fetch and decode one batch; never raises for a bad image."""
    uris = batch["uri"]
    h, w = preprocess.size
    # read_parquet(include_paths=True) names the manifest shard of every row
    shard = np.array([p.rsplit("/", 1)[-1] for p in batch.pop("path")], dtype=object)
    pixels = np.zeros((len(uris), h, w, 3), dtype=np.uint8)
    errors, thumbs = [], []
    for i, uri in enumerate(uris):
        try:
            image = decode_image(storage.read_bytes(str(uri), options))
            pixels[i] = preprocess.to_uint8(image)
            thumbs.append(_thumbnail(image, thumbnail_size) if thumbnail_size else b"")
            errors.append("")
        except (ImageDecodeError, OSError, ValueError) as exc:
            errors.append(str(exc) or type(exc).__name__)
            thumbs.append(b"")
    out = dict(batch)
    out["shard"] = shard
    out["pixels"] = pixels
    out["error"] = np.array(errors, dtype=object)
    out["thumbnail"] = np.array(thumbs, dtype=object)
    return out


def decode_pixels(batch: dict, *, options, preprocess: ImagePreprocess,
                  rank: int | None = None, world: int | None = None) -> dict:
    """Stage-2 UDF: (idx, uri) -> (idx, pixels uint8, ok). With `world`, only the rows with
    idx % world == rank (one worker's share of a table refresh)."""
    if world is not None:
        mine = batch["idx"] % world == rank
        batch = {k: v[mine] for k, v in batch.items()}
    batch.setdefault("path", np.array(["-"] * len(batch["idx"]), dtype=object))
    out = decode_batch(batch, options=options, preprocess=preprocess, thumbnail_size=0)
    return {"idx": out["idx"].astype(np.int64), "pixels": out["pixels"],
            "ok": np.array([error == "" for error in out["error"]], dtype=bool)}
