"""``detserve mine``: pick images from a results file by rules, copy or link them out with a manifest.

Rules (an image is picked when *any* rule matches; the manifest says which ones did):

- ``band``: a class's best score lies in ``[lo, hi]`` (the model is unsure about that class; a
  class with no detection has best score 0). Without a class: any class's best score.
- ``empty``: no detection at or above the object floor (``min_score``).
- ``more_than``: more than N detections at or above the floor.
- ``overlap``: a detection of class A and one of class B, both above the floor, with IoU >= t
  (the model cannot decide between the two, or they really occlude).

Sampling is seeded and independent of the file's line order (a bulk run writes lines in completion
order): each picked path gets a priority from ``sha256(seed, path)`` and the ``limit`` lowest are
kept, in memory bounded by ``limit``. Reads results while ``detserve run`` is still writing them.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import os
import re
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from detserve.errors import DetserveError
from detserve.jobs.results import RunInfo, detections_of, read_records

MODES = ("copy", "symlink", "hardlink")


@dataclass(frozen=True)
class Band:
    lo: float
    hi: float
    cls: str | None = None

    def reasons(self, record: dict[str, Any], floor: float) -> list[str]:
        best: dict[str, float] = {}
        for d in detections_of(record):
            best[d["class"]] = max(best.get(d["class"], 0.0), float(d["score"]))
        classes = [self.cls] if self.cls is not None else sorted(best)
        return [
            f"{c} best score {best.get(c, 0.0):.3f} in [{self.lo}, {self.hi}]"
            for c in classes
            if self.lo <= best.get(c, 0.0) <= self.hi
        ]


@dataclass(frozen=True)
class Empty:
    def reasons(self, record: dict[str, Any], floor: float) -> list[str]:
        return [f"no detection >= {floor}"] if not detections_of(record, floor) else []


@dataclass(frozen=True)
class MoreThan:
    n: int

    def reasons(self, record: dict[str, Any], floor: float) -> list[str]:
        count = len(detections_of(record, floor))
        return [f"{count} detections >= {floor} (more than {self.n})"] if count > self.n else []


@dataclass(frozen=True)
class Overlap:
    a: str
    b: str
    iou: float = 0.5

    def reasons(self, record: dict[str, Any], floor: float) -> list[str]:
        dets = detections_of(record, floor)
        first = [d for d in dets if d["class"] == self.a]
        second = [d for d in dets if d["class"] == self.b]
        best = max((box_iou(x["box"], y["box"]) for x in first for y in second if x is not y), default=0.0)
        return [f"{self.a} and {self.b} overlap, IoU {best:.2f} >= {self.iou}"] if best >= self.iou else []


Rule = Band | Empty | MoreThan | Overlap


def box_iou(a: list[float], b: list[float]) -> float:
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


_NUMBER = r"(\d+(?:\.\d*)?|\.\d+)"


def parse_band(text: str) -> Band:
    """'0.2-0.5' or 'circle:0.2-0.5'."""
    cls, _, band = text.rpartition(":")
    m = re.fullmatch(rf"{_NUMBER}-{_NUMBER}", band.strip())
    if not m or not float(m[1]) <= float(m[2]) <= 1.0:
        raise DetserveError(f"--band {text!r}: expected [CLASS:]LO-HI with 0 <= LO <= HI <= 1", hint="e.g. --band car:0.2-0.5")
    return Band(float(m[1]), float(m[2]), cls.strip() or None)


def parse_overlap(text: str) -> Overlap:
    """'a,b' or 'a,b:0.3' (IoU threshold, default 0.5)."""
    pair, _, iou = text.partition(":")
    names = [n.strip() for n in pair.split(",")]
    try:
        threshold = float(iou) if iou else 0.5
    except ValueError:
        threshold = -1.0
    if len(names) != 2 or not all(names) or not 0.0 < threshold <= 1.0:
        raise DetserveError(
            f"--overlap {text!r}: expected CLASS_A,CLASS_B[:IOU] with 0 < IOU <= 1", hint="e.g. --overlap car,truck:0.5"
        )
    return Overlap(names[0], names[1], threshold)


@dataclass
class MineSummary:
    out: Path
    scanned: int = 0
    matched: int = 0
    picked: int = 0
    by_rule: Counter[str] = field(default_factory=Counter)
    manifest: Path | None = None


def mine(
    results: Path,
    out: Path,
    rules: list[Rule],
    *,
    min_score: float = 0.3,
    limit: int | None = None,
    seed: int = 0,
    mode: str = "copy",
    images: Path | None = None,
) -> MineSummary:
    """Pick images by ``rules``, put them (copy/symlink/hardlink) under ``out`` keeping their relative paths."""
    if not rules:
        raise DetserveError("no rule given", hint="use --band, --empty, --more-than or --overlap")
    if mode not in MODES:
        raise DetserveError(f"--mode {mode!r}: choose one of {', '.join(MODES)}")
    if limit is not None and limit < 1:
        raise DetserveError(f"--limit must be >= 1, got {limit}")
    if not 0.0 <= min_score <= 1.0:  # a score is in 0..1: above 1 every image would be "empty"
        raise DetserveError(f"--min-score must be in 0..1, got {min_score:g}")
    manifest = out / "manifest.jsonl"
    if manifest.exists():
        raise DetserveError(f"{manifest} exists: {out} already holds a mined set", hint="choose another --out")
    root = images or Path(RunInfo.read(results).images)
    summary = MineSummary(out)
    kept: list[tuple[int, str, dict[str, Any]]] = []  # max-heap by priority (negated) of size limit
    for record in read_records(results):
        summary.scanned += 1
        if "error" in record:
            continue
        reasons = [(type(rule).__name__.lower(), r) for rule in rules for r in rule.reasons(record, min_score)]
        if not reasons:
            continue
        summary.matched += 1
        summary.by_rule.update({name for name, _ in reasons})
        entry = {"path": record["path"], "reasons": [r for _, r in reasons], "detections": len(detections_of(record, min_score))}
        priority = _priority(seed, str(record["path"]))
        heapq.heappush(kept, (-priority, str(record["path"]), entry))
        if limit is not None and len(kept) > limit:
            heapq.heappop(kept)
    out.mkdir(parents=True, exist_ok=True)
    entries = sorted((e for _, _, e in kept), key=lambda e: str(e["path"]))
    with manifest.open("w") as f:
        for entry in entries:
            source, dest = root / entry["path"], out / entry["path"]
            _place(source, dest, mode)
            f.write(json.dumps({**entry, "source": str(source), "dest": str(dest), "mode": mode}) + "\n")
    summary.picked, summary.manifest = len(entries), manifest
    return summary


def _priority(seed: int, path: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}\0{path}".encode()).digest()[:8], "big")


def _place(source: Path, dest: Path, mode: str) -> None:
    if not source.is_file():
        raise DetserveError(f"image {source} is gone", hint="give the folder the images are in now with --images")
    dest.parent.mkdir(parents=True, exist_ok=True)
    if mode == "copy":
        shutil.copy2(source, dest)
    elif mode == "symlink":
        dest.symlink_to(source.resolve())
    else:
        os.link(source, dest)
