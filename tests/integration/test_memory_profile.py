"""``detserve memory`` and ``detserve tune --limit --profile`` as typed (slow): each runs end to end on
the demo detector and writes what it says (docs/performance.md has the measured figures)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.integration.test_documented_commands import detserve, ok

pytestmark = pytest.mark.slow


@pytest.mark.documents("detserve memory --repository R --model demo --users 2 --duration 3s --out O")
def test_memory_table_of_the_served_model(demo_copy: Callable[[str], Path], tmp_path: Path) -> None:
    out = tmp_path / "memory"
    args = ("--repository", str(demo_copy("memory")), "--model", "demo", "--users", "2", "--duration", "3s")
    text = ok(detserve("memory", *args, "--out", str(out), timeout=900))
    assert (out / "memory.md").read_text().strip() in text
    (row,) = json.loads((out / "memory.json").read_text())
    stubs = {role: v for role, v in row["rest"].items() if role.startswith("stub ")}
    # the built defaults: one pre-processing, one core and one post-processing instance, each its own stub
    assert {r: int(v["processes"]) for r, v in stubs.items()} == {
        "stub demo_preprocess": 1,
        "stub demo_core": 1,
        "stub demo_postprocess": 1,
    }
    assert all(v["uss_mb"] > 0 for v in row["load"].values()) and row["throughput_rps"]["demo"] > 0


@pytest.mark.documents(
    "detserve tune --repository R --model demo --users 2 --duration 3s --out O --ort-threads --limit --profile 1,2"
)
def test_tune_with_the_limit_and_the_step_profile(demo_copy: Callable[[str], Path], tmp_path: Path) -> None:
    out = tmp_path / "tune"
    args = ("--repository", str(demo_copy("tune_profile")), "--model", "demo", "--users", "2", "--duration", "3s")
    text = ok(detserve("tune", *args, "--out", str(out), "--ort-threads", "--limit", "--profile", "1,2", timeout=1500))
    assert "core: queue / compute ms, batch, busy %" in text and "in-process limit:" in text
    assert (out / "tuning.md").read_text().strip() in text


@pytest.mark.documents(
    "detserve memory --repository R --model demo --model ssdlite --share-preprocessing --users 1 --duration 2s --out O"
)
def test_memory_with_one_preprocessing_model_per_spec(tmp_path: Path) -> None:
    """Two same-spec detectors built without the option (the trained demo, a seeded SSDlite: other weights and
    classes): `--share-preprocessing` adds the shared layout's rows, in which the second model runs the first's
    pre-processing stub (the per-model figure docs/performance.md quotes, 461 MB, comes from this command)."""
    from detserve.app.demo import DEMO_WEIGHTS

    repo, out = tmp_path / "repo", tmp_path / "memory"
    build = ("build", "ssdlite320_mobilenet_v3_large", "--repository", str(repo))
    ok(detserve(*build, "--name", "demo", "--num-classes", "6", "--checkpoint", str(DEMO_WEIGHTS), timeout=900))
    ok(detserve(*build, "--name", "ssdlite", "--num-classes", "5", "--random-weights", timeout=900))
    args = ("--model", "demo", "--model", "ssdlite", "--share-preprocessing", "--users", "1", "--duration", "2s")
    text = ok(detserve("memory", "--repository", str(repo), *args, "--out", str(out), timeout=1200))
    rows = {(r["layout"], len(r["models"])): r for r in json.loads((out / "memory.json").read_text())}
    assert set(rows) == {
        ("ensemble", 1),
        ("ensemble", 2),
        ("ensemble, shared pre-processing", 1),
        ("ensemble, shared pre-processing", 2),
    }
    stubs = {role for role in rows[("ensemble, shared pre-processing", 2)]["rest"] if role.startswith("stub ")}
    assert "stub demo_preprocess" in stubs and "stub ssdlite_preprocess" not in stubs and "stub ssdlite_core" in stubs, stubs
    assert "stub ssdlite_preprocess" in rows[("ensemble", 2)]["rest"]  # the plain layout keeps its own
    assert all(v > 0 for r in rows.values() for v in r["throughput_rps"].values()), rows
    assert "ensemble, shared pre-processing: each additional model" in text
    assert not (repo / "ssdlite" / "config.pbtxt").read_text().count("demo_preprocess")  # the built repository untouched
