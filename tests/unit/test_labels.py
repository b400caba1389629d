"""Where a build's class names come from (converters/labels.py), first match wins."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

from converters.labels import label_names


def _spec(**post: object) -> SimpleNamespace:
    return SimpleNamespace(postprocess=SimpleNamespace(**post))


def test_a_transformers_checkpoint_names_its_labels_with_its_id2label() -> None:
    names, source = label_names({"num_classes": 2, "family": "detr"}, _spec(class_names=("cat", "dog")))
    assert names == ["cat", "dog"] and "checkpoint" in source


def test_a_provenance_file_names_the_labels_only_for_its_own_weights(tmp_path: Path) -> None:
    ck = tmp_path / "w.pt"
    ck.write_bytes(b"weights")
    sha = hashlib.sha256(b"weights").hexdigest()
    ck.with_suffix(".json").write_text(json.dumps({"weights": {"sha256": sha}, "classes": ["bg", "a", "b"]}))
    record = {"num_classes": 3, "family": "ssd", "checkpoint": str(ck), "checkpoint_sha256": sha}
    assert label_names(record, _spec())[0] == ["bg", "a", "b"]
    other = {**record, "checkpoint_sha256": "0" * 64}  # a record beside other weights names nothing
    assert label_names(other, _spec())[0] == ["class_0", "class_1", "class_2"]


def test_torchvision_coco_weights_get_coco_names_and_anything_else_class_i() -> None:
    coco = label_names({"num_classes": 91, "family": "retinanet"}, _spec())[0]
    assert len(coco) == 91 and coco[1] == "person" and coco[0] == "__background__"
    assert label_names({"num_classes": 4, "family": "retinanet"}, _spec())[0] == [f"class_{i}" for i in range(4)]
