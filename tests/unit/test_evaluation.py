"""COCO metrics: the same numbers as pycocotools' own summary, on cases worked out by hand."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest

from detserve.verification.evaluation import EvalError, ImageDetections, coco_metrics


def _annotations() -> dict:
    # image 1: two objects of class 1; image 2: one object of class 2
    return {
        "images": [
            {"id": 1, "width": 200, "height": 200, "file_name": "a.png"},
            {"id": 2, "width": 200, "height": 200, "file_name": "b.png"},
        ],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 50, 50], "area": 2500, "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [100, 100, 60, 40], "area": 2400, "iscrowd": 0},
            {"id": 3, "image_id": 2, "category_id": 2, "bbox": [20, 30, 100, 100], "area": 10000, "iscrowd": 0},
        ],
        "categories": [{"id": 1, "name": "one"}, {"id": 2, "name": "two"}],
    }


def _det(boxes: list[list[float]], scores: list[float], labels: list[int]) -> ImageDetections:
    return ImageDetections(
        np.asarray(boxes, dtype=np.float64).reshape(-1, 4), np.asarray(scores, dtype=np.float64), np.asarray(labels)
    )


def test_perfect_detections_score_one() -> None:
    dets = {
        1: _det([[10, 10, 60, 60], [100, 100, 160, 140]], [0.9, 0.8], [1, 1]),
        2: _det([[20, 30, 120, 130]], [0.7], [2]),
    }
    m = coco_metrics(_annotations(), dets)
    assert m["mAP"] == pytest.approx(1.0) and m["AP50"] == pytest.approx(1.0) and m["AR"] == pytest.approx(1.0)


def test_hand_computed_iou_thresholds() -> None:
    # class 2's only box detected with IoU exactly 0.6 (x shifted by 25 of 100: 75*100 / (125*100 - ... ) -> see below)
    # box [20,30,120,130] vs [45,30,145,130]: inter 75*100 = 7500, union 12500 -> IoU 0.6
    # passes thresholds 0.50, 0.55, 0.60 of ten -> AP 0.3 for class 2; class 1 not detected -> AP 0
    dets = {2: _det([[45, 30, 145, 130]], [0.5], [2])}
    m = coco_metrics(_annotations(), dets)
    assert m["AP50"] == pytest.approx(0.5)  # mean over classes of (0, 1)
    assert m["AP75"] == pytest.approx(0.0)
    assert m["mAP"] == pytest.approx((0.0 + 0.3) / 2)


def test_matches_pycocotools_summary_at_max_det_100() -> None:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    rng = np.random.default_rng(0)
    ann = _annotations()
    dets = {}
    rows = []
    for image_id, base in ((1, [[10, 10, 60, 60], [100, 100, 160, 140]]), (2, [[20, 30, 120, 130]])):
        boxes = np.asarray(base, dtype=np.float64) + rng.normal(0, 4, (len(base), 4))
        noise = rng.uniform(0, 150, (6, 2))
        boxes = np.concatenate([boxes, np.concatenate([noise, noise + 30], 1)])
        scores, labels = rng.uniform(0, 1, len(boxes)), rng.integers(1, 3, len(boxes))
        dets[image_id] = _det(boxes.tolist(), scores.tolist(), labels.tolist())
        rows += [[image_id, b[0], b[1], b[2] - b[0], b[3] - b[1], s, c] for b, s, c in zip(boxes, scores, labels, strict=True)]
    ours = coco_metrics(ann, dets, max_det=100)
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = ann
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes(np.asarray(rows)), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    names = ["mAP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large", "AR1", "AR10", "AR"]
    assert [ours[n] for n in names] == pytest.approx(list(ev.stats[:9]))


def test_caps_other_than_100_and_the_cap_is_applied() -> None:
    # 600 junk detections above the one true box: found at max_det 5000, not at 100 (ranked below the cap)
    junk = [[0, 0, 5, 5]] * 600
    dets = {2: _det([*junk, [20, 30, 120, 130]], [0.9] * 600 + [0.1], [2] * 601)}
    m100, m5000 = coco_metrics(_annotations(), dets, max_det=100), coco_metrics(_annotations(), dets, max_det=5000)
    assert m100["AR"] == pytest.approx(0.0)
    assert m5000["AR"] > 0 and m5000["mAP"] >= 0


def test_images_without_detections_count_and_unknown_ids_are_refused() -> None:
    assert coco_metrics(_annotations(), {})["mAP"] == pytest.approx(0.0)
    with pytest.raises(EvalError, match="not in the annotations"):
        coco_metrics(_annotations(), {99: _det([[0, 0, 1, 1]], [0.5], [1])})
    with pytest.raises(EvalError, match="disagree in length"):
        ImageDetections(np.zeros((2, 4)), np.zeros(3), np.zeros(2))
