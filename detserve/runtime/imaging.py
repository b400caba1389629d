"""Decode encoded image bytes into RGB pixels, safely.

The same function decodes on the server (preprocess model) and in every reference path (tests,
compare, eval), so the pixels a model sees are identical everywhere. Limits are checked from the
header, before any pixel is decompressed. The policy for each kind of input is in docs/inputs.md.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from detserve.errors import ImageError

if TYPE_CHECKING:
    from PIL import Image

# Only these PIL decoders are tried. Pillow opens ~40 formats, some through large or external
# decoders (EPS runs Ghostscript); a server taking bytes from the network should not reach them.
# JPEG covers MPO (phone multi-picture JPEGs: Pillow's JPEG opener returns them); PPM covers PGM/PBM.
ACCEPTED_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP", "PPM")

# Unsigned 16-bit grey, as Pillow opens 16-bit grey PNG/TIFF/JPEG 2000.
_UINT16_MODES = ("I;16", "I;16L", "I;16B", "I;16N")

_SIZE_HINT = "resize it before sending, or build the repository with a larger --max-image-pixels"
_BUDGET_HINT = (
    "send fewer or smaller images per request, or raise the budget: `detserve serve --max-request-pixels N` "
    "(environment DETSERVE_MAX_REQUEST_PIXELS of the server) or `detserve build --max-request-pixels N`"
)


def decode_image(data: bytes, max_pixels: int) -> np.ndarray:
    """Encoded image (JPEG, PNG, ...) -> uint8 array [H, W, 3] in RGB order.

    Grey and palette images become 3 equal/looked-up channels (PIL ``convert("RGB")``); alpha is
    dropped, not composited; 16-bit samples keep their high byte (``v >> 8``, as Pillow itself
    reads 16-bit RGB PNGs); EXIF orientation is *not* applied, as torchvision's ``read_image`` and
    PIL's plain ``open`` do not apply it during training either; only the first frame of an
    animation or multi-page file is used. Anything else raises :class:`ImageError`.
    """
    return load_image(open_image(data, max_pixels), len(data))


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """Read only the header of ``data`` (nothing is decompressed) and check its declared size."""
    if len(data) == 0:
        raise ImageError("empty image payload (0 bytes)")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module=r"PIL\.")  # see load_image
        return _open(data, max_pixels)


def load_image(im: Image.Image, nbytes: int) -> np.ndarray:
    """An image from :func:`open_image` (``nbytes`` encoded) -> uint8 [H, W, 3] RGB: the decoding itself
    (see :func:`decode_image`)."""
    with warnings.catch_warnings():
        # Pillow warns about corrupt metadata (EXIF, TIFF tags) that it then skips; every bad
        # upload would write them to the server log. It also warns below 2x its own pixel limit;
        # ours is applied from the header in _open.
        warnings.filterwarnings("ignore", module=r"PIL\.")
        try:
            im.load()
        except Exception as e:  # truncated or corrupt pixel data
            raise ImageError(f"cannot decode {im.format} pixel data ({nbytes} bytes): {type(e).__name__}: {e}") from e
        return _to_rgb(im)


def open_request_images(blobs: Sequence[bytes], max_pixels: int, max_request_pixels: int) -> list[Image.Image]:
    """Every image of one request, header only, each within ``max_pixels`` and all together within
    ``max_request_pixels`` (the per-request pixel budget), before any of them is decoded.

    Decoding and pre-processing cost time and memory in proportion to the pixels (a 116 KB black
    PNG declares 40 M pixels and costs seconds), so a request's work is bounded by what its headers
    declare, not by its size in bytes.
    """
    opened = []
    for i, blob in enumerate(blobs):
        try:
            opened.append(open_image(blob, max_pixels))
        except ImageError as e:
            raise ImageError(_which(i, len(blobs)) + e.message, hint=e.hint) from e
    total = sum(im.size[0] * im.size[1] for im in opened)
    if total > max_request_pixels:
        raise ImageError(
            f"request declares {total} pixels in its {len(opened)} image(s), over the per-request budget of "
            f"{max_request_pixels} pixels (max_request_pixels); nothing was decoded",
            hint=_BUDGET_HINT,
        )
    return opened


def _which(i: int, n: int) -> str:
    return f"image {i + 1} of {n}: " if n > 1 else ""


def _open(data: bytes, max_pixels: int) -> Image.Image:
    """Read the header only (Pillow decodes nothing before ``load``) and check the declared size."""
    from PIL import Image

    try:
        im = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except Image.DecompressionBombError as e:  # Pillow's own check, past ~179 M pixels
        raise ImageError(f"image declares more pixels than allowed, over the limit of {max_pixels} ({e})", hint=_SIZE_HINT) from e
    except Image.UnidentifiedImageError as e:
        raise ImageError(_unidentified(data), hint=f"send a {', '.join(ACCEPTED_FORMATS)} file") from e
    except Exception as e:  # a recognised format with a corrupt header: OSError, SyntaxError, ...
        raise ImageError(f"not a decodable image ({len(data)} bytes): {type(e).__name__}: {e}") from e
    width, height = im.size
    if width <= 0 or height <= 0:
        raise ImageError(f"{im.format} image declares an empty size {width}x{height}")
    if width * height > max_pixels:
        raise ImageError(
            f"{im.format} image declares {width}x{height} = {width * height} pixels, over the limit of {max_pixels}",
            hint=_SIZE_HINT,
        )
    return im


# File signatures, only to say what an unreadable file looked like (Pillow does not say why it gave up).
_SIGNATURES = {
    b"\x89PNG\r\n\x1a\n": "PNG",
    b"\xff\xd8\xff": "JPEG",
    b"GIF87a": "GIF",
    b"GIF89a": "GIF",
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
    b"BM": "BMP",
}


def _unidentified(data: bytes) -> str:
    kind = next((name for magic, name in _SIGNATURES.items() if data.startswith(magic)), None)
    if kind is None and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        kind = "WEBP"
    if kind is not None:
        return f"not a decodable image ({len(data)} bytes): it starts like {kind}, but its header is invalid or cut short"
    return f"not a decodable image ({len(data)} bytes, starting {data[:8]!r}): not a {', '.join(ACCEPTED_FORMATS)} file"


def _to_rgb(im: Image.Image) -> np.ndarray:
    """A loaded PIL image -> a writable uint8 [H, W, 3] RGB copy (torch refuses read-only buffers)."""
    if im.mode in _UINT16_MODES:
        return _grey16_to_rgb(np.asarray(im))
    if im.mode == "I":
        # 32-bit integer: Pillow's mode for PGM with maxval > 255 (scaled to 0..65535) and for
        # signed or 32-bit TIFF. Only the 16-bit range has a defined 8-bit mapping.
        values = np.asarray(im)
        lo, hi = int(values.min()), int(values.max())
        if lo < 0 or hi > 65535:
            raise ImageError(
                f"{im.format} image has 32-bit integer pixels in {lo}..{hi}, outside 0..65535: no defined 8-bit mapping",
                hint="save it as 8-bit or 16-bit grey or RGB",
            )
        return _grey16_to_rgb(values)
    if im.mode == "F":
        raise ImageError(
            f"{im.format} image has floating-point pixels (mode F): no defined 8-bit mapping",
            hint="save it as 8-bit or 16-bit grey or RGB",
        )
    try:
        rgb = im.convert("RGB")
    except ValueError as e:  # a mode Pillow cannot convert (e.g. premultiplied "La")
        raise ImageError(f"{im.format} image has pixel mode {im.mode!r}, which cannot become RGB: {e}") from e
    return np.array(rgb, dtype=np.uint8)


def _grey16_to_rgb(values: np.ndarray) -> np.ndarray:
    """16-bit grey -> 8-bit RGB by the high byte (``v >> 8``), never by clipping at 255.

    Pillow's own ``convert("RGB")`` clips (every value above 255 becomes white), which destroys a
    16-bit image. The high byte is what Pillow and libpng give for 16-bit RGB and LA PNGs and what
    torchvision's ``convert_image_dtype(uint16 -> uint8)`` computes, so a 16-bit grey image decodes
    exactly like the same image stored as 16-bit RGB.
    """
    grey = (values.astype(np.uint32) >> 8).astype(np.uint8)
    return np.repeat(grey[:, :, None], 3, axis=2)


def check_frame_pixels(n: int, height: int, width: int, max_pixels: int, max_request_pixels: int) -> None:
    """Raw frames (``FRAMES``, [n, height, width, 3]) against the same limits as encoded images' headers:
    each frame within ``max_pixels``, all together within the per-request budget."""
    if height * width > max_pixels:
        raise ImageError(f"frame of {width}x{height} = {width * height} pixels, over the limit of {max_pixels}", hint=_SIZE_HINT)
    if n * height * width > max_request_pixels:
        raise ImageError(
            f"request holds {n * height * width} pixels in its {n} frame(s), over the per-request budget of "
            f"{max_request_pixels} pixels (max_request_pixels); nothing was pre-processed",
            hint=_BUDGET_HINT,
        )
