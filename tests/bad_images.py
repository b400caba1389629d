"""Bad inputs shared by the unit and integration tests."""

from __future__ import annotations

import io
import struct
import zlib

from PIL import Image


def png_bytes(width: int = 64, height: int = 48, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (width, height), color=(90, 120, 200) if mode == "RGB" else 128).save(buf, format="PNG")
    return buf.getvalue()


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny PNG whose header declares a huge size: decoding it would need ~30 GB."""
    data = bytearray(png_bytes(8, 8))
    # IHDR chunk: 8-byte signature, 4-byte length, b"IHDR", then width/height (big-endian)
    ihdr = data[12:29]
    assert ihdr[:4] == b"IHDR"
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)) & 0xFFFFFFFF)
    return bytes(data)


def truncated_jpeg(full: bytes) -> bytes:
    return full[: len(full) // 2]


NOT_AN_IMAGE = b"this is not an image, it is a text file\n" * 10
