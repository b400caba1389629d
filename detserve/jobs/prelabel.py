"""``detserve prelabel``: a results file as files annotation tools import.

- ``coco``: one ``annotations.json`` (images with width/height, annotations with ``bbox`` x, y, w, h
  in pixels, ``area``, ``iscrowd`` 0 and the model's ``score``, categories by name).
- ``yolo``: ``labels/<image path>.txt`` with ``class cx cy w h`` normalised to 0..1, one per
  detection (an empty file for an image with none: a negative example), and ``classes.txt``.
- ``labelstudio``: ``tasks.json``, Label Studio's task list with ``predictions`` (rectanglelabels,
  percent coordinates, ``original_width/height``, score, ``model_version``) and a matching
  ``labeling-config.xml``.

Thresholds are per class (``--threshold cls=0.3``, ``--threshold 0.5`` for the others), chosen for
recall: a reviewer deletes a wrong box faster than drawing a missing one. ``audit`` picks a seeded
sample of images for *blind* re-annotation (written without predictions), so reviewers' acceptance of
pre-drawn boxes can be measured; see docs/offline-jobs.md.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from detserve.errors import DetserveError
from detserve.jobs.results import RunInfo, is_background, read_records

FORMATS = ("coco", "yolo", "labelstudio")
LS_FROM, LS_TO = "label", "image"


@dataclass(frozen=True)
class Thresholds:
    default: float = 0.5
    per_class: dict[str, float] = field(default_factory=dict)

    def of(self, cls: str) -> float:
        return self.per_class.get(cls, self.default)


def parse_thresholds(values: list[str], default: float = 0.5) -> Thresholds:
    """['car=0.3', '0.4'] -> per-class thresholds, the bare number being the default for the others."""
    per_class: dict[str, float] = {}
    for text in values:
        name, sep, number = text.rpartition("=")
        try:
            value = float(number)
        except ValueError:
            value = -1.0
        if not 0.0 <= value <= 1.0 or (sep and not name.strip()):
            raise DetserveError(
                f"--threshold {text!r}: expected CLASS=SCORE or SCORE, 0 <= SCORE <= 1", hint="e.g. --threshold car=0.3"
            )
        if sep:
            per_class[name.strip()] = value
        else:
            default = value
    return Thresholds(default, per_class)


@dataclass
class PrelabelSummary:
    files: list[Path] = field(default_factory=list)
    images: int = 0
    boxes: int = 0
    skipped_failures: int = 0
    audit: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Image:
    path: str
    width: int
    height: int
    boxes: list[dict[str, Any]]


def prelabel(
    results: Path,
    out: Path,
    fmt: str,
    thresholds: Thresholds,
    *,
    class_names: dict[int, str] | None = None,
    image_prefix: str = "/data/local-files/?d=",
    audit: int = 0,
    seed: int = 0,
) -> PrelabelSummary:
    """Write ``fmt`` files for every image of ``results`` (failure lines skipped) into ``out``."""
    if fmt not in FORMATS:
        raise DetserveError(f"unknown format {fmt!r}", hint=f"choose one of: {', '.join(FORMATS)}")
    info = RunInfo.read(results)
    names = dict(class_names if class_names is not None else info.class_names)
    summary = PrelabelSummary()
    images = list(_images(results, names, thresholds, summary))
    categories = _categories(names, images)
    out.mkdir(parents=True, exist_ok=True)
    writer = {"coco": _write_coco, "yolo": _write_yolo, "labelstudio": _write_labelstudio}[fmt]
    version = f"{info.model}:{info.extra.get('model_version', '?')}"
    summary.files = writer(out, images, categories, version=version, image_prefix=image_prefix)
    if audit:
        summary.audit = audit_sample([i.path for i in images], audit, seed)
        summary.files += _write_audit(out, summary.audit, image_prefix, seed)
    summary.images, summary.boxes = len(images), sum(len(i.boxes) for i in images)
    return summary


def _images(results: Path, names: dict[int, str], thresholds: Thresholds, summary: PrelabelSummary) -> Iterator[_Image]:
    for record in read_records(results):
        if "error" in record or record.get("width") is None:
            summary.skipped_failures += 1
            continue
        boxes = []
        for d in record.get("detections") or ():
            cls = names.get(int(d["label"]), d.get("class") or f"class_{d['label']}")
            if float(d["score"]) >= thresholds.of(cls) and not is_background(cls):
                boxes.append({**d, "class": cls})
        yield _Image(str(record["path"]), int(record["width"]), int(record["height"]), boxes)


def _categories(names: dict[int, str], images: list[_Image]) -> list[tuple[int, str]]:
    """(label, name) of every real class: the model's names (background left out) and any label seen without one."""
    seen = {(int(b["label"]), str(b["class"])) for i in images for b in i.boxes}
    named = {(label, name) for label, name in names.items() if not is_background(name)}
    return sorted(named | seen)


def _coco_ids(categories: list[tuple[int, str]]) -> dict[int, int]:
    """COCO category ids are the model's labels, shifted by one where label 0 is a real class (YOLO) so ids start at 1."""
    shift = 1 if any(label == 0 for label, _ in categories) else 0
    return {label: label + shift for label, _ in categories}


def _write_coco(out: Path, images: list[_Image], categories: list[tuple[int, str]], **_: Any) -> list[Path]:
    ids = _coco_ids(categories)
    coco: dict[str, Any] = {
        "info": {"description": "detserve prelabel: model pre-annotations, to be reviewed"},
        "images": [], "annotations": [],
        "categories": [{"id": ids[label], "name": name, "supercategory": "object"} for label, name in categories],
    }  # fmt: skip
    for image_id, image in enumerate(images, start=1):
        coco["images"].append({"id": image_id, "file_name": image.path, "width": image.width, "height": image.height})
        for b in image.boxes:
            x1, y1, x2, y2 = b["box"]
            w, h = max(x2 - x1, 0.0), max(y2 - y1, 0.0)
            coco["annotations"].append({
                "id": len(coco["annotations"]) + 1, "image_id": image_id, "category_id": ids[int(b["label"])],
                "bbox": [round(x1, 2), round(y1, 2), round(w, 2), round(h, 2)], "area": round(w * h, 2), "iscrowd": 0,
                "score": b["score"],
            })  # fmt: skip
    path = out / "annotations.json"
    path.write_text(json.dumps(coco))
    return [path]


def _write_yolo(out: Path, images: list[_Image], categories: list[tuple[int, str]], **_: Any) -> list[Path]:
    index = {label: i for i, (label, _) in enumerate(categories)}  # YOLO class ids are 0..K-1 in this order
    written = []
    for image in images:
        lines = []
        for b in image.boxes:
            x1, y1, x2, y2 = (float(v) for v in b["box"])
            cx, cy = (x1 + x2) / 2 / image.width, (y1 + y2) / 2 / image.height
            w, h = (x2 - x1) / image.width, (y2 - y1) / image.height
            lines.append(f"{index[int(b['label'])]} {_unit(cx):.6f} {_unit(cy):.6f} {_unit(w):.6f} {_unit(h):.6f}")
        path = out / "labels" / PurePosixPath(image.path).with_suffix(".txt")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(line + "\n" for line in lines))
        written.append(path)
    classes = out / "classes.txt"
    classes.write_text("".join(f"{name}\n" for _, name in categories))
    return [classes, out / "labels"] if written else [classes]


def _unit(v: float) -> float:
    return min(max(v, 0.0), 1.0)


def _write_labelstudio(
    out: Path, images: list[_Image], categories: list[tuple[int, str]], *, version: str, image_prefix: str
) -> list[Path]:
    tasks = []
    for image in images:
        result = [_ls_box(image, b, k) for k, b in enumerate(image.boxes)]
        score = min((float(b["score"]) for b in image.boxes), default=0.0)  # the weakest box: what needs a look
        task: dict[str, Any] = {"data": {"image": image_prefix + image.path}}
        task["predictions"] = [{"model_version": version, "score": round(score, 5), "result": result}]
        tasks.append(task)
    path = out / "tasks.json"
    path.write_text(json.dumps(tasks))
    return [path, _write_ls_config(out, categories)]


def _ls_box(image: _Image, b: dict[str, Any], k: int) -> dict[str, Any]:
    x1, y1, x2, y2 = (float(v) for v in b["box"])
    value = {
        "x": 100.0 * x1 / image.width, "y": 100.0 * y1 / image.height,
        "width": 100.0 * (x2 - x1) / image.width, "height": 100.0 * (y2 - y1) / image.height,
        "rotation": 0, "rectanglelabels": [str(b["class"])],
    }  # fmt: skip
    return {
        "id": hashlib.sha1(f"{image.path}\0{k}".encode()).hexdigest()[:10], "type": "rectanglelabels",
        "from_name": LS_FROM, "to_name": LS_TO, "original_width": image.width, "original_height": image.height,
        "image_rotation": 0, "value": {key: round(v, 4) if isinstance(v, float) else v for key, v in value.items()},
        "score": float(b["score"]),
    }  # fmt: skip


def _write_ls_config(out: Path, categories: list[tuple[int, str]]) -> Path:
    from xml.sax.saxutils import quoteattr

    labels = "\n".join(f"    <Label value={quoteattr(name)}/>" for _, name in categories)
    xml = f'<View>\n  <Image name="{LS_TO}" value="$image"/>\n  <RectangleLabels name="{LS_FROM}" toName="{LS_TO}">\n{labels}\n  </RectangleLabels>\n</View>\n'
    path = out / "labeling-config.xml"
    path.write_text(xml)
    return path


def audit_sample(paths: list[str], n: int, seed: int) -> list[str]:
    """``n`` paths chosen by ``sha256(seed, path)`` (the same sample for the same seed, in any file order), sorted."""
    if n < 0:
        raise DetserveError(f"--audit must be >= 0, got {n}")
    ranked = sorted(paths, key=lambda p: hashlib.sha256(f"{seed}\0{p}".encode()).digest())
    return sorted(ranked[:n])


def _write_audit(out: Path, sample: list[str], image_prefix: str, seed: int) -> list[Path]:
    """The audit sample twice: a list, and Label Studio tasks *without* predictions for blind re-annotation."""
    listing = out / "audit.txt"
    listing.write_text(f"# seed {seed}: annotate these without pre-annotations, then compare (docs/offline-jobs.md)\n")
    with listing.open("a") as f:
        f.writelines(p + "\n" for p in sample)
    blind = out / "audit-tasks.json"
    blind.write_text(json.dumps([{"data": {"image": image_prefix + p}} for p in sample]))
    return [listing, blind]
