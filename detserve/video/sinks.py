"""Where answered frames go: per-frame JSON Lines, an annotated video per stream (PyAV), and the
newest annotated JPEG per stream for the live view.

Every sink is fed in frame order by the stream's own output thread, so a sink never sees a frame
twice or out of order, and a slow sink slows only its own stream (it holds the stream's slots).
"""

from __future__ import annotations

import json
import threading
from fractions import Fraction
from pathlib import Path
from typing import IO, Any

import numpy as np

from clients.draw import PALETTE  # a frame drawn here looks like `detserve detect --draw`
from clients.grpc_client import Detections
from clients.labels import name_of
from detserve.errors import ClientError


def annotate(rgb: np.ndarray, det: Detections, names: list[str], tracks: list[int] | None = None) -> np.ndarray:
    """``rgb`` with masks (where the model has them), boxes, class names and track ids drawn on a copy."""
    from PIL import Image, ImageDraw

    pixels = rgb
    if det.masks is not None and len(det):
        from clients.masks import paste_masks

        pixels = rgb.astype(np.float32)
        for mask, box, label in zip(det.masks, det.boxes, det.labels, strict=True):
            inside = paste_masks(mask[None], box[None], (pixels.shape[0], pixels.shape[1]), threshold=0.5)[0]
            pixels[inside] = 0.55 * pixels[inside] + 0.45 * np.array(PALETTE[int(label) % len(PALETTE)], np.float32)
        pixels = pixels.round().clip(0, 255).astype(np.uint8)
    canvas = Image.fromarray(pixels)
    pen = ImageDraw.Draw(canvas)
    width = max(1, round(max(canvas.size) / 300))
    for i, (box, score, label) in enumerate(zip(det.boxes, det.scores, det.labels, strict=True)):
        colour = PALETTE[int(label) % len(PALETTE)]
        x1, y1, x2, y2 = (float(v) for v in box)
        pen.rectangle((x1, y1, x2, y2), outline=colour, width=width)
        track = f"#{tracks[i]} " if tracks is not None and tracks[i] >= 0 else ""
        text = f"{track}{name_of(names, int(label))} {float(score):.2f}"
        tx, ty = x1, max(0.0, y1 - 11)
        pen.rectangle(pen.textbbox((tx, ty), text), fill=colour)
        pen.text((tx, ty), text, fill=(0, 0, 0))
    return np.asarray(canvas)


def detections_json(det: Detections, names: list[str], tracks: list[int] | None) -> list[dict[str, Any]]:
    return [
        {
            "box": [round(float(v), 2) for v in det.boxes[i]],
            "score": round(float(det.scores[i]), 5),
            "label": int(det.labels[i]),
            "class": name_of(names, int(det.labels[i])),
            "track": None if tracks is None or tracks[i] < 0 else int(tracks[i]),
        }
        for i in range(len(det))
    ]


class JsonlSink:
    """One JSON object per answered (or failed) frame, all streams in one file, flushed per line."""

    def __init__(self, path: Path) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file: IO[str] = path.open("w", encoding="utf-8")
        except OSError as e:
            raise ClientError(f"cannot write {path}: {e.strerror or e}") from e
        self._lock = threading.Lock()

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, separators=(",", ":"))
        with self._lock:
            self._file.write(line + "\n")
            self._file.flush()

    def close(self) -> None:
        with self._lock:
            self._file.close()


class VideoSink:
    """An annotated MP4 per stream. Codec: FFmpeg's own MPEG-4 part 2 encoder (LGPL, like the rest of
    the FFmpeg in PyAV's wheel; libx264 there is GPL): readable by FFmpeg/PyAV/VLC, not by browsers."""

    def __init__(self, path: Path, rate: float | None) -> None:
        self.path = path
        self.rate = Fraction(rate or 25.0).limit_denominator(1001)
        self._container: Any = None
        self._stream: Any = None
        self.frames = 0

    def write(self, rgb: np.ndarray) -> None:
        import av

        if self._container is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._container = av.open(str(self.path), mode="w")
            self._stream = self._container.add_stream("mpeg4", rate=self.rate)
            # yuv420p needs even sizes; the picture is cropped by at most one pixel row/column
            self._stream.width, self._stream.height = rgb.shape[1] // 2 * 2, rgb.shape[0] // 2 * 2
            self._stream.pix_fmt = "yuv420p"
            self._stream.bit_rate = 4_000_000
        h, w = self._stream.height, self._stream.width
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb[:h, :w]), format="rgb24")
        for packet in self._stream.encode(frame):
            self._container.mux(packet)
        self.frames += 1

    def close(self) -> None:
        if self._container is not None:
            for packet in self._stream.encode():
                self._container.mux(packet)
            self._container.close()
            self._container = None


class LatestJpeg:
    """The newest annotated frame of one stream as JPEG, for the live view; readers wait for a newer one."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.jpeg: bytes | None = None
        self.seq = 0
        self.closed = False

    def put(self, jpeg: bytes) -> None:
        with self._cond:
            self.jpeg, self.seq = jpeg, self.seq + 1
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()

    def wait_newer(self, seq: int, timeout_s: float) -> tuple[bytes | None, int]:
        with self._cond:
            if self.seq <= seq and not self.closed:
                self._cond.wait(timeout_s)
            return self.jpeg, self.seq
