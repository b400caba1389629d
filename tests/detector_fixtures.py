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

    from detserve.families.torchvision.models import build_detector, spread_head_init

    kwargs, spread = PARITY_DETECTORS[detector]
    torch.manual_seed(0)
    model = build_detector(detector, NUM_CLASSES, **kwargs)
    spread_head_init(model, **spread)
    path = directory / f"{SHORT_NAMES[detector]}.pt"
    torch.save(model.state_dict(), path)
    return path


def eager_model(detector: str, checkpoint: Path) -> Any:
    from detserve.families.torchvision.models import build_detector

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


def mixed_size_images(samples: dict[str, bytes], count: int = 5) -> dict[str, bytes]:
    """``count`` images of different sizes and aspect ratios (photos and generated ones, one grey)."""
    pool = {**samples, **odd_images()}
    picked = ["astronaut.jpg", "chelsea.png", "coffee.jpg", "generated_480x211_RGB.png", "generated_257x255_L.png"]
    return {n: pool[n] for n in picked[:count]}


def assert_each_image_answered_alone(
    url: str, model: str, images: dict[str, bytes], report: str, **controls: Any
) -> dict[str, Any]:
    """One request holding all ``images`` (different sizes; in two orders) answers each image exactly
    what a request holding it alone answers (issue 21 part 3: the batch-invariance tolerance); the
    figures go to out/reports/multi-image.json under ``report`` (images, max |dscore|, max box delta)."""
    from clients.grpc_client import DetectorClient
    from detserve.verification.matching import check_parity
    from tests.reports import record

    names = list(images)
    with DetectorClient(url, model) as client:
        alone = {n: client.detect(images[n], **controls) for n in names}
        forward = client.detect_batch([images[n] for n in names], **controls)
        backward = client.detect_batch([images[n] for n in reversed(names)], **controls)[::-1]
    worst = {"images": len(names), "detections": 0, "max_score_delta": 0.0, "max_box_delta": 0.0}
    for together in (forward, backward):
        for name, res in zip(names, together, strict=True):
            result = check_parity(
                detection_arrays(res), detection_arrays(alone[name]), score_floor=0.0, iou_min=0.999, score_tol=1e-5
            )
            assert result.ok, f"{model} {name} in a request of {len(names)} images: {result.failures[:5]}"
            worst["max_score_delta"] = max(worst["max_score_delta"], float(result.max_score_delta))
            worst["max_box_delta"] = max(worst["max_box_delta"], float(result.max_box_delta))
    worst["detections"] = sum(len(alone[n].scores) for n in names)
    assert worst["detections"] > 0, f"{model}: no detections at all; the fixture needs a score spread"
    record("multi-image.json", report, worst)
    return worst
