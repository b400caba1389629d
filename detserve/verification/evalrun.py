"""``detserve eval``: COCO mAP of the live endpoint and of in-process PyTorch, side by side.

Every image of a COCO annotation file goes through the server with the bulk client (no score
threshold, the given max detections) and through the eager torchvision model the served version
was built from; both are scored by the same pycocotools code. For an FP32 build the two must agree
to a tenth of a point of mAP; a larger gap means the serving path changed what the model sees or
returns.

A verification workflow (it sits in ``detserve.verification``, not in the CLI's ``app``): it needs
only the client, the families and the reference below it; ``detserve eval`` calls ``run_eval``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from detserve.pipeline import CORE, model_name
from detserve.verification.evaluation import (
    METRIC_NAMES,
    EvalError,
    ImageDetections,
    coco_metrics,
    has_segmentation,
    load_annotations,
    mask_rles,
)

MAX_DET_CHOICES = (100, 500, 5000)
MAP_TOLERANCE_POINTS = 0.1  # |served - PyTorch| mAP, in points, for an FP32 build


@dataclass
class EvalReport:
    model: str
    version: int
    images: int
    max_det: int
    served: dict[str, float]
    pytorch: dict[str, float] | None
    errors: dict[str, str] = field(default_factory=dict)  # file name -> error
    seconds: dict[str, float] = field(default_factory=dict)
    detections: dict[str, int] = field(default_factory=dict)  # side -> total detections
    # instance-mask models on annotations with masks: segm metrics beside the box metrics
    served_segm: dict[str, float] | None = None
    pytorch_segm: dict[str, float] | None = None

    @property
    def delta_points(self) -> dict[str, float]:
        if self.pytorch is None:
            return {}
        return {k: 100.0 * (self.served[k] - self.pytorch[k]) for k in METRIC_NAMES}

    @property
    def segm_delta_points(self) -> dict[str, float]:
        if self.pytorch_segm is None or self.served_segm is None:
            return {}
        return {k: 100.0 * (self.served_segm[k] - self.pytorch_segm[k]) for k in METRIC_NAMES}

    @property
    def within_tolerance(self) -> bool | None:
        if self.pytorch is None:
            return None
        segm = self.segm_delta_points
        return abs(self.delta_points["mAP"]) <= MAP_TOLERANCE_POINTS and (not segm or abs(segm["mAP"]) <= MAP_TOLERANCE_POINTS)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "version": self.version,
            "images": self.images,
            "max_det": self.max_det,
            "score_threshold": 0.0,
            "served": self.served,
            "pytorch": self.pytorch,
            "delta_points": self.delta_points,
            "tolerance_points": MAP_TOLERANCE_POINTS,
            "within_tolerance": self.within_tolerance,
            "errors": self.errors,
            "seconds": self.seconds,
            "detections": self.detections,
            **({"served_segm": self.served_segm, "pytorch_segm": self.pytorch_segm} if self.served_segm else {}),
            **({"segm_delta_points": self.segm_delta_points} if self.segm_delta_points else {}),
        }

    def markdown(self) -> str:
        lines = [
            f"## COCO eval: {self.model} v{self.version}, {self.images} images, max_det {self.max_det}, no score threshold",
            "",
            "| metric | served | PyTorch | Δ (points) |" if self.pytorch else "| metric | served |",
            "|---|---|---|---|" if self.pytorch else "|---|---|",
        ]
        for k in METRIC_NAMES:
            if self.pytorch is not None:
                lines.append(f"| {k} | {self.served[k]:.4f} | {self.pytorch[k]:.4f} | {self.delta_points[k]:+.3f} |")
            else:
                lines.append(f"| {k} | {self.served[k]:.4f} |")
        lines.append("")
        if self.served_segm is not None:
            lines += self._segm_lines()
        if self.pytorch is not None:
            verdict = "within" if self.within_tolerance else "OUTSIDE"
            lines.append(
                f"|ΔmAP| = {abs(self.delta_points['mAP']):.3f} points: {verdict} the {MAP_TOLERANCE_POINTS} point tolerance."
            )
        if self.errors:
            lines.append(f"{len(self.errors)} image(s) failed and count as detecting nothing:")
            lines += [f"- {name}: {err}" for name, err in sorted(self.errors.items())]
        lines.append("Seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in self.seconds.items()))
        return "\n".join(lines) + "\n"

    def _segm_lines(self) -> list[str]:
        assert self.served_segm is not None
        both = self.pytorch_segm is not None
        lines = ["Instance masks (segm):", "", "| metric | served | PyTorch | Δ (points) |" if both else "| metric | served |"]
        lines.append("|---|---|---|---|" if both else "|---|---|")
        for k in METRIC_NAMES:
            if self.pytorch_segm is not None:
                d = self.segm_delta_points[k]
                lines.append(f"| segm {k} | {self.served_segm[k]:.4f} | {self.pytorch_segm[k]:.4f} | {d:+.3f} |")
            else:
                lines.append(f"| segm {k} | {self.served_segm[k]:.4f} |")
        return [*lines, ""]


def _image_paths(annotations: dict[str, Any], images_dir: Path) -> dict[int, Path]:
    if not images_dir.is_dir():
        raise EvalError(f"image folder not found: {images_dir}")
    out = {}
    for im in annotations["images"]:
        name = Path(str(im["file_name"]))
        if name.is_absolute() or ".." in name.parts:
            raise EvalError(f"image file_name {im['file_name']!r} escapes the image folder")
        out[int(im["id"])] = images_dir / name
    return out


def _to_eval(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, categories: np.ndarray | None = None) -> ImageDetections:
    """``categories``: for families whose labels are class indices (YOLO), label i is ``categories[i]``."""
    ids = labels.astype(np.int64)
    if categories is not None:  # a class index the dataset does not have matches nothing (-1)
        known = (ids >= 0) & (ids < len(categories))
        mapped = np.full_like(ids, -1)
        mapped[known] = categories[ids[known]]
        ids = mapped
    return ImageDetections(boxes.astype(np.float64), scores.astype(np.float64), ids)


def category_map(annotations: dict[str, Any], labels_are_indices: bool) -> np.ndarray | None:
    """The annotation file's category ids in id order, when a family's labels index them (YOLO); else None.

    torchvision models emit COCO category ids themselves (0 is background); ultralytics models emit
    class indices 0..nc-1 in their training order, which is the dataset's categories sorted by id.
    """
    if not labels_are_indices:
        return None
    return np.array(sorted(int(c["id"]) for c in annotations.get("categories", [])), dtype=np.int64)


def served_detections(
    url: str,
    model: str,
    paths: dict[int, Path],
    max_det: int,
    max_in_flight: int,
    progress: bool,
    categories: np.ndarray | None = None,
    sizes: dict[int, tuple[int, int]] | None = None,
) -> tuple[dict[int, ImageDetections], dict[str, str]]:
    """``sizes`` (image id -> height, width): paste served instance masks for segm evaluation."""
    from clients.bulk import detect_paths

    ids = list(paths)
    results = detect_paths(
        url, model, [paths[i] for i in ids], max_in_flight=max_in_flight, score_threshold=0.0, max_det=max_det, progress=progress
    )
    dets, errors = {}, {}
    for image_id, res in zip(ids, results, strict=True):
        if res.detections is None:
            errors[res.path.name] = res.error or "unknown error"
            continue
        d = res.detections
        det = _to_eval(d.boxes, d.scores, d.labels, categories)
        if d.masks is not None and sizes is not None:  # pasted as torchvision does, at the image's size
            det = ImageDetections(det.boxes, det.scores, det.labels, _pasted_rles(d.masks, d.boxes, sizes[image_id]))
        dets[image_id] = det
    return dets, errors


def _pasted_rles(masks: np.ndarray, boxes: np.ndarray, hw: tuple[int, int]) -> list[dict[str, Any]]:
    """Each served 28x28 mask pasted and thresholded at 0.5, one at a time (K full-size masks add up)."""
    from clients.masks import paste_masks

    return [mask_rles(paste_masks(m[None], b[None], hw, threshold=0.5))[0] for m, b in zip(masks, boxes, strict=True)]


def pytorch_detections(
    record: dict[str, Any], paths: dict[int, Path], max_det: int, max_pixels: int, categories: np.ndarray | None = None
) -> tuple[dict[int, ImageDetections], dict[str, str]]:
    """The eager model through its library's own detection path, on the same decoded pixels the server sees."""
    from detserve.errors import DetserveError
    from detserve.runtime.imaging import decode_image
    from detserve.verification.reference import reference_model

    model = reference_model(record)
    dets, errors = {}, {}
    for image_id, path in paths.items():
        try:
            rgb = decode_image(path.read_bytes(), max_pixels)
        except (OSError, DetserveError) as e:
            errors[path.name] = str(e)
            continue
        out = model.detect(rgb, score_threshold=0.0, max_det=max_det)
        det = _to_eval(out["boxes"], out["scores"], out["labels"], categories)
        if "masks" in out:  # eager Mask R-CNN: pasted probabilities, thresholded at 0.5 as torchvision users do
            det = ImageDetections(det.boxes, det.scores, det.labels, mask_rles(out["masks"] > 0.5))
        dets[image_id] = det
    return dets, errors


def run_eval(
    url: str,
    model: str,
    annotations_path: Path,
    images_dir: Path,
    repository: Path,
    max_det: int = 100,
    max_in_flight: int = 8,
    with_pytorch: bool = True,
    progress: bool = True,
    echo: Callable[[str], None] = print,
) -> EvalReport:
    from detserve.families import ModelSpec
    from detserve.verification.reference import build_record

    if max_det < 1:
        raise EvalError(f"--max-det must be >= 1, got {max_det}")
    if max_in_flight < 1:  # before: a ValueError traceback from the bulk client, after the build record was read
        raise EvalError(f"--max-in-flight must be >= 1, got {max_in_flight}")
    annotations = load_annotations(annotations_path)
    paths = _image_paths(annotations, images_dir)
    version, record = build_record(repository, model)
    spec = ModelSpec.from_json((Path(repository) / model_name(model, CORE) / str(version) / "spec.json").read_text())
    report = EvalReport(model, version, len(paths), max_det, served={}, pytorch=None)
    from detserve.families import family_of_spec

    categories = category_map(annotations, family_of_spec(spec.postprocess).labels_are_indices)

    t = time.monotonic()
    echo(f"served: {len(paths)} images through {model} v{version} at {url} ({max_in_flight} in flight)")
    sizes = {int(im["id"]): (int(im["height"]), int(im["width"])) for im in annotations["images"]}
    served, errors = served_detections(url, model, paths, max_det, max_in_flight, progress, categories, sizes)
    report.seconds["served"] = time.monotonic() - t
    report.errors.update(errors)
    report.served = coco_metrics(annotations, served, max_det)
    segm = has_segmentation(annotations) and any(d.masks is not None for d in served.values())
    if segm:
        report.served_segm = coco_metrics(annotations, served, max_det, iou_type="segm")
    report.detections["served"] = sum(len(d.scores) for d in served.values())
    if with_pytorch:
        t = time.monotonic()
        echo(f"pytorch: the same images through eager {record['detector']} in this process")
        ref, ref_errors = pytorch_detections(record, paths, max_det, spec.preprocess.max_image_pixels, categories)
        report.seconds["pytorch"] = time.monotonic() - t
        for name, err in ref_errors.items():
            report.errors.setdefault(name, err)
        report.pytorch = coco_metrics(annotations, ref, max_det)
        if segm:
            report.pytorch_segm = coco_metrics(annotations, ref, max_det, iou_type="segm")
        report.detections["pytorch"] = sum(len(d.scores) for d in ref.values())
    return report


def write_report(report: EvalReport, out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    stem = f"eval_{report.model}_maxdet{report.max_det}"
    paths = {"json": out / f"{stem}.json", "markdown": out / f"{stem}.md"}
    paths["json"].write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    paths["markdown"].write_text(report.markdown())
    return paths
