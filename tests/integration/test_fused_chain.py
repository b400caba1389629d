"""The fused CPU layout of a multi-step family (R-CNN): the whole declared chain in one stub.

One server serves the built ensemble and its fused layout side by side (the fused model renamed
``<name>_fused``: both under one name cannot share a repository), so every comparison is the
ensemble's answer against the fused stub's for the same images in the same request shapes.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from clients.grpc_client import DetectorClient
from detserve.verification.matching import check_parity, match_detections
from tests.detector_fixtures import NUM_CLASSES, assert_each_image_answered_alone, detection_arrays, mixed_size_images

FRCNN = "fasterrcnn_mobilenet_v3_large_320_fpn"
MASKRCNN = "maskrcnn_resnet50_fpn"  # the parity table's small Mask R-CNN (slow: ResNet50)
MASK_KWARGS = {"min_size": 160, "max_size": 224, "rpn_pre_nms_top_n_test": 300, "rpn_post_nms_top_n_test": 100}
SCORE = 0.05  # the parity table's R-CNN threshold: seeded heads spread their scores around it


@contextlib.contextmanager
def _served_side_by_side(tmp: Path, detector: str, name: str, kwargs: dict[str, Any]) -> Iterator[tuple[str, Path]]:
    """Build ``detector`` as ``name``, fuse it, serve both (the fused one as ``<name>_fused``)."""
    from converters.fused import FusedOptions, fused_repository
    from converters.repository import BuildRequest, build_repository
    from detserve.ops.server import running_server
    from detserve.tritonconfig import read_config, render

    repo = tmp / "repo"
    request = BuildRequest(detector, repo, name=name, num_classes=NUM_CLASSES, spread_init_seed=0, model_kwargs=kwargs)
    build_repository(request)
    fused = fused_repository(repo, tmp / "fused", name, FusedOptions(instances=1)) / name
    renamed = repo / f"{name}_fused"
    shutil.copytree(fused, renamed)
    config = read_config(renamed)
    config.name = renamed.name
    (renamed / "config.pbtxt").write_text(render(config))
    with running_server(repo) as server:
        yield server.options.grpc_url, fused


@pytest.fixture(scope="module")
def frcnn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    with _served_side_by_side(tmp_path_factory.mktemp("frcnn"), FRCNN, "frcnn", {}) as served:
        yield served


def _assert_equal(ensemble: list[Any], fused: list[Any], what: str) -> int:
    """Per image, order-free: same labels, IoU >= 0.999, |dscore| <= 1e-5 (the batch-invariance
    tolerance), masks within FP16 rounding; returns the detections compared."""
    import numpy as np

    for i, (want, got) in enumerate(zip(ensemble, fused, strict=True)):
        result = check_parity(detection_arrays(got), detection_arrays(want), score_floor=0.0, iou_min=0.999, score_tol=1e-5)
        assert result.ok, f"{what}, image {i}: {result.failures[:5]}"
        if want.masks is not None:  # each matched pair's masks (near-tied scores may come in either order)
            assert got.masks is not None and got.masks.shape == want.masks.shape
            pairs = match_detections(*detection_arrays(want), *detection_arrays(got), iou_min=0.999).pairs
            assert len(pairs) == len(want.scores)
            for a, b in pairs:
                delta = np.abs(got.masks[b].astype(np.float32) - want.masks[a].astype(np.float32)).max()
                assert delta <= 1e-3, f"{what}, image {i}, detection {a}: masks differ by {delta}"
    return sum(len(w.scores) for w in ensemble)


def test_fused_layout_holds_every_core_and_the_chain_settings(frcnn: tuple[str, Path]) -> None:
    from detserve.tritonconfig import read_config

    _, fused = frcnn
    version_dir = next(p for p in fused.iterdir() if p.is_dir())
    assert {p.name for p in version_dir.iterdir()} == {"model.onnx", "roi_core.onnx", "model.py", "spec.json", "build.json"}
    config = read_config(fused)
    chain = json.loads(config.parameters["chain"].string_value)
    assert set(chain["cores"]) == {"core", "roi_core"} and chain["cores"]["roi_core"]["onnx_file"] == "roi_core.onnx"
    assert set(chain["torch_threads"]) == {"proposals", "postprocess"}
    assert [t.name for t in config.output] == ["num_detections", "boxes", "scores", "labels"]


def test_fused_chain_answers_what_the_ensemble_answers(frcnn: tuple[str, Path], samples: dict[str, bytes]) -> None:
    """Five images of different sizes in one request (each on its own canvas), and per-request controls."""
    url, _ = frcnn
    images = list(mixed_size_images(samples).values())
    strict = {"score_threshold": 0.3, "max_det": 3}
    with DetectorClient(url, "frcnn") as ensemble, DetectorClient(url, "frcnn_fused") as fused:
        compared = _assert_equal(
            ensemble.detect_batch(images, score_threshold=SCORE), fused.detect_batch(images, score_threshold=SCORE), "mixed"
        )
        alone = [fused.detect(b, score_threshold=SCORE) for b in images]
        _assert_equal([ensemble.detect(images[0], **strict)], [fused.detect(images[0], **strict)], "controls")
        capped = fused.detect(images[0], **strict)
    assert compared > 0, "no detections: the fixture needs a score spread"
    assert len(capped) <= 3 and (capped.scores >= 0.3).all()
    assert sum(len(a.scores) for a in alone) == compared
    assert_each_image_answered_alone(url, "frcnn_fused", mixed_size_images(samples), "frcnn-fused", score_threshold=SCORE)


def test_a_bad_image_fails_alone_in_the_fused_chain(frcnn: tuple[str, Path], samples: dict[str, bytes]) -> None:
    from detserve.errors import ClientError

    url, _ = frcnn
    good = list(samples.values())[:2]
    with DetectorClient(url, "frcnn_fused") as client:
        results = client.detect_many([good[0], b"not an image", good[1]])
    assert isinstance(results[1], ClientError) and "image" in str(results[1]).lower()
    assert all(not isinstance(r, ClientError) for i, r in enumerate(results) if i != 1)


@pytest.mark.slow
def test_fused_mask_chain_answers_masks_as_the_ensemble(tmp_path: Path, samples: dict[str, bytes]) -> None:
    """Mask R-CNN: detections, proposals, ROI core, mask core in one stub; the masks are the ensemble's."""
    images = list(mixed_size_images(samples, count=3).values())
    with _served_side_by_side(tmp_path, MASKRCNN, "mrcnn", MASK_KWARGS) as (url, _):
        with DetectorClient(url, "mrcnn") as ensemble, DetectorClient(url, "mrcnn_fused") as fused:
            want = ensemble.detect_batch(images, score_threshold=SCORE)
            got = fused.detect_batch(images, score_threshold=SCORE)
        assert all(g.masks is not None for g in got)
        assert _assert_equal(want, got, "masks") > 0
