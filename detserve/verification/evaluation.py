"""COCO detection metrics (pycocotools), the way mAP is meant to be measured: after NMS, with no
score threshold, and a cap on detections per image (100 / 500 / 5000).

``coco_metrics`` takes detections as plain arrays (image id -> boxes x0,y0,x1,y1 / scores / labels)
from any source — the live server, in-process PyTorch, ONNX Runtime — so every side is scored by
the same code.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from detserve.errors import DetserveError

METRIC_NAMES = ("mAP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large", "AR1", "AR10", "AR")


class EvalError(DetserveError):
    """The annotations or detections cannot be evaluated."""


@dataclass(frozen=True)
class ImageDetections:
    boxes: np.ndarray  # float [N, 4] x0, y0, x1, y1
    scores: np.ndarray  # float [N]
    labels: np.ndarray  # int [N], COCO category ids
    masks: list[dict[str, Any]] | None = None  # instance-mask models: COCO RLE per detection (full resolution)

    def __post_init__(self) -> None:
        n = len(self.scores)
        if self.boxes.shape != (n, 4) or self.labels.shape != (n,):
            raise EvalError(f"detections disagree in length: boxes {self.boxes.shape}, scores ({n},), labels {self.labels.shape}")
        if self.masks is not None and len(self.masks) != n:
            raise EvalError(f"{len(self.masks)} masks for {n} detections")


def mask_rles(binary: np.ndarray) -> list[dict[str, Any]]:
    """Binary masks [N, H, W] as COCO RLE (what ``segm`` evaluation reads)."""
    from pycocotools import mask as mask_utils

    out = []
    for m in binary:
        rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
        out.append({"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")})
    return out


def load_annotations(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError as e:
        raise EvalError(f"annotations not found: {p}") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EvalError(f"annotations are not JSON: {p}: {e}") from e
    for key in ("images", "annotations", "categories"):
        if not isinstance(data, dict) or not isinstance(data.get(key), list):
            raise EvalError(f"{p} is not COCO detection format: missing list {key!r}")
    return data


def _coco(annotations: Mapping[str, Any]):  # -> COCO
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = json.loads(json.dumps(annotations))  # deep copy; COCO mutates
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def coco_metrics(
    annotations: Mapping[str, Any], detections: Mapping[int, ImageDetections], max_det: int = 100, iou_type: str = "bbox"
) -> dict[str, float]:
    """mAP@[.5:.95], AP50, AP75, AP by size, AR@1/10/max_det over ``annotations``' images.

    Every image in ``annotations`` is evaluated; one with no entry in ``detections`` counts as having
    detected nothing. Detections beyond ``max_det`` per image (by score) are not counted.
    ``iou_type="segm"``: mask AP, from the detections' RLE masks against the annotations' ``segmentation``.
    """
    from pycocotools.cocoeval import COCOeval

    if max_det < 1:
        raise EvalError(f"max_det must be >= 1, got {max_det}")
    if iou_type not in ("bbox", "segm"):
        raise EvalError(f"iou_type must be 'bbox' or 'segm', got {iou_type!r}")
    if iou_type == "segm" and not has_segmentation(annotations):
        raise EvalError("segm mAP needs instance masks: the annotations have no 'segmentation'")
    gt = _coco(annotations)
    known = set(gt.getImgIds())
    unknown = sorted(set(detections) - known)
    if unknown:
        raise EvalError(f"detections for image ids not in the annotations: {unknown[:5]}")
    rows: list[list[float]] = []
    segms: list[dict[str, Any]] = []
    for image_id, det in detections.items():
        if iou_type == "segm" and det.masks is None:
            raise EvalError(f"image {image_id}: segm mAP needs masks, the detections have none")
        order = np.argsort(-det.scores, kind="stable")[:max_det]
        for k in order:
            x0, y0, x1, y1 = (float(v) for v in det.boxes[k])
            rows.append([image_id, x0, y0, x1 - x0, y1 - y0, float(det.scores[k]), int(det.labels[k])])
            if det.masks is not None:  # segm results carry the mask alone (area and box come from it)
                segms.append(
                    {
                        "image_id": image_id,
                        "segmentation": det.masks[int(k)],
                        "score": float(det.scores[k]),
                        "category_id": int(det.labels[k]),
                    }
                )
    with contextlib.redirect_stdout(io.StringIO()):
        results: Any = segms if iou_type == "segm" else np.asarray(rows, dtype=np.float64)
        dt = gt.loadRes(results) if rows else _coco({**annotations, "annotations": []})
        ev = COCOeval(gt, dt, iouType=iou_type)
        ev.params.imgIds = sorted(known)
        ev.params.maxDets = [1, 10, max_det]
        ev.evaluate()
        ev.accumulate()
    return _summarize(ev)


def has_segmentation(annotations: Mapping[str, Any]) -> bool:
    """Whether every annotation carries an instance mask (``segmentation``)."""
    anns = annotations.get("annotations", [])
    return bool(anns) and all("segmentation" in a for a in anns)


def _mean_valid(a: np.ndarray) -> float:
    v = a[a > -1]
    return float(v.mean()) if v.size else -1.0


def _summarize(ev: Any) -> dict[str, float]:
    """COCOeval.summarize's numbers, read for the *last* maxDets entry (pycocotools hard-codes 100
    for mAP, which gives -1 at any other cap)."""
    precision, recall = ev.eval["precision"], ev.eval["recall"]  # [T, R, K, A, M], [T, K, A, M]
    iou = ev.params.iouThrs
    areas = {name: i for i, name in enumerate(ev.params.areaRngLbl)}
    last = len(ev.params.maxDets) - 1

    def ap(area: str = "all", thr: float | None = None) -> float:
        p = precision[:, :, :, areas[area], last]
        if thr is not None:
            p = p[np.isclose(iou, thr)]
        return _mean_valid(p)

    def ar(m: int) -> float:
        return _mean_valid(recall[:, :, areas["all"], m])

    values = [ap(), ap(thr=0.5), ap(thr=0.75), ap("small"), ap("medium"), ap("large"), ar(0), ar(1), ar(last)]
    return dict(zip(METRIC_NAMES, values, strict=True))
