"""The DETR family through the real server, against transformers itself (issue 13).

RT-DETR and DETR (small configurations of the real architectures, seeded weights with a score
spread), one repository and one server for the module:
1. the server's preprocessed tensor equals the image processor's ``pixel_values``, difference 0;
3. served detections equal the processor + eager model + ``post_process_object_detection``,
   order-free: every detection >= 0.05 on either side matched (same label, IoU >= 0.99, |dscore| <= 1e-3);
5. an image's detections do not change with its batch neighbours (DETR: images of other sizes);
and the per-request controls: score threshold, max_det bounded by the queries, the IoU threshold
accepted and ignored; ``detserve compare`` with transformers as the reference.
RT-DETRv2 / D-FINE and ``eval`` run in the slow set.
"""

from __future__ import annotations

import importlib.util
import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from clients.grpc_client import Detections, DetectorClient
from detserve.ops.server import TritonServer, running_server
from detserve.runtime.imaging import decode_image
from detserve.verification.matching import check_parity
from tests.detector_fixtures import assert_each_image_answered_alone, detection_arrays, mixed_size_images, odd_images

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None, reason="the DETR family needs the 'transformers' extra"
)

REPORTS = Path(__file__).resolve().parents[2] / "out" / "reports"
MODELS = {"rtdetr_tiny": "rtdetr", "detr_tiny": "detr"}
SLOW_MODELS = {"rtdetr_v2_tiny": "rtdetr2", "dfine_tiny": "dfine"}
CONF, QUERIES = 0.01, 30


def _build(repo: Path, models: dict[str, str]) -> None:
    from converters.repository import BuildRequest, build_repository

    for detector, name in models.items():
        build_repository(BuildRequest(detector=detector, repository=repo, name=name, num_classes=5, spread_init_seed=0))


@pytest.fixture(scope="module")
def detr_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("detr_repository")
    _build(repo, MODELS)
    return repo


@pytest.fixture(scope="module")
def detr_server(detr_repo: Path) -> Iterator[TritonServer]:
    with running_server(detr_repo) as server:
        yield server


@pytest.fixture(scope="module")
def references(detr_repo: Path) -> dict[str, Any]:
    from detserve.verification.reference import build_record, reference_model

    return {name: reference_model(build_record(detr_repo, name)[1]) for name in MODELS.values()}


@pytest.fixture(scope="module")
def images(samples: dict[str, bytes]) -> dict[str, bytes]:
    return {**samples, **odd_images()}


def _parity(url: str, name: str, reference: Any, images: dict[str, bytes]) -> dict[str, Any]:
    stats: dict[str, Any] = {}
    with DetectorClient(url, name) as client:
        for file, blob in images.items():
            served = client.detect(blob, score_threshold=CONF, max_det=QUERIES)
            ref = reference.detect(decode_image(blob, 1 << 30), CONF, QUERIES, None)
            result = check_parity(detection_arrays(served), detection_arrays(ref), score_floor=0.05, iou_min=0.99, score_tol=1e-3)
            assert result.ok, f"{name} {file}: {result.failures[:5]}"
            stats[file] = {
                "matched": result.matched,
                "total_ge_0.05": result.total,
                "served": len(served),
                "transformers": len(ref["scores"]),
                "max_abs_dscore": result.max_score_delta,
                "max_box_delta_px": result.max_box_delta,
            }
    assert sum(s["total_ge_0.05"] for s in stats.values()) > 50, "the fixture needs a score spread"
    REPORTS.mkdir(parents=True, exist_ok=True)
    (REPORTS / f"parity-{name}.json").write_text(json.dumps(stats, indent=2))
    return stats


@pytest.mark.parametrize("name", list(MODELS.values()))
def test_preprocessing_equals_the_image_processor(
    name: str, detr_server: TritonServer, references: dict[str, Any], images: dict[str, bytes]
) -> None:
    processor = references[name].model.detserve_processor
    with DetectorClient(detr_server.options.grpc_url, name) as client:
        for file, blob in images.items():
            rgb = decode_image(blob, 1 << 30)
            theirs = processor(images=rgb, input_data_format="channels_last", return_tensors="pt")["pixel_values"][0].numpy()
            served, info = client.preprocessed(blob)
            assert served.shape == theirs.shape, file
            assert np.array_equal(served, theirs), f"{file}: max diff {np.abs(served - theirs).max()}"
            assert tuple(info.reshape(-1)[:2]) == rgb.shape[:2]


@pytest.mark.parametrize("name", list(MODELS.values()))
def test_detections_equal_post_process_object_detection(
    name: str, detr_server: TritonServer, references: dict[str, Any], images: dict[str, bytes]
) -> None:
    _parity(detr_server.options.grpc_url, name, references[name], images)


@pytest.mark.parametrize("name", list(MODELS.values()))
def test_batch_neighbours_do_not_change_detections(name: str, detr_server: TritonServer, images: dict[str, bytes]) -> None:
    names = list(images) * 2
    random.Random(0).shuffle(names)
    with DetectorClient(detr_server.options.grpc_url, name) as client:
        single = {n: client.detect(b, score_threshold=CONF) for n, b in images.items()}
        together = client.detect_many([images[n] for n in names], score_threshold=CONF, max_in_flight=len(names))
    for file, res in zip(names, together, strict=True):
        assert isinstance(res, Detections), res
        result = check_parity(
            detection_arrays(res), detection_arrays(single[file]), score_floor=0.0, iou_min=0.999, score_tol=1e-5
        )
        assert result.ok, f"{file}: {result.failures[:5]}"


@pytest.mark.parametrize("name", list(MODELS.values()))
def test_each_image_of_a_multi_image_request_answers_as_alone(
    name: str, detr_server: TritonServer, samples: dict[str, bytes]
) -> None:
    """DETR pads each image to its own canvas (not the largest of the request); RT-DETR resizes all to one size."""
    assert_each_image_answered_alone(detr_server.options.grpc_url, name, mixed_size_images(samples), name, score_threshold=CONF)


def test_per_request_controls(detr_server: TritonServer, samples: dict[str, bytes]) -> None:
    """Score threshold and max_det per request; max_det beyond the queries gives at most the queries;
    the IoU threshold is accepted (validated) and changes nothing: there is no NMS."""
    from detserve.errors import DetserveError

    blob = samples["astronaut.jpg"]
    with DetectorClient(detr_server.options.grpc_url, "rtdetr") as client:
        everything = client.detect(blob, score_threshold=0.0, max_det=1000)
        assert len(everything) == QUERIES  # sigmoid top-k: one detection per query at most
        strict = client.detect(blob, score_threshold=0.2, max_det=3)
        assert 0 < len(strict) <= 3 and (strict.scores > 0.2).all()
        assert np.array_equal(strict.scores, everything.scores[: len(strict)])
        loose_iou = client.detect(blob, score_threshold=CONF, iou_threshold=1.0)
        tight_iou = client.detect(blob, score_threshold=CONF, iou_threshold=0.05)
        assert np.array_equal(loose_iou.boxes, tight_iou.boxes) and np.array_equal(loose_iou.scores, tight_iou.scores)
        default = client.detect(blob)
        assert (default.scores > 0.5).all()  # the processor's default threshold
        with pytest.raises(DetserveError, match="iou_threshold"):
            client.detect(blob, iou_threshold=0.0)


def test_compare_cli(detr_server: TritonServer, samples: dict[str, bytes], tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from detserve.app.cli import app

    folder = tmp_path / "images"
    folder.mkdir()
    for file, data in list(samples.items())[:2]:
        (folder / file).write_bytes(data)
    repo = detr_server.options.repository
    args = ["compare", "--model", "detr", "--repository", str(repo), "--url", detr_server.options.grpc_url, str(folder)]
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "cmp")])
    assert result.exit_code == 0, result.output
    assert "server" in result.output and "onnxruntime" in result.output


@pytest.mark.slow
def test_rtdetr_v2_and_dfine_parity_and_eval(tmp_path_factory: pytest.TempPathFactory, images: dict[str, bytes]) -> None:
    """RT-DETRv2 (discrete sampling) and D-FINE: the same parity on their own server, and ``eval``."""
    from detserve.verification.evalrun import run_eval
    from detserve.verification.reference import build_record, reference_model
    from training.synthetic import SPLITS, write_split

    repo = tmp_path_factory.mktemp("detr_slow_repository")
    _build(repo, SLOW_MODELS)
    data = tmp_path_factory.mktemp("detr_eval")
    write_split(SPLITS["test"], data, limit=4)
    with running_server(repo) as server:
        for name in SLOW_MODELS.values():
            _parity(server.options.grpc_url, name, reference_model(build_record(repo, name)[1]), images)
        report = run_eval(
            server.options.grpc_url, "rtdetr2", data / "annotations.json", data / "images", repo,
            max_det=QUERIES, progress=False, echo=lambda _: None,
        )  # fmt: skip
    assert report.pytorch is not None and not report.errors
    assert report.detections["served"] == report.detections["pytorch"] > 0
    assert abs(report.delta_points["mAP"]) <= 0.1 and report.within_tolerance


def test_an_image_the_processor_cannot_resize_fails_alone(detr_server: TritonServer, samples: dict[str, bytes]) -> None:
    """DETR's short side of a 1x2000 image rounds to 0 pixels: that request's error, with a hint; its batch neighbours serve."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((1, 2000, 3), 128, np.uint8)).save(buf, format="PNG")
    blobs = [samples["astronaut.jpg"], buf.getvalue(), samples["astronaut.jpg"]]
    with DetectorClient(detr_server.options.grpc_url, "detr") as client:
        results = client.detect_many(blobs, score_threshold=CONF, max_in_flight=3)
        again = client.detect(samples["astronaut.jpg"], score_threshold=CONF)
    assert isinstance(results[0], Detections) and isinstance(results[2], Detections)
    assert not isinstance(results[1], Detections) and "aspect ratio" in str(results[1])
    assert np.array_equal(results[0].scores, again.scores)
