"""The class names a build records beside its ensemble: ``<repository>/<name>/<version>/labels.json``.

Why a file of its own: the model config, where names could live, is an admin API;
the gate serves this document on open paths instead (HTTP ``GET /v2/models/<name>/labels``, gRPC
``detserve.v1.Labels/Get``, ``detserve/ops/health.py``), so any client names the labels it gets.

Where the names come from, first match wins:

1. the decode spec's own ``class_names`` (YOLO: read from the checkpoint);
2. the checkpoint's provenance file ``<checkpoint>.json`` (``classes``), used only when its
   ``weights.sha256`` is the checkpoint's (the demo detector's weights carry one);
3. a torchvision detector with 91 classes: torchvision's COCO category names (label = COCO id,
   0 = background, "N/A" for the ids COCO skips), the label space of every torchvision COCO weight;
4. otherwise ``class_<label>``.

``names[i]`` names label ``i`` as the server returns it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from detserve.pipeline import LABELS_FILE

COCO_CLASSES = 91  # torchvision's COCO label space: ids 1..90 and the background
TORCHVISION_FAMILIES = ("ssd", "retinanet", "fcos", "rcnn")  # family names of torchvision detectors


def _coco_names() -> list[str]:
    from torchvision.models._meta import _COCO_CATEGORIES  # the list every torchvision COCO weight's meta uses

    return list(_COCO_CATEGORIES)


def _provenance_names(checkpoint: Path | None, sha256: str | None) -> list[str] | None:
    if checkpoint is None or sha256 is None:
        return None
    path = Path(checkpoint).with_suffix(".json")
    try:
        provenance = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    same_file = isinstance(provenance, dict) and (provenance.get("weights") or {}).get("sha256") == sha256
    classes = provenance.get("classes") if same_file else None
    return [str(n) for n in classes] if isinstance(classes, list) and classes else None


def label_names(record: dict[str, Any], spec: Any) -> tuple[list[str], str]:
    """(names by label, where they came from) for a build's ``record`` (build.json) and ``spec``."""
    num_classes = int(record["num_classes"])
    own = getattr(spec.postprocess, "class_names", None)
    if own:
        return [str(n) for n in own], "the checkpoint's class names (decode spec)"
    checkpoint = Path(record["checkpoint"]) if record.get("checkpoint") else None
    found = _provenance_names(checkpoint, record.get("checkpoint_sha256"))
    if found is not None and checkpoint is not None:
        return found, f"the checkpoint's provenance file {checkpoint.with_suffix('.json').name}"
    if record.get("family") in TORCHVISION_FAMILIES and num_classes == COCO_CLASSES:
        return _coco_names(), "torchvision COCO categories (91 classes: label = COCO category id, 0 = background)"
    return [f"class_{i}" for i in range(num_classes)], "none recorded: class_<label>"


def write_labels(ensemble_version_dir: Path, record: dict[str, Any], spec: Any) -> dict[str, Any]:
    """Write the labels document into the ensemble's version directory; returns it."""
    names, source = label_names(record, spec)
    document = {
        "model": record["name"],
        "version": int(record["version"]),
        "names": names,
        "source": source,
        "weights": record.get("weights"),
    }
    (ensemble_version_dir / LABELS_FILE).write_text(json.dumps(document, indent=2) + "\n")
    return document
