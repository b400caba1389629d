"""Persistent track ids per stream (``detserve stream --track``): ByteTrack, as supervision ships it.

Why this tracker (issue 25 part 4; checked 2026-12-07 with the project's pins as constraints):
- supervision (MIT) 0.30.x carries ByteTrack (``sv.ByteTrack``: Kalman filter + two-stage IoU
  association, high-score then low-score detections) and needs neither ``opencv-python`` beside our
  ``opencv-python-headless`` nor numpy 2 (numpy >= 1.21.2; it installs defusedxml and pyDeprecate).
  Its import opens no network connection and writes nothing under ``$HOME`` (checked with strace).
- supervision 0.31 removed ByteTrack in favour of Roboflow's ``trackers`` package, which requires
  numpy >= 2.0.2 and so cannot install beside nvidia-pytriton 0.7.0 (numpy < 2): hence the pin
  ``supervision>=0.30,<0.31`` (pyproject extra ``video``). boxmot is AGPL; norfair (BSD) is a
  SORT-style tracker without ByteTrack's low-score association.

ByteTrack matches boxes whatever their class. ``per_class`` (the default) runs one ByteTrack per
label instead, so two shapes of different classes that cross never swap ids (measured on the
moving-shapes videos: training/moving_shapes.py, docs in the video section). Ids are unique per
``Tracker`` (one per stream), from 1, never reused; a detection that no track took gets ``-1``
(ByteTrack does not start a track from a low-score detection).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from detserve.errors import DetserveError

UNTRACKED = -1


@dataclass(frozen=True)
class TrackerOptions:
    """ByteTrack's settings (supervision's names). ``activation``: a track starts from a detection at
    least this confident; ``lost_frames``: frames a lost track waits to be found again (scaled by
    ``frame_rate / 30`` as ByteTrack does); ``match_threshold``: the cost (1 - IoU, fused with the
    score) under which a track and a detection may match; ``min_frames``: frames a new track needs
    before it gets an id."""

    activation: float = 0.25
    lost_frames: int = 30
    match_threshold: float = 0.8
    frame_rate: float = 25.0
    min_frames: int = 1
    per_class: bool = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.activation <= 1.0 or not 0.0 < self.match_threshold <= 1.0:
            raise DetserveError("tracker: activation must be in [0, 1] and match_threshold in (0, 1]")
        if self.lost_frames < 0 or self.frame_rate <= 0 or self.min_frames < 1:
            raise DetserveError("tracker: lost_frames >= 0, frame_rate > 0 and min_frames >= 1 are required")


def _byte_track(options: TrackerOptions) -> Any:
    try:
        import supervision as sv
    except ImportError as e:
        raise DetserveError(
            "tracking needs supervision 0.30.x (its ByteTrack)", hint="pip install -e '.[video]' (scripts/setup.sh does)"
        ) from e
    if not hasattr(sv, "ByteTrack"):
        raise DetserveError(
            f"supervision {sv.__version__} has no ByteTrack (removed in 0.31)",
            hint="install supervision>=0.30,<0.31 (pyproject extra 'video')",
        )
    with warnings.catch_warnings():  # its deprecation notice (ByteTrack moved to `trackers`: numpy 2 only)
        warnings.simplefilter("ignore")
        return sv.ByteTrack(
            track_activation_threshold=options.activation,
            lost_track_buffer=options.lost_frames,
            minimum_matching_threshold=options.match_threshold,
            frame_rate=options.frame_rate,
            minimum_consecutive_frames=options.min_frames,
        )


class Tracker:
    """One stream's tracker: ``update`` once per processed frame, in order (a dropped frame is simply
    not given: ByteTrack's Kalman filter then predicts one step where several passed)."""

    def __init__(self, options: TrackerOptions | None = None) -> None:
        self.options = options or TrackerOptions()
        _byte_track(self.options)  # fails here, at start, when supervision is missing or too new
        self._trackers: dict[int, Any] = {}  # per class (or one, group 0): its ByteTrack
        self._ids: dict[tuple[int, int], int] = {}  # (group, ByteTrack's id) -> this stream's id

    def update(self, boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """Detections of the next frame (boxes ``[n, 4]`` x1 y1 x2 y2, scores ``[n]``, labels ``[n]``)
        -> int64 ``[n]`` track ids (``-1``: not tracked)."""
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        scores = np.asarray(scores, dtype=np.float64).reshape(-1)
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        if not len(boxes) == len(scores) == len(labels):
            raise DetserveError(f"tracker: {len(boxes)} boxes, {len(scores)} scores, {len(labels)} labels")
        ids = np.full(len(boxes), UNTRACKED, dtype=np.int64)
        groups = np.unique(labels) if self.options.per_class else np.array([0])
        # every class's tracker steps every frame, also with no detection of its class: its lost
        # tracks must age with the video, not with the frames where the class happens to appear
        for group in sorted(set(groups.tolist()) | set(self._trackers)):
            rows = np.flatnonzero(labels == group) if self.options.per_class else np.arange(len(boxes))
            ids[rows] = self._update_group(int(group), boxes[rows], scores[rows], labels[rows])
        return ids

    def _update_group(self, group: int, boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
        import supervision as sv

        tracker = self._trackers.get(group)
        if tracker is None:
            tracker = self._trackers[group] = _byte_track(self.options)
        detections = sv.Detections(xyxy=boxes, confidence=scores, class_id=labels, data={"row": np.arange(len(boxes))})
        tracked = tracker.update_with_detections(detections)
        out = np.full(len(boxes), UNTRACKED, dtype=np.int64)
        for row, local in zip(tracked.data.get("row", []), tracked.tracker_id, strict=True):
            out[int(row)] = self._ids.setdefault((group, int(local)), len(self._ids) + 1)
        return out
