"""Verification rungs 1, 3 and 5 against the live server, for every detector family.

1. the server's preprocessed tensor equals torchvision's ``model.transform`` output bit for bit;
3. served detections equal the eager torchvision model's own ``model(images)``, order-free;
5. an image's detections do not depend on its batch neighbours or position.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from clients.grpc_client import Detections, DetectorClient
from detserve.runtime.imaging import decode_image
from detserve.verification.matching import check_parity
from tests.detector_fixtures import (
    PARITY_DETECTORS,
    SHORT_NAMES,
    assert_each_image_answered_alone,
    eager_model,
    mixed_size_images,
)

REPORTS = Path(__file__).resolve().parents[2] / "out" / "reports"
DETECTORS = list(PARITY_DETECTORS)


def _to_tensor(blob: bytes) -> Any:
    """The reference path: torchvision's own uint8 -> float conversion, not detserve's."""
    from torchvision.transforms.functional import to_tensor

    return to_tensor(decode_image(blob, 10**9))


@pytest.fixture(scope="module")
def eager(checkpoints: dict[str, Path], samples: dict[str, bytes]) -> dict[str, dict[str, Any]]:
    """Each detector's eager outputs for each sample photograph, computed once."""
    import torch

    out: dict[str, dict[str, Any]] = {}
    for detector in DETECTORS:
        model = eager_model(detector, checkpoints[detector])
        with torch.no_grad():
            out[detector] = {"model": model, **{k: model([_to_tensor(b)])[0] for k, b in samples.items()}}
    return out


def _as_tuple(d: Detections | dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if isinstance(d, Detections):
        return d.boxes, d.scores, d.labels
    return d["boxes"].numpy(), d["scores"].numpy(), d["labels"].numpy().astype(np.int32)


@pytest.mark.parametrize("detector", DETECTORS)
def test_preprocessing_is_bit_exact(detector: str, grpc_url: str, samples: dict[str, bytes], eager: dict[str, Any]) -> None:
    model = eager[detector]["model"]
    with DetectorClient(grpc_url, SHORT_NAMES[detector]) as client:
        for name, blob in samples.items():
            served, info = client.preprocessed(blob)
            ref = model.transform([_to_tensor(blob)])[0]
            expected = ref.tensors[0].numpy()
            assert served.shape == expected.shape, name
            assert np.array_equal(served, expected), f"{name}: max diff {np.abs(served - expected).max()}"
            assert tuple(info[2:4]) == tuple(ref.image_sizes[0]), name


@pytest.mark.parametrize("detector", DETECTORS)
def test_detections_equal_eager_torchvision(
    detector: str, grpc_url: str, samples: dict[str, bytes], eager: dict[str, Any]
) -> None:
    stats = {}
    with DetectorClient(grpc_url, SHORT_NAMES[detector]) as client:
        for name, blob in samples.items():
            served = client.detect(blob)
            ref = eager[detector][name]
            assert len(ref["scores"]) > 0, f"{name}: the eager model found nothing; the fixture needs a score spread"
            result = check_parity(_as_tuple(served), _as_tuple(ref), score_floor=0.05, iou_min=0.99, score_tol=1e-3)
            assert result.ok, f"{detector} {name}: {result.failures[:5]}"
            stats[name] = {
                "matched": result.matched,
                "total_eager_ge_0.05": result.total,
                "served": len(served),
                "eager": len(ref["scores"]),
                "max_abs_dscore": result.max_score_delta,
                "max_box_delta_px": result.max_box_delta,
                "min_iou": result.min_iou,
            }
    REPORTS.mkdir(parents=True, exist_ok=True)
    (REPORTS / f"parity-{SHORT_NAMES[detector]}.json").write_text(json.dumps(stats, indent=2))


@pytest.mark.parametrize("detector", DETECTORS)
def test_batch_neighbours_do_not_change_detections(detector: str, grpc_url: str, samples: dict[str, bytes]) -> None:
    names = list(samples) * 3
    random.Random(0).shuffle(names)
    with DetectorClient(grpc_url, SHORT_NAMES[detector]) as client:
        single = {n: client.detect(b) for n, b in samples.items()}
        together = client.detect_many([samples[n] for n in names], max_in_flight=len(names))
    for name, res in zip(names, together, strict=True):
        assert isinstance(res, Detections), res
        result = check_parity(_as_tuple(res), _as_tuple(single[name]), score_floor=0.0, iou_min=0.999, score_tol=1e-5)
        assert result.ok, f"{name}: {result.failures[:5]}"


@pytest.mark.parametrize("detector", DETECTORS)
def test_each_image_of_a_multi_image_request_answers_as_alone(detector: str, grpc_url: str, samples: dict[str, bytes]) -> None:
    """Five images of different sizes in one request: FCOS/RetinaNet pad each to its own canvas (not
    the largest of the request), SSD resizes all to one size; each answers what it answers alone."""
    assert_each_image_answered_alone(grpc_url, SHORT_NAMES[detector], mixed_size_images(samples), SHORT_NAMES[detector])


def test_per_request_controls_reach_the_postprocessing(grpc_url: str, samples: dict[str, bytes], eager: dict[str, Any]) -> None:
    import torch

    detector = "retinanet_resnet50_fpn_v2"
    model = eager[detector]["model"]
    blob = samples["astronaut.jpg"]
    with DetectorClient(grpc_url, SHORT_NAMES[detector]) as client:
        default = client.detect(blob)
        strict = client.detect(blob, score_threshold=0.2, iou_threshold=0.3, max_det=7)
        many = client.detect(blob, score_threshold=0.0, max_det=1000)
    assert len(strict) <= 7 and (strict.scores >= 0.2).all()
    assert len(many) > len(default)
    model.score_thresh, model.nms_thresh, model.detections_per_img = 0.2, 0.3, 7
    try:
        with torch.no_grad():
            ref = model([_to_tensor(blob)])[0]
    finally:
        kwargs = PARITY_DETECTORS[detector][0]
        model.score_thresh, model.nms_thresh, model.detections_per_img = kwargs.get("score_thresh", 0.05), 0.5, 300
    assert check_parity(_as_tuple(strict), _as_tuple(ref)).ok
