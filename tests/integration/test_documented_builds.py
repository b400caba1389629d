"""The documented builds of heavy detectors, as typed, with verification on, then served and detected (slow).

- README: ``detserve build retinanet_resnet50_fpn_v2 --repository ... --name retina --num-classes 91
  --checkpoint retina.pt --kw min_size=512 --kw max_size=683``;
- docs/families-rcnn.md: ``detserve build maskrcnn_resnet50_fpn --checkpoint my.pt --num-classes 3 --kw
  min_size=512 --kw max_size=683``; the two-stage ``fasterrcnn_mobilenet_v3_large_320_fpn --checkpoint``;
- ``detserve build yolo --checkpoint best.pt`` (a checkpoint as ultralytics' trainer writes it).

Checkpoints are state dicts of seeded weights whose scores spread over 0..1 (the families' spread init),
so the served models detect something. Each model is then served by one tritonserver and
``detserve detect --draw`` runs on photographs of several sizes.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from detserve.ops.server import TritonServer
from tests.integration.test_documented_commands import detserve, ok

pytestmark = pytest.mark.slow
BUILD_TIMEOUT_S = 1500  # a ResNet50 export and verification on the busy 2-core machine; not a speed check


def _state_dict(detector: str, num_classes: int, kwargs: dict[str, object], path: Path) -> Path:
    import torch

    from detserve.families import family_for_detector

    model = family_for_detector(detector).build(detector, num_classes, None, dict(kwargs), 0)
    torch.save(model.state_dict(), path)
    return path


def _best_pt(path: Path) -> Path:
    """``best.pt`` as ultralytics' trainer saves it: the whole pickled model, its names and train args.

    In float32: the spread fixture's head weights (up to 1e10) overflow float16, where the trainer's
    half-precision copy would hold inf (the build then refused it: predictions max abs nan). Loading a
    half-precision best.pt is tested in tests/unit/test_yolo.py."""
    import torch

    from detserve.families import family_for_detector

    model = family_for_detector("yolov8n").build("yolov8n", 4, None, {"imgsz": 320}, 0)
    model.names = {0: "bolt", 1: "nut", 2: "washer", 3: "gear"}
    torch.save({"model": model.float(), "train_args": {"imgsz": 320}, "epoch": -1}, path)
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One repository, each model built by the command the docs show."""
    work = tmp_path_factory.mktemp("documented_builds")
    repo = work / "model_repository"
    sized = ("--kw", "min_size=512", "--kw", "max_size=683")
    retina = _state_dict("retinanet_resnet50_fpn_v2", 91, {"min_size": 512, "max_size": 683}, work / "retina.pt")
    mask = _state_dict("maskrcnn_resnet50_fpn", 3, {"min_size": 512, "max_size": 683}, work / "my.pt")
    faster = _state_dict("fasterrcnn_mobilenet_v3_large_320_fpn", 5, {}, work / "ck.pt")
    commands = [
        ("build", "retinanet_resnet50_fpn_v2", "--repository", str(repo), "--name", "retina", "--num-classes", "91",
         "--checkpoint", str(retina), *sized),
        ("build", "maskrcnn_resnet50_fpn", "--repository", str(repo), "--name", "mrcnn", "--checkpoint", str(mask),
         "--num-classes", "3", *sized),
        ("build", "fasterrcnn_mobilenet_v3_large_320_fpn", "--repository", str(repo), "--name", "frcnn",
         "--checkpoint", str(faster), "--num-classes", "5"),
        ("build", "yolo", "--repository", str(repo), "--name", "parts", "--checkpoint", str(_best_pt(work / "best.pt"))),
    ]  # fmt: skip
    for command in commands:
        ok(detserve(*command, timeout=BUILD_TIMEOUT_S))
    return repo


@pytest.fixture(scope="module")
def built_server(built: Path) -> Iterator[TritonServer]:
    from detserve.ops.server import running_server

    with running_server(built) as srv:
        yield srv


@pytest.mark.documents(
    "detserve build retinanet_resnet50_fpn_v2 --repository R --name retina --num-classes 91 --checkpoint retina.pt"
    " --kw min_size=512 --kw max_size=683",
    "detserve build maskrcnn_resnet50_fpn --repository R --name mrcnn --checkpoint my.pt --num-classes 3"
    " --kw min_size=512 --kw max_size=683",
    "detserve build fasterrcnn_mobilenet_v3_large_320_fpn --repository R --name frcnn --checkpoint ck.pt --num-classes 5",
    "detserve build yolo --repository R --name parts --checkpoint best.pt",
    "detserve models list --url U --repository R",
)
def test_documented_builds_verify_serve_and_draw(
    built: Path, built_server: TritonServer, samples: dict[str, bytes], tmp_path: Path
) -> None:
    url = built_server.options.grpc_url
    listed = ok(detserve("models", "list", "--url", url, "--repository", str(built)))
    for name in ("retina", "mrcnn", "frcnn", "parts"):  # built with verification on, and it passed
        rows = [ln for ln in listed.splitlines() if ln.split()[:1] == [name]]
        assert rows and "READY" in rows[0], listed
    assert listed.count("verification ok") >= 4, listed
    photos = []
    for file in ("astronaut.jpg", "coffee.jpg", "camera.png"):  # 512x512, 400x600, grey 512x512
        (tmp_path / file).write_bytes(samples[file])
        photos.append(str(tmp_path / file))
    found = {}
    for name in ("retina", "mrcnn", "frcnn", "parts"):
        drawn = tmp_path / f"drawn_{name}"
        args = ("--model", name, "--url", url, "--score-threshold", "0.05", "--max-det", "100", "--draw", str(drawn), "--json")
        report = json.loads(ok(detserve("detect", *photos, *args)))
        assert len(report) == len(photos) and len(list(drawn.iterdir())) == len(photos)
        found[name] = [r["num_detections"] for r in report]
    print("detections per photo:", found)
    assert all(sum(counts) > 0 for counts in found.values()), found  # seeded heads spread their scores
