"""The in-process reference for a served model: the exact PyTorch detector its build record names.

Eval and compare score the live endpoint against the eager model on the same weights, detected the
way its own library does it (torchvision's ``model(images)``, ultralytics' ``predict``); the record
(``<name>_core/<version>/build.json``) says which detector, classes, keywords and checkpoint the
served version was built from, and the checkpoint's hash proves it is still the same file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from detserve.errors import SpecError
from detserve.pipeline import CORE, model_name


def build_record(repository: Path, name: str, version: int | None = None) -> tuple[int, dict[str, Any]]:
    """(version, record) of ``name``'s core; by default the version the ensemble serves."""
    from detserve.ops.versions import serving_version

    v = version if version is not None else serving_version(Path(repository), name)
    path = Path(repository) / model_name(name, CORE) / str(v) / "build.json"
    if not path.is_file():
        raise SpecError(f"no build record {path}", hint=f"is {name!r} version {v} built in {repository}? (detserve models list)")
    return v, json.loads(path.read_text())


class EagerReference:
    """The eager model a version was built from and its family's own detection path (the parity reference)."""

    def __init__(self, family: Any, model: Any) -> None:
        self.family, self.model = family, model

    def detect(
        self, rgb: np.ndarray, score_threshold: float, max_det: int, iou_threshold: float | None = None
    ) -> dict[str, np.ndarray]:
        """The library's own detections for one decoded RGB image (iou None: the model's own NMS threshold)."""
        return dict(self.family.reference(self.model, rgb, score_threshold, iou_threshold, max_det))


def reference_model(record: dict[str, Any]) -> EagerReference:
    """The eager detector with the served weights (by its family), in eval mode."""
    from detserve.families import family, family_for_detector
    from detserve.hashing import checkpoint_sha256

    fam = family(record["family"]) if record.get("family") else family_for_detector(record["detector"])
    kwargs = dict(record.get("model_kwargs") or {})
    ckpt = record.get("checkpoint")
    if record.get("spread_init_seed") is None and ckpt is not None:
        if not Path(ckpt).exists():
            raise SpecError(
                f"the checkpoint this version was built from is not at {ckpt}",
                hint="run from the directory the build ran in, or rebuild with an absolute --checkpoint",
            )
        if record.get("checkpoint_sha256") and checkpoint_sha256(ckpt) != record["checkpoint_sha256"]:
            raise SpecError(f"checkpoint {ckpt} changed since the build (sha256 differs from build.json)")
    model = fam.build(record["detector"], record["num_classes"], ckpt, kwargs, record.get("spread_init_seed"))
    return EagerReference(fam, model)
