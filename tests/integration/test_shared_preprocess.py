"""``detserve build --share-preprocessing`` end to end (slow): two same-spec detectors served with one
pre-processing model, detected on, promoted and rolled back while the other keeps answering.

a: the demo detector as the README builds it (SSDlite320, 6 classes, the shipped weights); b: the same
detector with seeded heads (other answers, the same pre-processing config), built with the option through
the CLI, so its ensemble's first step is a_preprocess pinned to version 1. Version 2 of each: other seeded
heads. One explicit-mode server with the admin key serves both.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from detserve.ops.server import TritonServer, running_server
from tests.integration.test_documented_commands import detserve, ok

pytestmark = pytest.mark.slow
KEY = "test-shared-preprocess-key-0123456789"
DETECTOR = "ssdlite320_mobilenet_v3_large"
IMAGES = ("astronaut.jpg", "chelsea.png", "coffee.jpg")  # 512x512, 451x300, 600x400: three sizes, one request


def _build_cli(repo: Path, name: str, *weights: str) -> None:
    args = ("build", DETECTOR, "--repository", str(repo), "--name", name, "--num-classes", "6", *weights)
    ok(detserve(*args, "--share-preprocessing", timeout=900))


def _build_v2(repo: Path, name: str, seed: int) -> None:
    from converters.repository import BuildRequest, build_repository

    req = BuildRequest(DETECTOR, repo, name=name, num_classes=6, version=2, spread_init_seed=seed, share_preprocessing=True)
    build_repository(req)


@pytest.fixture(scope="module")
def shared_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from detserve.app.demo import DEMO_WEIGHTS

    repo = tmp_path_factory.mktemp("shared_preprocess") / "repo"
    _build_cli(repo, "a", "--checkpoint", str(DEMO_WEIGHTS))
    _build_cli(repo, "b", "--random-weights", "--spread-init-seed", "1")
    _build_v2(repo, "b", 2)
    _build_v2(repo, "a", 3)
    return repo


@pytest.fixture(scope="module")
def server(shared_repo: Path) -> Iterator[TritonServer]:
    with running_server(shared_repo, admin_key=KEY) as srv:
        yield srv


def _reference(repo: Path, name: str, version: int, images: list[bytes]) -> list[dict[str, np.ndarray]]:
    """What the model gives alone: its own pre-processing and core in this process (loadtest/inprocess.py)."""
    from loadtest.inprocess import InProcessPipeline

    return InProcessPipeline.from_repository(repo, name, version=version).run(images)


def _same(served: list[Any], reference: list[dict[str, np.ndarray]]) -> bool:
    def one(s: Any, r: dict[str, np.ndarray]) -> bool:
        return len(s.scores) == len(r["scores"]) and bool(
            np.allclose(s.scores, r["scores"], atol=1e-3)
            and np.allclose(s.boxes, r["boxes"], atol=1e-2)
            and np.array_equal(s.labels, r["labels"])
        )

    return len(served) == len(reference) and all(one(s, r) for s, r in zip(served, reference, strict=True))


def _detect(url: str, name: str, images: list[bytes]) -> list[Any]:
    from clients.grpc_client import DetectorClient

    with DetectorClient(url, name) as client:
        return client.detect_batch(images)


def _preprocess_stubs(server: TritonServer) -> dict[str, dict[str, float]]:
    from loadtest.procstats import memory_by_role, memory_table

    assert server.process is not None
    roles = memory_by_role(memory_table(server.process.pid))
    return {role: v for role, v in roles.items() if role.startswith("stub ") and role.endswith("_preprocess")}


def _ready(url: str) -> set[tuple[str, str]]:
    from detserve.ops.admin import ModelAdmin

    with ModelAdmin(url, KEY) as admin:
        return {(e.name, e.version) for e in admin.get_model_repository_index() if e.state == "READY"}


def _under_load(url: str, name: str, images: list[bytes], action: Any) -> dict[str, Any]:
    """``action()`` while ``name`` answers a steady load; its requests' outcome."""
    from loadtest.opsreport_base import ClientLoad

    with ClientLoad(url, images, users=2, model=name) as load:
        load.wait_for(4)
        result = action()
        load.wait_for(load.completed() + 4)
    failed = [c.error for c in load.calls if c.error is not None]
    return {"result": result, "requests": len(load.calls), "failed": failed}


@pytest.mark.documents(
    "detserve build ssdlite320_mobilenet_v3_large --repository R --name N --num-classes 6 --checkpoint W --share-preprocessing"
)
def test_two_detectors_share_one_preprocessing_through_rollouts(
    server: TritonServer, shared_repo: Path, samples: dict[str, bytes]
) -> None:
    from detserve.ops.admin import ModelAdmin
    from detserve.ops.versions import promote, rollback, serving_version
    from detserve.tritonconfig import read_config

    repo, url = shared_repo, server.options.grpc_url
    record = json.loads((repo / "b" / "1" / "build.json").read_text())
    assert record["shared_preprocessing"] == {"model": "a_preprocess", "version": 1}
    assert not (repo / "b_preprocess").exists()
    stubs = _preprocess_stubs(server)
    print("pre-processing stubs (USS MB):", {r: round(v["uss_mb"]) for r, v in stubs.items()})
    assert {r: int(v["processes"]) for r, v in stubs.items()} == {"stub a_preprocess": 1}  # one, not one per model

    images = [samples[n] for n in IMAGES]
    ref = {(n, v): _reference(repo, n, v, images) for n in ("a", "b") for v in (1, 2)}
    assert not _same(_detect(url, "a", images), ref["b", 1])  # the two models answer differently
    assert _same(_detect(url, "a", images), ref["a", 1]) and _same(_detect(url, "b", images), ref["b", 1])

    # b forward and back while a answers; a_preprocess is never reloaded by b's rollouts
    def b_there_and_back() -> None:
        promote(url, KEY, repo, "b", 2)
        assert _same(_detect(url, "b", images), ref["b", 2])
        rollback(url, KEY, repo, "b")

    seen = _under_load(url, "a", images, b_there_and_back)
    print(f"a under load while b went to 2 and back: {seen['requests']} requests, {len(seen['failed'])} failed")
    assert not seen["failed"] and seen["requests"] >= 8, seen
    assert _same(_detect(url, "b", images), ref["b", 1]) and serving_version(repo, "b") == 1
    first = read_config(repo / "b").ensemble_scheduling.step[0]
    assert (first.model_name, first.model_version) == ("a_preprocess", 1)

    # a forward while b answers: the version b pins stays loaded beside a's new one
    seen = _under_load(url, "b", images, lambda: promote(url, KEY, repo, "a", 2))
    print(f"b under load while a went to 2: {seen['requests']} requests, {len(seen['failed'])} failed")
    assert not seen["failed"] and seen["requests"] >= 8, seen
    assert _same(_detect(url, "a", images), ref["a", 2]) and _same(_detect(url, "b", images), ref["b", 1])
    assert list(read_config(repo / "a_preprocess").version_policy.specific.versions) == [1, 2]
    assert {("a_preprocess", "1"), ("a_preprocess", "2")} <= _ready(url)

    # unloading b leaves a its pre-processing; b comes back
    with ModelAdmin(url, KEY) as admin:
        admin.unload_model("b")
        assert _same(_detect(url, "a", images), ref["a", 2]) and ("a_preprocess", "1") in _ready(url)
        admin.load_model("b")
    assert _same(_detect(url, "b", images), ref["b", 1])
