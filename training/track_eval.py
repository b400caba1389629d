"""Tracking scored against the moving-shapes videos' ground truth (issue 25 part 4).

Detections come from a served detector (the trained demo, through the ensemble's ``FRAMES``
input: the pixels exactly as generated) or, as a check of the scoring itself, from the truth;
``detserve.video.tracking.Tracker`` gives the ids; motmetrics (MIT) scores them with the
CLEAR-MOT and identity metrics (MOTA, MOTP, IDF1, id switches, mostly tracked / lost), boxes
matched at IoU >= 0.5 as MOTChallenge does. Run:

    python -m training.track_eval --url 127.0.0.1:8001 --model demo --seeds 0 1 2 --out tracking.json
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from training.moving_shapes import MovingShapes, Truth, VideoConfig, events

METRICS = (
    "mota",
    "motp",
    "idf1",
    "idp",
    "idr",
    "precision",
    "recall",
    "num_switches",
    "num_fragmentations",
    "mostly_tracked",
    "mostly_lost",
    "num_unique_objects",
    "num_false_positives",
    "num_misses",
)


@dataclass(frozen=True)
class FrameDetections:
    boxes: np.ndarray  # [n, 4] x1 y1 x2 y2
    scores: np.ndarray  # [n]
    labels: np.ndarray  # [n]


def from_truth(truth: list[list[Truth]], score: float = 0.9) -> list[FrameDetections]:
    """A perfect detector: the truth's boxes, one score (checks the tracker and the scoring alone)."""
    return [
        FrameDetections(
            np.array([g.box for g in items], dtype=np.float64).reshape(-1, 4),
            np.full(len(items), score),
            np.array([g.label for g in items], dtype=np.int64),
        )
        for items in truth
    ]


def served(video: MovingShapes, url: str, model: str, score_threshold: float = 0.1) -> list[FrameDetections]:
    """Every frame of ``video`` through the served ensemble's ``FRAMES`` input, one request a frame."""
    import tritonclient.grpc as grpcclient

    out = []
    with grpcclient.InferenceServerClient(url) as client:
        for t in range(video.cfg.frames):
            pixels = video.frame(t)[0][None]
            inp = grpcclient.InferInput("FRAMES", list(pixels.shape), "UINT8")
            inp.set_data_from_numpy(pixels)
            r = client.infer(model, [inp], parameters={"score_threshold": score_threshold})
            k = int(r.as_numpy("num_detections")[0, 0])
            out.append(FrameDetections(r.as_numpy("boxes")[0, :k], r.as_numpy("scores")[0, :k], r.as_numpy("labels")[0, :k]))
    return out


def track(detections: Iterable[FrameDetections], options: Any = None) -> list[np.ndarray]:
    """Track ids per frame (``-1``: a detection no track took), one Tracker over the whole video."""
    from detserve.video.tracking import Tracker

    tracker = Tracker(options)
    return [tracker.update(d.boxes, d.scores, d.labels) for d in detections]


def score(truth: Sequence[list[Truth]], detections: Sequence[FrameDetections], ids: Sequence[np.ndarray]) -> dict[str, float]:
    """motmetrics over the video: the tracked detections (id >= 0) against the truth, IoU >= 0.5."""
    import motmetrics as mm

    acc = mm.MOTAccumulator(auto_id=True)
    for items, det, tid in zip(truth, detections, ids, strict=True):
        keep = tid >= 0
        gt = np.array([[b[0], b[1], b[2] - b[0], b[3] - b[1]] for b in (g.box for g in items)], dtype=np.float64).reshape(-1, 4)
        hyp = det.boxes[keep].astype(np.float64)
        hyp_xywh = np.column_stack([hyp[:, :2], hyp[:, 2:] - hyp[:, :2]]) if len(hyp) else np.empty((0, 4))
        acc.update([g.track_id for g in items], tid[keep].tolist(), mm.distances.iou_matrix(gt, hyp_xywh, max_iou=0.5))
    summary = mm.metrics.create().compute(acc, metrics=list(METRICS), name="video")
    return {m: float(summary[m].iloc[0]) for m in METRICS}


def evaluate(cfg: VideoConfig, detections: Sequence[FrameDetections] | None, options: Any = None) -> dict[str, Any]:
    """One video: its events, and the tracker's scores on the given detections (None: the truth's)."""
    video = MovingShapes(cfg)
    truth = video.truth()
    dets = list(detections) if detections is not None else from_truth(truth)
    return {"seed": cfg.seed, "events": events(truth), "metrics": score(truth, dets, track(dets, options))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="127.0.0.1:8001")
    p.add_argument("--model", default="demo")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--frames", type=int, default=150)
    p.add_argument("--score-threshold", type=float, default=0.1)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    from detserve.video.tracking import TrackerOptions

    rows = []
    for seed in args.seeds:
        cfg = VideoConfig(seed=seed, frames=args.frames)
        dets = served(MovingShapes(cfg), args.url, args.model, args.score_threshold)
        for per_class in (True, False):
            row = evaluate(cfg, dets, TrackerOptions(per_class=per_class))
            rows.append({**row, "per_class": per_class, "detector": args.model})
        rows.append({**evaluate(cfg, None), "per_class": True, "detector": "truth"})
    text = json.dumps(rows, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
