"""``detserve check-images``: which files of a folder the server would refuse, or should not train on.

Every file is decoded with the server's own function (``detserve.runtime.imaging.decode_image``: the
same accepted formats, the same pixel limit read from the header, the same truncation errors), so a
file this check passes is one the server decodes. Problems:

- ``empty`` (0 bytes), ``truncated`` (header fine, pixel data cut short or corrupt),
  ``undecodable`` (not an image, or a header no decoder accepts), ``unlisted-format`` (an image
  Pillow knows but the server does not accept: ICO, PSD, ...), ``bomb`` (declares more pixels than
  ``max_pixels``), ``small`` (a side below ``min_side``), ``duplicate`` (same bytes as an earlier
  file, by sha256), ``near-duplicate`` (optional: a 64-bit difference hash within ``phash_distance``
  bits of an earlier file's).

``move_to`` moves the broken files and the later copies of duplicates aside (keeping relative
paths) and writes ``manifest.jsonl`` there; ``small`` and ``near-duplicate`` are only reported
(judgement calls). Nothing is ever deleted.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from detserve.errors import DetserveError, ImageError

# Suffixes checked by default: the server's formats and other image files that turn up in datasets.
CHECKED_SUFFIXES = (
    ".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".pnm",
    ".ico", ".psd", ".heic", ".heif", ".avif", ".jp2", ".j2k", ".tga", ".pcx", ".dds", ".eps", ".svg",
)  # fmt: skip
MOVED_KINDS = ("empty", "truncated", "undecodable", "unlisted-format", "bomb", "duplicate")
DEFAULT_MAX_PIXELS = 40_000_000  # PreprocessSpec.max_image_pixels' default: what a repository built without the option refuses


@dataclass(frozen=True)
class Problem:
    path: str
    kind: str
    detail: str


@dataclass
class CheckReport:
    root: Path
    checked: int = 0
    problems: list[Problem] = field(default_factory=list)
    moved: list[str] = field(default_factory=list)
    manifest: Path | None = None

    @property
    def counts(self) -> Counter[str]:
        return Counter(p.kind for p in self.problems)

    @property
    def broken(self) -> int:
        """Files the server would refuse, or copies: the ones worth moving aside."""
        return sum(1 for p in self.problems if p.kind in MOVED_KINDS)

    def to_dict(self) -> dict[str, object]:
        return {
            "root": str(self.root), "checked": self.checked, "counts": dict(self.counts),
            "problems": [p.__dict__ for p in self.problems], "moved": self.moved,
            "manifest": str(self.manifest) if self.manifest else None,
        }  # fmt: skip


def check_images(
    root: Path,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_side: int = 32,
    near_duplicates: bool = False,
    phash_distance: int = 4,
    all_files: bool = False,
    move_to: Path | None = None,
) -> CheckReport:
    """Check every image file under ``root`` (streamed); optionally move the broken ones aside."""
    if not root.is_dir():
        raise DetserveError(f"image folder not found: {root}")
    if move_to is not None and move_to.resolve().is_relative_to(root.resolve()):
        raise DetserveError(f"--move-to {move_to} is inside {root}", hint="move files aside to a folder outside the one checked")
    if not 0 <= phash_distance <= 16:
        raise DetserveError(f"--phash-distance must be in 0..16 bits, got {phash_distance}")
    if max_pixels < 1:  # 0 would report every image as a decompression bomb
        raise DetserveError(f"--max-pixels must be at least 1, got {max_pixels}")
    if min_side < 0:
        raise DetserveError(f"--min-side must be at least 0, got {min_side}", hint="0 flags no image as small")
    report = CheckReport(root)
    hashes: dict[str, str] = {}
    near = NearDuplicateIndex(phash_distance) if near_duplicates else None
    for path in _files(root, all_files):
        rel = path.relative_to(root).as_posix()
        report.checked += 1
        report.problems += check_file(path, rel, max_pixels, min_side, hashes, near)
    if move_to is not None:
        _move_aside(report, move_to)
    return report


def check_file(
    path: Path, rel: str, max_pixels: int, min_side: int, hashes: dict[str, str], near: NearDuplicateIndex | None
) -> list[Problem]:
    from detserve.runtime.imaging import decode_image

    try:
        data = path.read_bytes()
    except OSError as e:
        return [Problem(rel, "undecodable", f"cannot read: {e.strerror or e}")]
    if not data:
        return [Problem(rel, "empty", "0 bytes")]
    digest = hashlib.sha256(data).hexdigest()
    if digest in hashes:
        return [Problem(rel, "duplicate", f"same bytes as {hashes[digest]} (sha256 {digest[:12]})")]
    hashes[digest] = rel
    try:
        rgb = decode_image(data, max_pixels)
    except ImageError as e:
        kind = classify(e, data)
        if kind == "unlisted-format":
            from detserve.runtime.imaging import ACCEPTED_FORMATS

            return [Problem(rel, kind, f"a {_pillow_format(data)} file; the server accepts {', '.join(ACCEPTED_FORMATS)}")]
        return [Problem(rel, kind, e.message)]
    out = []
    height, width = rgb.shape[:2]
    if min(width, height) < min_side:
        out.append(Problem(rel, "small", f"{width}x{height}, a side below {min_side} px"))
    if near is not None:
        match = near.add(rel, dhash(rgb))
        if match is not None:
            out.append(Problem(rel, "near-duplicate", f"difference hash within {match[1]} bits of {match[0]}"))
    return out


def classify(error: ImageError, data: bytes) -> str:
    """The kind of a decode failure, from what ``decode_image`` checked (its messages name each limit)."""
    message = error.message
    if "over the limit" in message:
        return "bomb"
    if message.startswith("cannot decode"):
        return "truncated"  # the header was read; the pixel data is cut short or corrupt
    if _pillow_format(data) is not None:
        return "unlisted-format"
    return "undecodable"


def _pillow_format(data: bytes) -> str | None:
    """The format Pillow recognises with *all* its openers (the server tries only its accepted list)."""
    import io

    from PIL import Image

    from detserve.runtime.imaging import ACCEPTED_FORMATS

    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.format if im.format not in ACCEPTED_FORMATS else None
    except Exception:  # any opener's failure means: not an image Pillow knows either
        return None


def dhash(rgb: object) -> int:
    """64-bit difference hash: a 9x8 grey thumbnail, one bit per horizontal neighbour comparison."""
    import numpy as np
    from PIL import Image

    grey = Image.fromarray(np.asarray(rgb)).convert("L").resize((9, 8), Image.Resampling.BILINEAR)
    pixels = np.asarray(grey, dtype=np.int16)
    bits = (pixels[:, 1:] > pixels[:, :-1]).flatten()
    return int("".join("1" if b else "0" for b in bits), 2)


class NearDuplicateIndex:
    """Hamming-distance lookup without comparing all pairs: split the 64 bits into ``d + 1`` chunks;
    two hashes within ``d`` bits agree exactly on at least one chunk (pigeonhole), so only hashes
    sharing a chunk are compared."""

    def __init__(self, distance: int) -> None:
        self.distance = distance
        parts = distance + 1
        edges = [round(64 * i / parts) for i in range(parts + 1)]
        self.chunks = list(itertools.pairwise(edges))
        self.buckets: list[dict[int, list[tuple[int, str]]]] = [{} for _ in self.chunks]

    def add(self, name: str, h: int) -> tuple[str, int] | None:
        """Index ``h``; the nearest earlier hash within the distance (name, bits), if any."""
        best: tuple[str, int] | None = None
        keys = [(h >> lo) & ((1 << (hi - lo)) - 1) for lo, hi in self.chunks]
        for bucket, key in zip(self.buckets, keys, strict=True):
            for other, other_name in bucket.get(key, ()):
                bits = bin(h ^ other).count("1")
                if bits <= self.distance and (best is None or bits < best[1]):
                    best = (other_name, bits)
        for bucket, key in zip(self.buckets, keys, strict=True):
            bucket.setdefault(key, []).append((h, name))
        return best


def _files(root: Path, all_files: bool) -> Iterator[Path]:
    for folder, dirs, names in os.walk(root):
        dirs.sort()
        for name in sorted(names):
            path = Path(folder) / name
            if path.is_file() and not path.is_symlink() and (all_files or path.suffix.lower() in CHECKED_SUFFIXES):
                yield path


def _move_aside(report: CheckReport, move_to: Path) -> None:
    """Move each broken file (once, with all its reasons) to ``move_to``; a manifest line per file. Never deletes."""
    reasons: dict[str, list[str]] = {}
    for p in report.problems:
        if p.kind in MOVED_KINDS:
            reasons.setdefault(p.path, []).append(f"{p.kind}: {p.detail}")
    move_to.mkdir(parents=True, exist_ok=True)
    report.manifest = move_to / "manifest.jsonl"
    with report.manifest.open("a") as f:
        for rel, why in reasons.items():
            source, dest = report.root / rel, move_to / rel
            if dest.exists():
                raise DetserveError(f"{dest} exists: not overwriting it", hint="move aside into an empty folder")
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(source, dest)
            f.write(json.dumps({"path": rel, "from": str(source), "to": str(dest), "reasons": why}) + "\n")
            report.moved.append(rel)
