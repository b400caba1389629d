"""Moving-shapes videos with ground-truth tracks, from the shapes dataset's own drawing (training/synthetic.py).

A video is a pure function of its ``VideoConfig`` (seed included): ``MovingShapes(cfg).frame(t)``
gives the same pixels and the same truth on any machine, in any order. Its objects are the
dataset's five shapes on the training distribution's backgrounds (noise, gradient, photographs;
no clutter), so the trained demo detector sees what it was trained on:

- *movers* enter through one edge of the frame and leave through another, at their own time and
  speed, on straight paths that cross each other;
- *loiterers* stay in view all along, moving slowly, drawn below the movers: movers pass over them
  (occlusion) and they come back.

The truth of frame ``t`` lists every object of which at least ``min_visible`` of its pixels show
(partly outside the frame or hidden by a mover above it counts as not showing), with the tight box
of its visible pixels, as in the image dataset; a fully or mostly hidden object is absent from that
frame's truth and keeps its track id when it shows again. ``events`` counts what a video holds:
entries, exits, crossings (two objects' boxes overlapping) and occlusions (an object in the truth
with pixels hidden by another). ``write_video`` encodes it (H.264 through PyAV) for the stream
client and the RTSP test server; ``write_truth`` writes the MOTChallenge ``gt.txt`` layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from training.synthetic import CLASSES, SPLITS, _background, _contrasting_fill, _shape_points


@dataclass(frozen=True)
class VideoConfig:
    seed: int = 0
    frames: int = 150
    size: tuple[int, int] = (480, 640)  # height, width
    fps: int = 25
    movers: int = 6
    loiterers: int = 2
    object_px: tuple[int, int] = (60, 120)  # object extent, pixels (the dataset's 0.12-0.45 of a short side)
    noise: int = 5  # each sample +- up to this
    min_visible: float = 0.4


@dataclass(frozen=True)
class Truth:
    """One object in one frame: its track id (from 1), class (1..5) and visible box x0, y0, x1, y1 (exclusive)."""

    track_id: int
    label: int
    box: tuple[int, int, int, int]
    visibility: float  # visible pixels / the whole object's
    occluded: bool  # some of its pixels inside the frame are hidden by an object above it


@dataclass(frozen=True)
class _Object:
    track_id: int
    label: int
    outline: tuple[tuple[float, float], ...]  # about its centre, pixels (rotated and stretched once)
    fill: tuple[int, int, int]
    start: int  # first frame on its path
    end: int  # last frame on its path
    p0: tuple[float, float]  # centre at ``start``
    p1: tuple[float, float]  # centre at ``end``

    def centre(self, t: int) -> tuple[float, float] | None:
        if not self.start <= t <= self.end:
            return None
        a = (t - self.start) / max(self.end - self.start, 1)
        return self.p0[0] + a * (self.p1[0] - self.p0[0]), self.p0[1] + a * (self.p1[1] - self.p0[1])

    @cached_property
    def area(self) -> int:
        """Pixels of the whole object (drawn alone, nowhere clipped)."""
        r = math.ceil(max(max(abs(x), abs(y)) for x, y in self.outline)) + 2
        img = Image.new("L", (2 * r, 2 * r), 0)
        ImageDraw.Draw(img).polygon([(x + r, y + r) for x, y in self.outline], fill=255)
        return int((np.asarray(img) > 0).sum())


def _edge_point(rng: np.random.Generator, edge: int, h: int, w: int, margin: float) -> tuple[float, float]:
    """A point just outside edge 0 left, 1 right, 2 top, 3 bottom (``margin`` beyond it)."""
    if edge < 2:
        return (-margin if edge == 0 else w + margin), rng.uniform(0.15 * h, 0.85 * h)
    return rng.uniform(0.15 * w, 0.85 * w), (-margin if edge == 2 else h + margin)


def _outline(rng: np.random.Generator, label: int, size: float) -> tuple[tuple[float, float], ...]:
    pts = _shape_points(CLASSES[label - 1], rng)
    stretch = rng.uniform(0.8, 1.25)
    sx, sy = size / 2 * stretch**0.5, size / 2 / stretch**0.5
    rot = 0.0 if label == 1 else rng.uniform(0, 2 * math.pi)
    c, s = math.cos(rot), math.sin(rot)
    return tuple((c * x * sx - s * y * sy, s * x * sx + c * y * sy) for x, y in pts)


class MovingShapes:
    """One generated video: ``frame(t)`` -> (uint8 [H, W, 3] RGB, its truth)."""

    def __init__(self, cfg: VideoConfig = VideoConfig()) -> None:
        self.cfg = cfg
        rng = np.random.default_rng([cfg.seed, 77])
        h, w = cfg.size
        self.background = _background(SPLITS["val"], rng, w, h).astype(np.uint8)
        under = self.background.reshape(-1, 3).astype(np.float32).mean(axis=0)
        objects = []  # drawn in this order: loiterers first (below), then movers
        for k in range(cfg.loiterers + cfg.movers):
            label = int(rng.integers(len(CLASSES))) + 1
            size = float(rng.uniform(*cfg.object_px))
            fill = tuple(int(v) for v in _contrasting_fill(rng, under))
            if k < cfg.loiterers:
                x0, y0 = rng.uniform(0.25 * w, 0.75 * w), rng.uniform(0.3 * h, 0.7 * h)
                dx, dy = rng.uniform(-0.15, 0.15) * w, rng.uniform(-0.1, 0.1) * h
                start, end, p0, p1 = 0, cfg.frames - 1, (x0, y0), (x0 + dx, y0 + dy)
            else:
                a, b = (int(e) for e in rng.permutation(4)[:2])  # in through one edge, out through another
                start = int(rng.integers(0, max(1, cfg.frames // 2)))
                end = min(cfg.frames + 20, start + int(rng.uniform(0.35, 0.7) * cfg.frames))
                p0, p1 = _edge_point(rng, a, h, w, size), _edge_point(rng, b, h, w, size)
            objects.append(_Object(k + 1, label, _outline(rng, label, size), fill, start, end, p0, p1))  # type: ignore[arg-type]
        self.objects = objects

    def frame(self, t: int) -> tuple[np.ndarray, list[Truth]]:
        h, w = self.cfg.size
        image = self.background.copy()
        owner = np.zeros((h, w), dtype=np.int32)
        drawn: dict[int, tuple[int, int, int, int, int]] = {}  # id -> pixels drawn in the frame, and where
        for obj in self.objects:
            centre = obj.centre(t)
            if centre is None:
                continue
            # rasterised in its own box only, clipped to the frame (a full-frame mask per object costs 5x)
            xs = [centre[0] + x for x, _ in obj.outline]
            ys = [centre[1] + y for _, y in obj.outline]
            x0, y0 = max(0, math.floor(min(xs))), max(0, math.floor(min(ys)))
            x1, y1 = min(w, math.ceil(max(xs)) + 2), min(h, math.ceil(max(ys)) + 2)
            if x1 <= x0 or y1 <= y0:
                continue
            mask_img = Image.new("L", (x1 - x0, y1 - y0), 0)
            ImageDraw.Draw(mask_img).polygon([(x - x0, y - y0) for x, y in zip(xs, ys, strict=True)], fill=255)
            mask = np.asarray(mask_img) > 0
            if mask.any():
                image[y0:y1, x0:x1][mask] = obj.fill
                owner[y0:y1, x0:x1][mask] = obj.track_id
                drawn[obj.track_id] = (int(mask.sum()), x0, y0, x1, y1)
        # sensor noise, uniform integers (a gaussian draw per pixel cost 27 ms of a 46 ms frame)
        a = self.cfg.noise
        noise = np.random.default_rng([self.cfg.seed, 78, t]).integers(-a, a + 1, size=image.shape, dtype=np.int16)
        image = np.clip(image + noise, 0, 255).astype(np.uint8)
        return image, self._truth(owner, drawn)

    def _truth(self, owner: np.ndarray, drawn: dict[int, tuple[int, int, int, int, int]]) -> list[Truth]:
        truth = []
        for obj in self.objects:
            if obj.track_id not in drawn:
                continue
            pixels, x0, y0, x1, y1 = drawn[obj.track_id]
            ys, xs = np.nonzero(owner[y0:y1, x0:x1] == obj.track_id)
            if len(xs) < self.cfg.min_visible * obj.area:
                continue
            box = (x0 + int(xs.min()), y0 + int(ys.min()), x0 + int(xs.max()) + 1, y0 + int(ys.max()) + 1)
            truth.append(Truth(obj.track_id, obj.label, box, len(xs) / obj.area, len(xs) < pixels))
        return truth

    def truth(self) -> list[list[Truth]]:
        """Every frame's truth (renders every frame: ~10 ms a 640x480 frame)."""
        return [self.frame(t)[1] for t in range(self.cfg.frames)]


def events(truth: list[list[Truth]]) -> dict[str, int]:
    """What a video holds: tracks, entries and exits (a track appearing after frame 0 / ending before the
    last), crossings (pairs of tracks whose boxes overlapped in some frame), occlusions (tracks partly hidden
    by another object in some frame; ``occluded_boxes``: such boxes), frames x objects in the truth."""
    first: dict[int, int] = {}
    last: dict[int, int] = {}
    crossing: set[tuple[int, int]] = set()
    occluded: list[int] = []
    for t, items in enumerate(truth):
        for a in items:
            first.setdefault(a.track_id, t)
            last[a.track_id] = t
            if a.occluded:
                occluded.append(a.track_id)
        for i, a in enumerate(items):
            for b in items[i + 1 :]:
                if _overlap(a.box, b.box):
                    crossing.add((min(a.track_id, b.track_id), max(a.track_id, b.track_id)))
    n = len(truth)
    return {
        "tracks": len(first),
        "entries": sum(1 for t in first.values() if t > 0),
        "exits": sum(1 for t in last.values() if t < n - 1),
        "crossings": len(crossing),
        "occlusions": len(set(occluded)),
        "occluded_boxes": len(occluded),
        "boxes": sum(len(items) for items in truth),
    }


def _overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def write_truth(truth: list[list[Truth]], path: Path) -> Path:
    """MOTChallenge ``gt.txt``: frame (from 1), id, left, top, width, height, 1, class, visibility."""
    lines = [
        f"{t + 1},{g.track_id},{g.box[0]},{g.box[1]},{g.box[2] - g.box[0]},{g.box[3] - g.box[1]},1,{g.label},{g.visibility:.3f}"
        for t, items in enumerate(truth)
        for g in items
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def write_video(video: MovingShapes, path: Path, crf: int = 18, gop: int = 25) -> Path:
    """The video as H.264 (PyAV's libx264: yuv420p, no B-frames, a key frame every ``gop`` frames, so a
    reader that lost data recovers within a second) in an MP4/MKV container chosen by ``path``'s suffix."""
    import av

    h, w = video.cfg.size
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=video.cfg.fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"crf": str(crf), "g": str(gop), "bf": "0", "preset": "veryfast", "tune": "zerolatency"}
        for t in range(video.cfg.frames):
            frame = av.VideoFrame.from_ndarray(video.frame(t)[0], format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
