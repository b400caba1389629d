"""The documented operations commands as typed (slow): rollouts and model control on an explicit-mode
server with the admin key, the step and sweep load shapes, bench, tune and ``make demo``.

Short durations and two users: these prove each command runs end to end and writes what it says, not
what it measures (docs/performance.md has the measured figures).
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from detserve.app.demo import DEMO_WEIGHTS
from detserve.ops.server import TritonServer
from tests.integration.test_documented_commands import detserve, ok

pytestmark = pytest.mark.slow
KEY = "documented-ops-key-0123456789abcdef"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def two_versions(demo_copy: Callable[[str], Path]) -> Path:
    """The demo repository and a version 2 of ``demo`` built beside it by the CLI (other, seeded weights)."""
    repo = demo_copy("documented_ops")
    ok(
        detserve("build", "ssdlite320_mobilenet_v3_large", "--repository", str(repo), "--name", "demo",
                 "--num-classes", "6", "--version", "2", "--spread-init-seed", "1", "--random-weights", timeout=900)
    )  # fmt: skip
    return repo


@pytest.fixture(scope="module")
def admin_server(two_versions: Path) -> Iterator[TritonServer]:
    from detserve.ops.server import running_server

    with running_server(two_versions, admin_key=KEY) as srv:
        yield srv


def _with_key(*args: str) -> subprocess.CompletedProcess[str]:
    """A command that needs the admin key: in the environment, as the docs say (never on the command line)."""
    env = {k: v for k, v in os.environ.items() if k != "DETSERVE_ADMIN_KEY_FILE"} | {"DETSERVE_ADMIN_KEY": KEY}
    return detserve(*args, env=env)


def _detect(url: str, image: Path) -> Any:
    return json.loads(ok(detserve("detect", str(image), "--model", "demo", "--url", url, "--json")))[0]


@pytest.mark.documents(
    "detserve promote demo --version 2 --repository R --url U",
    "detserve rollback demo --repository R --url U",
    "detserve promote demo --version 2 --force --repository R --url U",
    "detserve models unload demo --url U",
    "detserve models load demo --url U",
)
def test_promote_rollback_unload_load_as_documented(
    admin_server: TritonServer, two_versions: Path, samples: dict[str, bytes], tmp_path: Path
) -> None:
    url, repo = admin_server.options.grpc_url, str(two_versions)
    image = tmp_path / "chelsea.png"
    image.write_bytes(samples["chelsea.png"])
    v1 = _detect(url, image)
    ok(_with_key("promote", "demo", "--version", "2", "--repository", repo, "--url", url))
    v2 = _detect(url, image)
    assert v2 != v1  # other weights answer
    ok(_with_key("rollback", "demo", "--repository", repo, "--url", url))
    assert _detect(url, image) == v1
    ok(_with_key("promote", "demo", "--version", "2", "--force", "--repository", repo, "--url", url))
    assert _detect(url, image) == v2
    ok(_with_key("rollback", "demo", "--repository", repo, "--url", url))
    history = json.loads((two_versions / "demo" / "rollout.json").read_text())
    assert history["serving"] == 1 and [h["action"] for h in history["history"]] == ["promote", "rollback"] * 2

    ok(_with_key("models", "unload", "demo", "--url", url))
    refused = detserve("detect", str(image), "--model", "demo", "--url", url)
    assert refused.returncode == 1 and "not ready" in refused.stderr, refused.stderr
    ok(_with_key("models", "load", "demo", "--url", url))
    assert _detect(url, image) == v1


@pytest.mark.documents(
    "detserve loadtest --model M --url U --users 2 --duration 4s --shape step --step 2s --out O",
    "detserve loadtest --model M --url U --users 2 --duration 4s --shape sweep --sweep 1,2 --step 2s --out O",
)
def test_loadtest_step_and_sweep_shapes(admin_server: TritonServer, tmp_path: Path) -> None:
    url = admin_server.options.grpc_url  # the demo detector, as the docs' commands name it
    common = ("--model", "demo", "--url", url, "--users", "2", "--duration", "4s")
    for shape, extra in (("step", ()), ("sweep", ("--sweep", "1,2"))):
        out = tmp_path / shape
        ok(detserve("loadtest", *common, "--shape", shape, *extra, "--step", "2s", "--out", str(out)))
        report = json.loads((out / "report.json").read_text())
        assert report["failures"] == 0 and report["requests"] > 0, report


@pytest.mark.documents("detserve bench --repository R --model demo --users 2 --duration 3s --out O")
def test_bench_writes_its_table(demo_copy: Callable[[str], Path], tmp_path: Path) -> None:
    out = tmp_path / "bench"
    args = ("--repository", str(demo_copy("bench")), "--model", "demo", "--users", "2", "--duration", "3s")
    text = ok(detserve("bench", *args, "--out", str(out), timeout=1500))
    assert (out / "bench.md").read_text().strip() in text


@pytest.mark.documents(
    "detserve tune --repository R --model demo --users 2 --duration 2s --out O",
    "detserve tune --repository R --model demo --users 2 --duration 2s --out O --ort-threads --apply",
)
def test_tune_every_variant_then_ort_threads_applied(demo_copy: Callable[[str], Path], tmp_path: Path) -> None:
    repo = demo_copy("tune")
    common = ("--repository", str(repo), "--model", "demo", "--users", "2", "--duration", "2s")
    every = ok(detserve("tune", *common, "--out", str(tmp_path / "all"), timeout=1500))
    assert "batching delay 0" in every and (tmp_path / "all" / "tuning.md").is_file()
    config = repo / "demo_core" / "config.pbtxt"
    before = config.read_text()
    applied = ok(detserve("tune", *common, "--out", str(tmp_path / "ort"), "--ort-threads", "--apply", timeout=1500))
    assert "applied:" in applied, applied
    assert ("nothing (already as built)" in applied) == (config.read_text() == before)


@pytest.mark.documents("make demo")
def test_make_demo_recipe(tmp_path: Path) -> None:
    """``make demo`` is ``scripts/setup.sh`` (pip, apt: not from a test) then this recipe, run here as the Makefile has it."""
    recipe = subprocess.run(["make", "-n", "demo"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    last = recipe.strip().splitlines()[-1].split()
    assert last[-3:] == ["-m", "detserve.app.cli", "demo"], recipe
    out = tmp_path / "demo"
    text = ok(detserve("demo", "--repository", str(tmp_path / "repo"), "--out", str(out), timeout=1500))
    assert DEMO_WEIGHTS.name in text and "[4/4] load test" in text
    assert len(list((out / "images").iterdir())) == len(list((out / "drawn").iterdir())) > 0
    assert (out / "loadtest" / "report.json").is_file()
