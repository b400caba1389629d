"""The results file of a bulk run: JSON Lines, one line per image, and the run's sidecar.

A line is either a result or a permanent failure of that file::

    {"path": "a/b.jpg", "bytes": 48213, "width": 640, "height": 480, "model": "shapes", "model_version": "1",
     "detections": [{"label": 1, "class": "circle", "score": 0.93, "box": [x1, y1, x2, y2]}, ...]}
    {"path": "a/broken.png", "bytes": 0, "model": "shapes", "model_version": "1", "error": "empty image payload (0 bytes)"}

``path`` is relative to the run's image folder (POSIX separators); boxes are in the original
image's pixels. The sidecar ``<results>.run.json`` says which folder, model, URL and class names
the lines belong to; mining and pre-labelling read it. Each line is written with one ``write`` to an
append-only file, so a killed run leaves at most one cut-short last line, which readers ignore and
a resumed run cuts off before appending.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from detserve.errors import DetserveError

BACKGROUND_NAMES = ("__background__", "background")


def sidecar(results: Path) -> Path:
    return results.with_name(results.name + ".run.json")


@dataclass(frozen=True)
class RunInfo:
    """What a results file was made from (the sidecar)."""

    images: str  # the image folder, absolute
    model: str
    url: str
    class_names: dict[int, str]
    class_source: str  # where the names came from (--classes, the repository's spec, the checkpoint's sidecar, none)
    score_threshold: float | None = None
    max_det: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "images": self.images, "model": self.model, "url": self.url,
            "class_names": {str(k): v for k, v in sorted(self.class_names.items())}, "class_source": self.class_source,
            "score_threshold": self.score_threshold, "max_det": self.max_det, **self.extra,
        }  # fmt: skip

    @classmethod
    def read(cls, results: Path) -> RunInfo:
        path = sidecar(results)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError as e:
            raise DetserveError(
                f"no run record {path} beside {results}", hint="results files are written by `detserve run`"
            ) from e
        except (OSError, ValueError) as e:
            raise DetserveError(f"cannot read the run record {path}: {e}") from e
        known = {"images", "model", "url", "class_names", "class_source", "score_threshold", "max_det"}
        return cls(
            images=data["images"], model=data["model"], url=data["url"],
            class_names={int(k): str(v) for k, v in data.get("class_names", {}).items()},
            class_source=data.get("class_source", "none"), score_threshold=data.get("score_threshold"),
            max_det=data.get("max_det"), extra={k: v for k, v in data.items() if k not in known},
        )  # fmt: skip

    def class_name(self, label: int) -> str:
        return self.class_names.get(label, f"class_{label}")


def read_records(results: Path) -> Iterator[dict[str, Any]]:
    """Every complete line of a results file, streamed. A cut-short last line (a killed run) is skipped.

    Safe while ``detserve run`` is still appending: only lines that end in a newline are read.
    """
    if not results.is_file():
        raise DetserveError(f"results file not found: {results}", hint="write one with `detserve run`")
    with results.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.endswith(b"\n"):
                return  # the last line of a killed (or still running) run
            try:
                record = json.loads(raw)
            except ValueError as e:
                raise DetserveError(f"{results}: line {number} is not JSON ({e})", hint="was the file edited by hand?") from e
            if not isinstance(record, dict) or "path" not in record:
                raise DetserveError(f"{results}: line {number} is not a result record (no 'path')")
            yield record


def repair_tail(results: Path) -> int:
    """Cut a last line without its newline (a killed run); returns the bytes removed."""
    size = results.stat().st_size
    if size == 0:
        return 0
    with results.open("rb+") as f:
        # walk back from the end to the last newline, in blocks: the file may be gigabytes
        pos, block = size, 1 << 16
        while pos > 0:
            start = max(0, pos - block)
            f.seek(start)
            chunk = f.read(pos - start)
            cut = chunk.rfind(b"\n")
            if cut >= 0:
                keep = start + cut + 1
                break
            pos = start
        else:
            keep = 0
        if keep < size:
            f.truncate(keep)
    return size - keep


class ResultWriter:
    """Appends one line per image with a single ``os.write`` (no user-space buffer a kill could lose)."""

    def __init__(self, results: Path, fsync_every_s: float = 5.0) -> None:
        import time

        self._clock = time.monotonic
        self._fd = os.open(results, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._fsync_every_s = fsync_every_s
        self._synced = self._clock()

    def write(self, record: dict[str, Any]) -> None:
        line = (json.dumps(record, separators=(",", ":")) + "\n").encode()
        view = memoryview(line)
        while view:  # os.write may write less than asked (signals, full pipes); never leave a half line behind us
            view = view[os.write(self._fd, view) :]
        if self._clock() - self._synced > self._fsync_every_s:
            os.fsync(self._fd)  # survive a machine crash too, not only a killed process
            self._synced = self._clock()

    def close(self) -> None:
        os.fsync(self._fd)
        os.close(self._fd)

    def __enter__(self) -> ResultWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def detections_of(record: dict[str, Any], min_score: float = 0.0) -> list[dict[str, Any]]:
    """A record's detections at or above ``min_score`` (none for a failure line)."""
    return [d for d in record.get("detections") or () if float(d["score"]) >= min_score]


def is_background(name: str) -> bool:
    return name.strip().lower() in BACKGROUND_NAMES
