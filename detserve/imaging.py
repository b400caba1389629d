"""Decode encoded image bytes into RGB pixels, safely.

The same function decodes on the server (preprocess model) and in every reference path (tests,
compare, eval), so the pixels a model sees are identical everywhere. Limits are checked from the
header, before any pixel is decompressed.
"""

from __future__ import annotations

import io
import warnings

import numpy as np

from detserve.errors import ImageError


def decode_image(data: bytes, max_pixels: int) -> np.ndarray:
    """Encoded image (JPEG, PNG, ...) -> uint8 array [H, W, 3] in RGB order.

    Grey and palette images become 3 equal/looked-up channels (PIL ``convert("RGB")``); alpha is
    dropped; EXIF orientation is *not* applied, as torchvision's ``read_image`` and PIL's plain
    ``open`` do not apply it during training either.
    """
    from PIL import Image

    if len(data) == 0:
        raise ImageError("empty image payload (0 bytes)")
    try:
        with warnings.catch_warnings():
            # PIL warns (and only raises past 2x its own limit); we apply our own limit below.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise ImageError(
            f"image declares more pixels than allowed, over the limit of {max_pixels} ({e})",
            hint="resize it before sending, or build the repository with a larger --max-image-pixels",
        ) from e
    except Exception as e:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ...
        raise ImageError(f"not a decodable image ({len(data)} bytes): {type(e).__name__}: {e}") from e
    width, height = im.size
    if width <= 0 or height <= 0:
        raise ImageError(f"image declares an empty size {width}x{height}")
    if width * height > max_pixels:
        raise ImageError(
            f"image declares {width}x{height} = {width * height} pixels, over the limit of {max_pixels}",
            hint="resize it before sending, or build the repository with a larger --max-image-pixels",
        )
    try:
        im.load()
        rgb = im.convert("RGB")
    except Exception as e:  # truncated or corrupt pixel data
        raise ImageError(f"cannot decode {im.format or 'image'} pixel data ({len(data)} bytes): {e}") from e
    return np.array(rgb, dtype=np.uint8)  # a writable copy: torch refuses read-only buffers
