"""A canary promote on a real ``--replicas 2`` server decides by itself (issue 23, parts 3 and 4c).

One replica set on an ssdlite repository with version 1 (spread-init seed 0), a good version 2 (seed 1)
a broken version 3: the same network with every foreground class logit pushed to -30, so it answers
fast and never fails, but with no detections; and a broken version 4: version 1 whose core fails every
other request. ``promote --canary 1 --watch 10s`` switches replica 0,
compares it with replica 1 and either switches it back (exit 1, the table) or promotes replica 1 too.
Each replica's version is checked on its own socket, never through the balancer.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from detserve.app.cli import app
from detserve.ops.replicas import ReplicaSet
from detserve.ops.server import ServerOptions, free_port
from detserve.ops.versions import read_history, serving_version
from tests.detector_fixtures import NUM_CLASSES
from tests.host_checks import needs_nginx
from tests.integration.conftest import TWO_VERSIONS_DETECTOR as DETECTOR
from tests.integration.test_fleet import KEY, Versions, per_replica

pytestmark = [pytest.mark.slow, needs_nginx]  # each test watches a window and rolls out: ~1 min each
WATCH = "10s"


def dead_checkpoint(directory: Path) -> Path:
    """Version 1's network with every foreground score ~0: no box passes any threshold."""
    import torch

    from detserve.families.torchvision.models import _final_cls_and_reg_layers, build_detector, spread_head_init

    torch.manual_seed(0)
    model = build_detector(DETECTOR, NUM_CLASSES)
    spread_head_init(model, seed=0)
    head: Any = model.head
    columns = int(head.classification_head.num_columns)
    with torch.no_grad():
        for conv in _final_cls_and_reg_layers(model)[0]:
            bias = conv.bias.view(-1, columns)  # per anchor: background, then the classes (SSD's softmax)
            bias[:, 1:] = -30.0
            conv.weight.zero_()
    path = directory / "dead.pt"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def canary_repo(tmp_path_factory: pytest.TempPathFactory, two_versions_copy: Callable[[str], Path]) -> Path:
    from converters.repository import BuildRequest, build_repository

    repo = two_versions_copy("canary_repo")
    dead = dead_checkpoint(tmp_path_factory.mktemp("dead"))
    build_repository(
        BuildRequest(
            detector=DETECTOR, repository=repo, name="ssdlite", num_classes=NUM_CLASSES, version=3, checkpoint=dead,
            max_image_pixels=20_000_000,
        )
    )  # fmt: skip
    failing_copy(repo, 1, 4)
    return repo


FAILING_CORE = """import triton_python_backend_utils as pb_utils

{base}


class TritonPythonModel(_Base):  # a broken version for test_canary: every other request fails
    calls = 0

    def execute(self, requests):
        out = []
        for response in super().execute(requests):
            TritonPythonModel.calls += 1
            failed = pb_utils.InferenceResponse(error=pb_utils.TritonError("broken test version: every other request fails"))
            out.append(failed if TritonPythonModel.calls % 2 else response)
        return out
"""


def failing_copy(repo: Path, source: int, version: int) -> None:
    """Version ``version``: ``source`` copied (build records included), its core failing every other request."""
    import shutil

    from detserve.ops.versions import composing

    for model in composing("ssdlite", repo):
        shutil.copytree(repo / model / str(source), repo / model / str(version))
    core = repo / "ssdlite_core" / str(version) / "model.py"
    base = next(line for line in core.read_text().splitlines() if line.startswith("from detserve.runtime"))
    core.write_text(FAILING_CORE.format(base=base.replace("import TritonPythonModel", "import TritonPythonModel as _Base")))


@pytest.fixture(scope="module")
def fleet(canary_repo: Path) -> Iterator[ReplicaSet]:
    opts = ServerOptions(canary_repo, grpc_port=free_port(), http_port=free_port(), metrics_port=0, admin_key=KEY)
    rs = ReplicaSet(opts, 2)
    try:
        rs.start()
        yield rs
    finally:
        rs.stop()


def promote(url: str, repo: Path, version: int) -> tuple[int, str]:
    args = ["promote", "ssdlite", "--version", str(version), "--canary", "1", "--watch", WATCH]
    result = CliRunner().invoke(
        app, [*args, "--repository", str(repo), "--url", url], env={"DETSERVE_ADMIN_KEY": KEY, "DETSERVE_ADMIN_KEY_FILE": ""}
    )
    print(f"$ detserve {' '.join(args)}\n{result.output}")  # for the docs (-s)
    return result.exit_code, result.output


def test_a_canary_that_answers_nothing_is_switched_back(fleet: ReplicaSet, canary_repo: Path, samples: dict[str, bytes]) -> None:
    versions = Versions(canary_repo, samples["astronaut.jpg"])
    assert per_replica(fleet, versions) == [{1: 8}, {1: 8}]
    history = read_history(canary_repo, "ssdlite")

    code, out = promote(fleet.grpc_url, canary_repo, 3)
    assert code == 1, out
    assert "worse: detections per image 0.00 vs" in out and "det/img" in out, out
    assert "switched back, every target serves version 1" in out, out
    assert per_replica(fleet, versions) == [{1: 8}, {1: 8}], out  # replica 0 too, on its own socket
    assert serving_version(canary_repo, "ssdlite") == 1  # what a restarted replica would serve
    core = (canary_repo / "ssdlite_core" / "config.pbtxt").read_text()
    assert "versions: 1\n" in core and "versions: 3" not in core, core  # version 3 unloaded by the files too
    assert read_history(canary_repo, "ssdlite") == history  # no promote recorded


def test_a_canary_that_fails_a_share_of_requests_is_switched_back(
    fleet: ReplicaSet, canary_repo: Path, samples: dict[str, bytes]
) -> None:
    versions = Versions(canary_repo, samples["astronaut.jpg"])
    code, out = promote(fleet.grpc_url, canary_repo, 4)
    assert code == 1, out
    assert "worse: failure ratio" in out and "probe request(s) failed on the canary" in out, out
    canary_row = next(line.split() for line in out.splitlines() if re.match(r"canary\s+\d", line))
    assert canary_row[2] == canary_row[-1], out  # failed requests (metrics) = failed probe answers: each counted once
    assert per_replica(fleet, versions) == [{1: 8}, {1: 8}], out
    assert serving_version(canary_repo, "ssdlite") == 1


@pytest.mark.documents("detserve promote M --version V --canary K --watch W --repository R --url U")
def test_a_good_canary_goes_through(fleet: ReplicaSet, canary_repo: Path, samples: dict[str, bytes]) -> None:
    versions = Versions(canary_repo, samples["astronaut.jpg"])
    code, out = promote(fleet.grpc_url, canary_repo, 2)
    assert code == 0, out
    assert "verdict: the canary is not worse" in out and "serving version 2 (was 1)" in out, out
    assert per_replica(fleet, versions) == [{2: 8}, {2: 8}], out
    assert serving_version(canary_repo, "ssdlite") == 2
    assert read_history(canary_repo, "ssdlite")[-1]["to"] == 2
