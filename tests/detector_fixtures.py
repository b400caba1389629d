"""The four detectors the parity tests serve: small sizes where the model is heavy, and heads
initialised with a fixed seed so scores spread over 0..1 (random init gives near-uniform scores)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

NUM_CLASSES = 5

# name -> (model keyword arguments, spread_head_init keyword arguments)
PARITY_DETECTORS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "ssdlite320_mobilenet_v3_large": ({}, {"seed": 0}),
    "ssd300_vgg16": ({}, {"seed": 0, "fraction_above": 0.0003}),
    "retinanet_resnet50_fpn_v2": ({"min_size": 256, "max_size": 320}, {"seed": 0}),
    "fcos_resnet50_fpn": ({"min_size": 256, "max_size": 320, "score_thresh": 0.05}, {"seed": 0}),
}

SHORT_NAMES = {
    "ssdlite320_mobilenet_v3_large": "ssdlite",
    "ssd300_vgg16": "ssd300",
    "retinanet_resnet50_fpn_v2": "retinanet",
    "fcos_resnet50_fpn": "fcos",
}


def make_checkpoint(detector: str, directory: Path) -> Path:
    """A state dict on disk, so the build goes through the real checkpoint path."""
    import torch

    from detserve.families.torchvision_models import build_detector, spread_head_init

    kwargs, spread = PARITY_DETECTORS[detector]
    torch.manual_seed(0)
    model = build_detector(detector, NUM_CLASSES, **kwargs)
    spread_head_init(model, **spread)
    path = directory / f"{SHORT_NAMES[detector]}.pt"
    torch.save(model.state_dict(), path)
    return path


def eager_model(detector: str, checkpoint: Path) -> Any:
    from detserve.families.torchvision_models import build_detector

    kwargs, _ = PARITY_DETECTORS[detector]
    return build_detector(detector, NUM_CLASSES, checkpoint, **kwargs)


def odd_images() -> dict[str, bytes]:
    """Generated PNGs beside the sample photos: odd sizes and aspect ratios, tiny, grey (seeded)."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(3)
    out = {}
    for h, w, mode in [(37, 501, "RGB"), (480, 211, "RGB"), (3, 3, "RGB"), (257, 255, "L")]:
        pixels = rng.integers(0, 256, (h, w, 3) if mode == "RGB" else (h, w), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="PNG")
        out[f"generated_{h}x{w}_{mode}.png"] = buf.getvalue()
    return out


def detection_arrays(d: Any) -> tuple[Any, Any, Any]:
    """(boxes, scores, int32 labels) of a client ``Detections`` or a reference's dict, for check_parity."""
    import numpy as np

    if isinstance(d, dict):
        return d["boxes"], d["scores"], np.asarray(d["labels"]).astype(np.int32)
    return d.boxes, d.scores, d.labels
