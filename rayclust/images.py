"""Decoding image bytes into PIL images, with a readable reason for every failure.

The format comes from the content (PIL sniffs magic bytes), never from the file name. EXIF
orientation is applied; animated formats give their first frame. Colour-mode conversion to RGB is
the encoder preprocessing's job (`ImagePreprocess.to_uint8`).
"""

from __future__ import annotations

import io
import warnings

from PIL import Image, ImageOps

# PIL's own guard: images above this many pixels raise DecompressionBombError (2x for warnings).
MAX_IMAGE_PIXELS = 178_956_970
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS


class ImageDecodeError(ValueError):
    """The bytes are not a usable image; str(exc) is the reason stored in `errors/`."""


def decode_image(data: bytes) -> Image.Image:
    if not data:
        raise ImageDecodeError("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            image.seek(0)
            image.load()  # force the decode here so truncation is caught here
            image = ImageOps.exif_transpose(image)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(f"image too large (decompression-bomb guard, limit "
                               f"{MAX_IMAGE_PIXELS} pixels): {exc}") from None
    except Image.UnidentifiedImageError:
        raise ImageDecodeError("not an image (unrecognised format)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageDecodeError(f"corrupt or truncated image: {exc}") from None
    if image.width < 1 or image.height < 1:
        raise ImageDecodeError("image has zero size")
    return image
