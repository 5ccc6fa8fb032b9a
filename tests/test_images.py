"""Decoding: every failure becomes a readable reason, never a crash."""

import io

import pytest
from PIL import Image

from rayclust.images import ImageDecodeError, decode_image


def encode(image, fmt, **kw):
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kw)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF"])
def test_formats_decode(fmt):
    image = Image.new("RGB", (30, 20), (200, 10, 10))
    decoded = decode_image(encode(image, fmt))
    assert decoded.size == (30, 20)


def test_exif_orientation_applied():
    image = Image.new("RGB", (40, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    decoded = decode_image(encode(image, "JPEG", exif=exif.tobytes()))
    assert decoded.size == (10, 40)


def test_gif_first_frame():
    frames = [Image.new("P", (10, 10), i) for i in (1, 2)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    assert decode_image(buffer.getvalue()).size == (10, 10)


@pytest.mark.parametrize("data, reason", [
    (b"", "empty file"),
    (b"hello, not an image", "not an image"),
])
def test_bad_bytes(data, reason):
    with pytest.raises(ImageDecodeError, match=reason):
        decode_image(data)


def test_truncated_jpeg():
    data = encode(Image.effect_noise((64, 64), 50).convert("RGB"), "JPEG")
    with pytest.raises(ImageDecodeError, match="truncated|corrupt"):
        decode_image(data[: len(data) // 2])


def test_decompression_bomb_guard(monkeypatch):
    import rayclust.images as images
    monkeypatch.setattr(images.Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(ImageDecodeError, match="decompression-bomb"):
        decode_image(encode(Image.new("L", (20, 20)), "PNG"))
