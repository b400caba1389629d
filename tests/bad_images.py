"""Bad and unusual inputs shared by the unit and integration tests (docs/inputs.md lists the policy)."""

from __future__ import annotations

import io
import random
import struct
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image


def encode(im: Image.Image, fmt: str, **save: Any) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **save)
    return buf.getvalue()


def png_bytes(width: int = 64, height: int = 48, mode: str = "RGB") -> bytes:
    return encode(Image.new(mode, (width, height), color=(90, 120, 200) if mode == "RGB" else 128), "PNG")


def gradient(width: int = 64, height: int = 48, seed: int = 0) -> np.ndarray:
    """uint8 [H, W, 3]: ramps plus noise, so every decoder has real work (and JPEG real detail)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256], axis=-1)
    return np.clip(base + rng.integers(-20, 21, base.shape), 0, 255).astype(np.uint8)


def of_mode(mode: str, fmt: str = "PNG", width: int = 64, height: int = 48, **save: Any) -> bytes:
    """A gradient image converted to ``mode`` by Pillow and saved as ``fmt``."""
    return encode(Image.fromarray(gradient(width, height)).convert(mode), fmt, **save)


def png16(values: np.ndarray) -> bytes:
    """A 16-bit PNG written by hand: grey from [H, W], RGB from [H, W, 3] (Pillow cannot write 16-bit RGB)."""
    values = np.asarray(values, dtype=np.uint16)
    h, w = values.shape[:2]
    colour_type = 2 if values.ndim == 3 else 0
    rows = values.reshape(h, -1).astype(">u2")
    raw = b"".join(b"\x00" + rows[y].tobytes() for y in range(h))
    ihdr = struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(raw)) + _chunk(b"IEND", b"")


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def pgm16(values: Sequence[int], maxval: int = 65535) -> bytes:
    """A one-row 16-bit PGM (Pillow opens it as 32-bit mode "I", scaled to 0..65535)."""
    return f"P5 {len(values)} 1 {maxval}\n".encode() + np.asarray(values, dtype=">u2").tobytes()


def cmyk_jpeg(cmyk: tuple[int, int, int, int] = (0, 255, 255, 0), width: int = 16, height: int = 16) -> bytes:
    return encode(Image.new("CMYK", (width, height), cmyk), "JPEG", quality=95)


def palette_png(transparent_index: int | None = None) -> bytes:
    """A 4x4 palette image: left half index 1 (10, 20, 30), right half index 2 (200, 100, 50)."""
    im = Image.new("P", (4, 4), 1)
    im.paste(2, (2, 0, 4, 4))
    im.putpalette([0, 0, 0, 10, 20, 30, 200, 100, 50] + [0] * (768 - 9))
    return encode(im, "PNG", **({} if transparent_index is None else {"transparency": transparent_index}))


def exif_rotated_jpeg(width: int = 40, height: int = 20, orientation: int = 6) -> bytes:
    """A landscape JPEG whose EXIF says "rotate 90° clockwise to display" (orientation 6)."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(Image.fromarray(gradient(width, height)), "JPEG", exif=exif, quality=95)


def mpo_jpeg() -> bytes:
    """A two-picture MPO (how many phones store photos); Pillow opens it through its JPEG opener."""
    first, second = Image.fromarray(gradient(32, 24, seed=1)), Image.fromarray(gradient(32, 24, seed=2))
    return encode(first, "MPO", save_all=True, append_images=[second], quality=95)


def animated_gif() -> bytes:
    frames = [Image.new("P", (8, 8), i) for i in range(3)]
    for f in frames:
        f.putpalette([v % 256 for v in range(768)])
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:])


# --- declared-size bombs: a few hundred bytes whose header claims a huge picture -------------------


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


def bomb_jpeg(width: int, height: int) -> bytes:
    """An 8x8 JPEG with its SOF0 size patched: libjpeg would happily decode it to a grey canvas."""
    data = bytearray(encode(Image.fromarray(gradient(8, 8)), "JPEG"))
    sof = data.find(b"\xff\xc0")  # marker, length (2), precision (1), height (2), width (2)
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def bomb_gif(width: int, height: int) -> bytes:
    """An 8x8 GIF whose logical screen (bytes 6..9, little-endian) declares ``width`` x ``height``."""
    data = bytearray(encode(Image.new("L", (8, 8), 3), "GIF"))
    data[6:10] = struct.pack("<HH", width, height)
    return bytes(data)


def tiff_grey(width: int, height: int, pixels: bytes | None = None) -> bytes:
    """An uncompressed 8-bit grey TIFF written by hand, one strip; ``pixels`` may be shorter than declared."""
    pixels = bytes(width * height) if pixels is None else pixels
    entries = [(256, 4, width), (257, 4, height), (258, 3, 8), (259, 3, 1), (262, 3, 1)]
    entries += [(273, 4, -1), (277, 3, 1), (278, 4, height), (279, 4, len(pixels))]
    data_offset = 8 + 2 + 12 * len(entries) + 4
    out = b"II*\x00" + struct.pack("<IH", 8, len(entries))
    for tag, kind, value in entries:
        value = data_offset if value == -1 else value
        out += struct.pack("<HHI", tag, kind, 1) + (struct.pack("<HH", value, 0) if kind == 3 else struct.pack("<I", value))
    return out + b"\x00" * 4 + pixels


def bomb_tiff(width: int, height: int) -> bytes:
    return tiff_grey(width, height, pixels=bytes(16))


def bomb_webp(width: int, height: int) -> bytes:
    """An 8x8 lossless WebP with its VP8L header (14-bit width-1, height-1) patched."""
    data = bytearray(encode(Image.fromarray(gradient(8, 8)), "WEBP", lossless=True))
    at = data.find(b"VP8L") + 9  # chunk tag, chunk size, signature byte 0x2f
    bits = struct.unpack("<I", data[at : at + 4])[0] & ~((1 << 28) - 1)
    bits |= ((width - 1) & 0x3FFF) | (((height - 1) & 0x3FFF) << 14)
    data[at : at + 4] = struct.pack("<I", bits)
    return bytes(data)


def truncated_jpeg(full: bytes) -> bytes:
    return full[: len(full) // 2]


NOT_AN_IMAGE = b"this is not an image, it is a text file\n" * 10
EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"  # Pillow knows it; we do not accept it


def unusual_images() -> dict[str, bytes]:
    """Unusual but valid inputs: each must decode, and the server's tensor must equal the reference's."""
    ramp16 = (np.arange(48 * 64, dtype=np.uint32).reshape(48, 64) * 21).astype(np.uint16)
    return {
        "grey L png": of_mode("L"),
        "grey L jpeg": of_mode("L", "JPEG"),
        "LA png": of_mode("LA"),
        "RGBA png": of_mode("RGBA"),
        "1-bit png": of_mode("1"),
        "16-bit grey png": png16(ramp16),
        "16-bit rgb png": png16(np.stack([ramp16, ramp16[::-1], ramp16[:, ::-1]], axis=-1)),
        "CMYK jpeg": cmyk_jpeg(),
        "palette png": palette_png(),
        "palette png with transparency": palette_png(transparent_index=1),
        "EXIF-rotated jpeg": exif_rotated_jpeg(),
        "MPO jpeg": mpo_jpeg(),
        "animated gif": animated_gif(),
        "grey tiff": tiff_grey(8, 6, bytes(range(48))),
        "16-bit pgm": pgm16([0, 300, 65535]),
        "webp": of_mode("RGB", "WEBP"),
        "bmp": of_mode("RGB", "BMP"),
        "progressive jpeg": of_mode("RGB", "JPEG", progressive=True),
        "1x1 png": png_bytes(1, 1),
    }


# --- mutation for fuzzing: deterministic operations, shared by the hypothesis and the live-server fuzz ---

Mutation = tuple[str, int, int]  # (operation, position seed, value seed)
OPERATIONS = ("flip", "set", "insert", "delete", "truncate", "duplicate", "int32")
_INTERESTING = (0, 1, 0x7F, 0x80, 0xFF, 0xFFFF, 0x10000, 0x7FFFFFFF, 0xFFFFFFFF)


def _apply(data: bytearray, op: str, pos_seed: int, value: int) -> bytearray:
    if not data:
        return data
    pos = pos_seed % len(data)
    if op == "flip":
        data[pos] ^= (value % 255) + 1
    elif op == "set":
        data[pos] = value % 256
    elif op == "insert":
        data[pos:pos] = bytes([value % 256]) * (1 + value % 7)
    elif op == "delete":
        del data[pos : pos + 1 + value % 16]
    elif op == "truncate":
        del data[pos:]
    elif op == "duplicate":
        data[pos:pos] = data[pos : pos + 1 + value % 64]
    elif op == "int32":
        data[pos : pos + 4] = struct.pack(">I", _INTERESTING[value % len(_INTERESTING)])
    return data


def fix_png_crcs(data: bytes) -> bytes:
    """Recompute every PNG chunk CRC, so a mutation reaches the decoder instead of the CRC check."""
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        return data
    out, at = bytearray(data), 8
    while at + 12 <= len(out):
        length = struct.unpack(">I", out[at : at + 4])[0]
        end = at + 8 + length
        if end + 4 > len(out):
            break
        out[end : end + 4] = struct.pack(">I", zlib.crc32(bytes(out[at + 4 : end])) & 0xFFFFFFFF)
        at = end + 4
    return bytes(out)


def mutate(seed: bytes, mutations: Sequence[Mutation], fix_crc: bool = False) -> bytes:
    data = bytearray(seed)
    for op, pos, value in mutations:
        data = _apply(data, op, pos, value)
    return fix_png_crcs(bytes(data)) if fix_crc else bytes(data)


def random_mutations(rng: random.Random, max_ops: int = 4) -> list[Mutation]:
    return [(rng.choice(OPERATIONS), rng.getrandbits(32), rng.getrandbits(32)) for _ in range(rng.randint(1, max_ops))]


def fuzz_seeds() -> dict[str, bytes]:
    """Small valid files of each accepted format and common mode: mutating them reaches deep into the decoders."""
    return {
        "rgb png": of_mode("RGB"),
        "grey png": of_mode("L"),
        "rgba png": of_mode("RGBA"),
        "palette png": of_mode("P", transparency=3),
        "png, no compression": of_mode("RGB", "PNG", compress_level=0),
        "16-bit grey png": png16(gradient()[..., 0].astype(np.uint16) * 257),
        "16-bit rgb png": png16(gradient().astype(np.uint16) * 257),
        "jpeg": of_mode("RGB", "JPEG"),
        "progressive jpeg": of_mode("RGB", "JPEG", progressive=True),
        "grey jpeg": of_mode("L", "JPEG"),
        "cmyk jpeg": of_mode("CMYK", "JPEG"),
        "exif jpeg": exif_rotated_jpeg(),
        "gif": of_mode("P", "GIF"),
        "tiff lzw": of_mode("RGB", "TIFF", compression="tiff_lzw"),
        "tiff raw": tiff_grey(16, 12, bytes(range(192))),
        "bmp": of_mode("RGB", "BMP"),
        "webp": of_mode("RGB", "WEBP"),
        "webp lossless": of_mode("RGBA", "WEBP", lossless=True),
        "pgm16": pgm16(list(range(0, 65535, 4096))),
    }


def png_and_jpeg_seeds(samples: dict[str, bytes]) -> dict[str, bytes]:
    """The live-server fuzz: small PNG/JPEG seeds plus one real photograph."""
    seeds = {k: v for k, v in fuzz_seeds().items() if "png" in k or "jpeg" in k}
    seeds["astronaut.jpg"] = samples["astronaut.jpg"]
    return seeds
