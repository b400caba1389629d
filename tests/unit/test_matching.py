from __future__ import annotations

import numpy as np

from detserve.verification.matching import box_iou, check_parity, match_detections


def _dets(n: int = 6, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 400, (n, 2))
    wh = rng.uniform(20, 80, (n, 2))
    boxes = np.concatenate([xy, xy + wh], axis=1).astype(np.float32)
    return boxes, rng.uniform(0.01, 1, n).astype(np.float32), rng.integers(1, 4, n).astype(np.int32)


def test_iou_basics() -> None:
    a = np.array([[0, 0, 10, 10]], dtype=np.float32)
    assert box_iou(a, a)[0, 0] == 1.0
    assert abs(box_iou(a, np.array([[5, 0, 15, 10]]))[0, 0] - 1 / 3) < 1e-12
    assert box_iou(a, np.array([[20, 20, 30, 30]]))[0, 0] == 0.0


def test_order_free() -> None:
    a = _dets()
    perm = np.random.default_rng(1).permutation(6)
    b = tuple(x[perm] for x in a)
    result = check_parity(a, b)  # type: ignore[arg-type]
    assert result.ok and result.matched == 6 and result.max_box_delta == 0.0


def test_planted_disagreements_are_reported() -> None:
    a = _dets()
    boxes, scores, labels = (x.copy() for x in a)
    order = np.argsort(-scores)
    labels[order[0]] += 10  # the best detection changes class
    scores[order[1]] += 0.01  # a score moves by 1e-2
    result = check_parity(a, (boxes, scores, labels))
    assert not result.ok
    text = " ".join(result.failures)
    assert "no partner" in text and "dscore" in text


def test_low_scores_below_floor_may_flip() -> None:
    a = _dets()
    boxes, scores, labels = (x[:-1] for x in a)
    scores_a = a[1].copy()
    scores_a[-1] = 0.01  # the dropped one is below the floor: allowed
    assert check_parity((a[0], scores_a, a[2]), (boxes, scores, labels), score_floor=0.05).ok


def test_empty_sets() -> None:
    e = (np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int32))
    assert check_parity(e, e).ok
    m = match_detections(*_dets(), *e)
    assert len(m.unmatched_a) == 6 and not m.pairs


def test_zero_area_boxes_match_by_corners() -> None:
    a = np.array([[640.0, 10.0, 640.0, 50.0]], np.float32)  # clipped to the right border
    b = a + np.array([[0, 0.001, 0, 0.0]], np.float32)
    assert box_iou(a, b)[0, 0] == 1.0
    assert box_iou(a, a + 1.0)[0, 0] == 0.0
