"""The in-process reference for a served model: the exact PyTorch detector its build record names.

Eval and compare score the live endpoint against eager torchvision on the same weights; the record
(``<name>_core/<version>/build.json``) says which detector, classes, keywords and checkpoint the
served version was built from, and the checkpoint's hash proves it is still the same file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from detserve.errors import SpecError


def build_record(repository: Path, name: str, version: int | None = None) -> tuple[int, dict[str, Any]]:
    """(version, record) of ``name``'s core; by default the version the ensemble serves."""
    from detserve.versions import serving_version

    v = version if version is not None else serving_version(Path(repository), name)
    path = Path(repository) / f"{name}_core" / str(v) / "build.json"
    if not path.is_file():
        raise SpecError(f"no build record {path}", hint=f"is {name!r} version {v} built in {repository}? (detserve models list)")
    return v, json.loads(path.read_text())


def reference_model(record: dict[str, Any]) -> Any:
    """Eager torchvision detector with the served weights, in eval mode."""
    from converters.detectors import build_detector, file_sha256, spread_init_detector

    kwargs = dict(record.get("model_kwargs") or {})
    if record.get("spread_init_seed") is not None:
        model = spread_init_detector(record["detector"], record["num_classes"], record["spread_init_seed"], **kwargs)
    else:
        ckpt = record.get("checkpoint")
        if ckpt is not None:
            if not Path(ckpt).is_file():
                raise SpecError(
                    f"the checkpoint this version was built from is not at {ckpt}",
                    hint="run from the directory the build ran in, or rebuild with an absolute --checkpoint",
                )
            if record.get("checkpoint_sha256") and file_sha256(ckpt) != record["checkpoint_sha256"]:
                raise SpecError(f"checkpoint {ckpt} changed since the build (sha256 differs from build.json)")
        model = build_detector(record["detector"], record["num_classes"], ckpt, **kwargs)
    return model.eval()


def pytorch_detect(model: Any, rgb: np.ndarray, score_threshold: float, max_det: int) -> dict[str, np.ndarray]:
    """``model([image])`` with per-call thresholds, exactly as torchvision runs it."""
    import torch

    saved = (model.score_thresh, model.detections_per_img)
    model.score_thresh, model.detections_per_img = score_threshold, max_det
    try:
        with torch.no_grad():
            out = model([torch.from_numpy(rgb).permute(2, 0, 1).float().div(255.0)])[0]
    finally:
        model.score_thresh, model.detections_per_img = saved
    return {k: out[k].numpy() for k in ("boxes", "scores", "labels")}
