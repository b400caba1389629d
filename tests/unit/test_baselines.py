"""The benchmark's baselines: the in-process pipeline (the practical limit) and the Flask + eager service.

Both must compute what the served ensemble computes — the same detections as the eager
torchvision model — or the benchmark would compare different work.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from detserve.specs import RequestControls
from detserve.verification.matching import check_parity

DETECTOR = "ssdlite320_mobilenet_v3_large"
NUM_CLASSES = 5
SEED = 0

Triple = tuple[np.ndarray, np.ndarray, np.ndarray]


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small repository whose weights equal ``load_eager_model(..., spread_init_seed=0)``: the RNG is seeded alike."""
    import torch

    from converters.repository import BuildRequest, build_repository

    repo = tmp_path_factory.mktemp("baselines") / "repo"
    with torch.random.fork_rng():
        torch.manual_seed(SEED)
        build_repository(
            BuildRequest(detector=DETECTOR, repository=repo, name="tiny", num_classes=NUM_CLASSES, spread_init_seed=SEED)
        )
    return repo


@pytest.fixture(scope="module")
def pipeline(repository: Path) -> Any:
    from loadtest.inprocess import InProcessPipeline

    return InProcessPipeline.from_repository(repository, "tiny", intra_op_threads=2)


@pytest.fixture(scope="module")
def app() -> Any:
    from loadtest.flask_baseline import create_app

    return create_app(DETECTOR, NUM_CLASSES, spread_init_seed=SEED)


def _triple(d: dict[str, Any]) -> Triple:
    as_np = {k: v.numpy() if hasattr(v, "numpy") else np.asarray(v) for k, v in d.items()}
    return as_np["boxes"].astype(np.float32).reshape(-1, 4), as_np["scores"].astype(np.float32), as_np["labels"].astype(np.int64)


def _eager(samples: dict[str, bytes]) -> dict[str, Triple]:
    """The reference: torchvision's own ``model([image])`` on the decoded pixels."""
    import torch
    from torchvision.transforms.functional import to_tensor

    from detserve.runtime.imaging import decode_image
    from loadtest.flask_baseline import load_eager_model

    model = load_eager_model(DETECTOR, NUM_CLASSES, spread_init_seed=SEED)
    with torch.no_grad():
        return {name: _triple(model([to_tensor(decode_image(b, 10**9))])[0]) for name, b in samples.items()}


def _assert_parity(a: Triple, b: Triple, what: str, score_floor: float = 0.05) -> None:
    result = check_parity(a, b, score_floor=score_floor, iou_min=0.99, score_tol=1e-3)
    assert result.ok, f"{what}: {result.failures[:5]}"


def test_inprocess_pipeline_equals_eager_torchvision(pipeline: Any, samples: dict[str, bytes]) -> None:
    eager = _eager(samples)
    single = {name: pipeline.run([blob])[0] for name, blob in samples.items()}
    for name, det in single.items():
        assert len(eager[name][1]) > 0, f"{name}: the eager model found nothing; the fixture needs a score spread"
        _assert_parity(_triple(det), eager[name], name)
    batched = pipeline.run(list(samples.values()))  # one ORT call: every SSD image is 320x320
    for (name, det), together in zip(single.items(), batched, strict=True):
        _assert_parity(_triple(together), _triple(det), f"{name} in a batch", score_floor=0.0)


def test_inprocess_controls_apply_per_image(pipeline: Any, samples: dict[str, bytes]) -> None:
    blobs = list(samples.values())[:2]
    strict = RequestControls(score_threshold=0.3, iou_threshold=0.5, max_det=4)
    dets = pipeline.run(blobs, [strict, pipeline.default_controls()])
    assert len(dets[0]["scores"]) <= 4 and (dets[0]["scores"] > 0.3).all()
    assert len(dets[1]["scores"]) > 4
    assert dets[0]["boxes"].shape[1:] == (4,) and dets[0]["boxes"].dtype == np.float32
    with pytest.raises(ValueError, match="2 images but 1 request controls"):
        pipeline.run(blobs, [strict])


def test_inprocess_refuses_a_missing_model(repository: Path) -> None:
    from detserve.errors import SpecError
    from loadtest.inprocess import InProcessPipeline

    with pytest.raises(SpecError, match=r"no version with a model\.onnx"):
        InProcessPipeline.from_repository(repository, "absent")
    with pytest.raises(SpecError, match="not found"):
        InProcessPipeline.from_repository(repository, "tiny", version=7)


def test_measure_reports_every_batch_size(pipeline: Any, samples: dict[str, bytes]) -> None:
    from loadtest.inprocess import measure

    result = measure(pipeline, list(samples.values())[:3], batch_sizes=(1, 2), seconds_per_size=0.01)
    rows = result["per_batch_size"]
    assert [r["batch_size"] for r in rows] == [1, 2]
    for r in rows:
        assert r["batches"] >= 1 and r["images"] == r["batches"] * r["batch_size"]
        assert r["images_per_s"] > 0 and r["ms_per_batch"] > 0
        assert r["ms_per_image"] == pytest.approx(r["ms_per_batch"] / r["batch_size"])
    best = max(rows, key=lambda r: r["images_per_s"])
    assert result["best_batch_size"] == best["batch_size"] and result["best_images_per_s"] == best["images_per_s"]
    json.dumps(result)  # goes into bench.json as it is


def test_flask_app_detects_what_the_pipeline_detects(app: Any, pipeline: Any, samples: dict[str, bytes]) -> None:
    client = app.test_client()
    blob = samples["astronaut.jpg"]
    response = client.post("/detect", data=blob)
    assert response.status_code == 200, response.get_data(as_text=True)
    body = response.get_json()
    assert set(body) == {"boxes", "scores", "labels"} and len(body["scores"]) > 0
    _assert_parity(_triple(body), _triple(pipeline.run([blob])[0]), "flask vs in-process")
    limited = client.post("/detect?score_threshold=0.3&max_det=3", data=blob).get_json()
    assert 0 < len(limited["scores"]) <= 3 and min(limited["scores"]) > 0.3
    assert limited["scores"] == body["scores"][: len(limited["scores"])]  # a tighter cut of the same list


@pytest.mark.parametrize(
    ("query", "body", "message"),
    [
        ("", b"\x00garbage, not an image", "not a decodable image"),
        ("", b"", "empty image payload"),
        ("?max_det=2.5", None, "max_det must be an integer"),
        ("?score_threshold=0", None, "score_threshold must be in [0.001, 1]"),
        ("?iou_threshold=0.3", None, "unsupported query parameter(s): iou_threshold"),
    ],
)
def test_flask_app_refuses_bad_requests_with_a_message(
    app: Any, samples: dict[str, bytes], query: str, body: bytes | None, message: str
) -> None:
    response = app.test_client().post(f"/detect{query}", data=samples["coffee.jpg"] if body is None else body)
    assert response.status_code == 400
    assert message in response.get_json()["error"]


def test_flask_baseline_listens_on_loopback_only() -> None:
    from detserve.errors import ServerError
    from loadtest.flask_baseline import require_loopback, serve_flask

    assert require_loopback("127.0.0.1") == "127.0.0.1" and require_loopback("::1") == "::1"
    with pytest.raises(ServerError, match="loopback only"):
        serve_flask("0.0.0.0", 5000, detector=DETECTOR)


def test_flask_service_runs_as_a_subprocess(samples: dict[str, bytes]) -> None:
    from detserve.ops.server import free_port
    from loadtest.flask_baseline import FlaskService

    service = FlaskService(port=free_port(), detector=DETECTOR, num_classes=NUM_CLASSES, spread_init_seed=SEED)
    with service:
        req = urllib.request.Request(f"{service.url}/detect?max_det=5", data=samples["rocket.jpg"], method="POST")
        with urllib.request.urlopen(req, timeout=60) as response:
            body = json.loads(response.read())
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(urllib.request.Request(f"{service.url}/detect", data=b"junk", method="POST"), timeout=60)
        assert refused.value.code == 400
        process = service.process
    assert 0 < len(body["scores"]) <= 5 and len(body["boxes"]) == len(body["labels"]) == len(body["scores"])
    assert process is not None and process.poll() is not None  # stopped on exit


@pytest.mark.slow  # two seeded R-CNN builds (~20 s here); the slow two-stage bench runs the service too
def test_flask_app_serves_a_two_stage_eager_model(samples: dict[str, bytes]) -> None:
    """The Flask baseline of ``detserve bench`` on a two-stage R-CNN (issue 12): the model built by its
    family as ``detserve build`` builds it, its limits read from the RoI heads, ``model([image])``'s detections."""
    import torch
    from torchvision.transforms.functional import to_tensor

    from detserve.runtime.imaging import decode_image
    from loadtest.flask_baseline import create_app, load_eager_model

    detector = "fasterrcnn_mobilenet_v3_large_320_fpn"
    client = create_app(detector, NUM_CLASSES, spread_init_seed=SEED).test_client()
    health = client.get("/health").get_json()
    assert (health["score_thresh"], health["detections_per_img"]) == (0.05, 100)
    blob = samples["astronaut.jpg"]
    body = client.post("/detect?max_det=50", data=blob).get_json()
    model = load_eager_model(detector, NUM_CLASSES, spread_init_seed=SEED)  # the same seeded weights
    with torch.no_grad():
        eager = _triple(model([to_tensor(decode_image(blob, 10**9))])[0])
    assert 0 < len(body["scores"]) <= 50
    np.testing.assert_array_equal(np.asarray(body["scores"], np.float32), eager[1][:50])
    np.testing.assert_array_equal(np.asarray(body["labels"]), eager[2][:50])
