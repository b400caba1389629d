"""The moving-shapes videos (training/moving_shapes.py), the tracker (detserve/video/tracking.py) and its
scoring with motmetrics (training/track_eval.py), without a server: the truth as the detector.

The served scores (the trained demo detector through FRAMES) are measured by
``python -m training.track_eval`` and tests/integration/test_tracking.py (slow).
"""

from __future__ import annotations

import numpy as np
import pytest

from training.moving_shapes import MovingShapes, VideoConfig, events

CFG = VideoConfig(seed=0, frames=100)


@pytest.fixture(scope="module")
def video() -> MovingShapes:
    return MovingShapes(CFG)


@pytest.fixture(scope="module")
def truth(video: MovingShapes) -> list:
    return video.truth()


def test_a_video_is_a_function_of_its_config(video: MovingShapes) -> None:
    again = MovingShapes(CFG)
    for t in (0, 37, 99):
        a, ta = video.frame(t)
        b, tb = again.frame(t)
        assert a.shape == (480, 640, 3) and a.dtype == np.uint8
        assert np.array_equal(a, b) and ta == tb
    assert not np.array_equal(MovingShapes(VideoConfig(seed=1, frames=100)).frame(0)[0], video.frame(0)[0])


def test_the_video_holds_entries_exits_crossings_and_occlusions(truth: list) -> None:
    found = events(truth)
    assert found["tracks"] == CFG.movers + CFG.loiterers
    assert found["entries"] >= 3 and found["exits"] >= 2 and found["crossings"] >= 2 and found["occlusions"] >= 1, found
    for items in truth:
        for g in items:
            x0, y0, x1, y1 = g.box
            assert 0 <= x0 < x1 <= 640 and 0 <= y0 < y1 <= 480
            assert g.visibility >= CFG.min_visible and 1 <= g.label <= 5


def test_truth_boxes_are_the_visible_pixels(video: MovingShapes) -> None:
    """Each box is tight on pixels painted in its object's colour (noise is at most +-5 per sample)."""
    image, items = video.frame(50)
    assert items
    for g in items:
        fill = np.array(video.objects[g.track_id - 1].fill, dtype=np.int16)
        x0, y0, x1, y1 = g.box
        inside = (np.abs(image[y0:y1, x0:x1].astype(np.int16) - fill) <= CFG.noise).all(axis=2)
        assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()


def test_the_tracker_on_perfect_detections_scores_near_one(truth: list) -> None:
    from training.track_eval import from_truth, score, track

    dets = from_truth(truth)
    ids = track(dets)
    metrics = score(truth, dets, ids)
    # ByteTrack gives a track born after the first frame its id from its second frame on: one miss per entry
    assert metrics["num_switches"] == 0 and metrics["num_false_positives"] == 0
    assert metrics["mota"] >= 0.95 and metrics["idf1"] >= 0.95, metrics


def test_tracker_ids_persist_and_low_scores_are_untracked() -> None:
    from detserve.video.tracking import UNTRACKED, Tracker, TrackerOptions

    tracker = Tracker(TrackerOptions(frame_rate=25))
    a, b = np.array([0.0, 100.0, 60.0, 160.0]), np.array([300.0, 100.0, 360.0, 160.0])
    seen = []
    for t in range(30):  # two boxes of different classes swap sides, crossing at t = 15
        step = np.array([10.0 * t, 0, 10.0 * t, 0])
        ids = tracker.update(np.stack([a + step, b - step, [0, 0, 20, 20]]), np.array([0.9, 0.9, 0.05]), np.array([1, 2, 1]))
        seen.append(ids)
    assert all(ids[2] == UNTRACKED for ids in seen)
    assert {int(ids[0]) for ids in seen} == {1} and {int(ids[1]) for ids in seen} == {2}
    assert tracker.update(np.empty((0, 4)), np.empty(0), np.empty(0)).shape == (0,)
