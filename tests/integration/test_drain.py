"""Graceful stop under load, and no bytecode in the repository, against a real tritonserver.

On SIGTERM Triton 2.51 stops every scheduler at once, composing models included, so an ensemble
request already past pre-processing was rejected at the next step (8 of 12 in flight lost, measured
before ``TritonServer.stop`` drained first). Its own ssdlite-only repository (built once here, ~20 s)
so the module does not need the four-detector session repository.
"""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

import pytest

from detserve.ops.admin import ModelAdmin
from detserve.ops.server import running_server
from loadtest.opsreport_base import ClientLoad, Tally, is_rejection
from tests.detector_fixtures import NUM_CLASSES

USERS = 12


@pytest.fixture(scope="module")
def ssdlite_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from converters.repository import BuildRequest, build_repository

    repo = tmp_path_factory.mktemp("drain_repo")
    build_repository(
        BuildRequest(
            detector="ssdlite320_mobilenet_v3_large",
            repository=repo,
            name="ssdlite",
            num_classes=NUM_CLASSES,
            max_image_pixels=20_000_000,
            spread_init_seed=0,
        )
    )
    return repo


@pytest.fixture()
def repo(ssdlite_repo: Path, tmp_path: Path) -> Path:
    shutil.copytree(ssdlite_repo, tmp_path / "repo")
    return tmp_path / "repo"


def test_stop_under_load_drains_every_accepted_request(repo: Path, samples: dict[str, bytes]) -> None:
    images = [samples["astronaut.jpg"], samples["chelsea.png"]]
    with running_server(repo) as server:
        with ClientLoad(server.options.grpc_url, images, users=USERS, stop_on_rejection=True) as load:
            load.wait_for(2 * USERS)  # every user has answers: requests are in flight at every step
            t_stop = time.monotonic()
            report = server.stop()
        calls = load.calls
    assert report is not None and report.error is None and report.unloaded == ["ssdlite"], report
    in_flight = [c for c in calls if c.start < t_stop < c.end]
    tally = Tally.of(calls, rejections_expected=True)
    after = [c for c in calls if c.error is not None and is_rejection(c.error)]
    print(
        f"drain: {len(calls)} requests, {len(in_flight)} in flight at stop, {tally.ok} ok, "
        f"{tally.expected} rejected after the drain began, {tally.lost} lost; drain {report.seconds:.1f} s"
    )
    assert tally.lost == 0, tally.lost_errors[:3]
    assert in_flight, "no request was in flight when the server stopped"
    assert all(c.error is None for c in in_flight if c.start < t_stop - 0.5), "a request well inside the drain failed"
    assert all(re.search(r"unknown model|failed to connect|connection refused", c.error or "", re.I) for c in after)


def test_serving_writes_no_bytecode_and_a_reload_keeps_the_composing_models(repo: Path, samples: dict[str, bytes]) -> None:
    from clients.grpc_client import DetectorClient

    with running_server(repo) as server:
        with DetectorClient(server.options.grpc_url, "ssdlite") as client:
            for name in ("astronaut.jpg", "chelsea.png"):
                assert len(client.detect(samples[name], score_threshold=0.0)) > 0
        assert not list(repo.rglob("__pycache__")), "the python stubs wrote bytecode into the repository"
        # explicit model control: loading the ensemble again must not reload its (unmodified) steps
        with ModelAdmin(server.internal_url, None) as admin:
            admin.load_model("ssdlite")
        log = server.log_path.read_text()
    for step in ("ssdlite_preprocess", "ssdlite_core", "ssdlite_postprocess"):
        assert log.count(f"successfully loaded '{step}'") == 1, step
    assert not list(repo.rglob("__pycache__"))
