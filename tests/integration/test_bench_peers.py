"""`detserve bench --peers` end to end, typed as a user types it, with short runs (slow): every peer serves under
Locust, its CPU is accounted to its own process tree, the targets against the best peer are computed and bench.md
shows them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from loadtest.peers.common import PEERS


@pytest.mark.slow
@pytest.mark.documents("detserve bench --peers --repository R --model demo --users 4 --duration 4s --out O")
def test_bench_runs_the_peers(tmp_path: Path) -> None:
    pytest.importorskip("ray.serve", reason="the 'peers' extra is not installed")
    from converters.repository import BuildRequest, build_repository

    repo = tmp_path / "repo"
    build_repository(BuildRequest("ssdlite320_mobilenet_v3_large", repo, name="demo", num_classes=5, spread_init_seed=0))
    out = tmp_path / "bench"
    command = ["bench", "--peers", "--repository", str(repo), "--model", "demo", "--users", "4", "--duration", "4s"]
    proc = subprocess.run(
        [sys.executable, "-m", "detserve.app.cli", *command, "--out", str(out)], capture_output=True, text=True, timeout=1800
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "bench.json").read_text())
    assert set(results["peers"]) == set(PEERS)
    for peer, run in results["peers"].items():
        assert run["report"]["failures"] == 0 and run["report"]["requests"] > 0, peer
        roles = run["cpu"]["roles"]
        assert run["cpu"]["server_cpu_s"] > 0 and roles["locust"]["cpu_s"] > 0, peer
        assert all(role.startswith(f"peer {peer}: ") for role in roles if role != "locust"), roles
        assert run["memory_after_load"]["uss_mb"] > 100, peer  # the pipeline (torch, ORT) lives in the peer
        assert len(run["sweep"]) >= 2, peer  # the default sweep: every setting measured, the best rerun
    assert [t["target"] for t in results["peer_targets"]] == [">= 1.20", "<= 1.00"]
    text = (out / "bench.md").read_text()
    assert "Ray Serve" in proc.stdout  # the table is printed, not only written
    assert "## Peers: the same pipeline under Ray Serve, LitServe and BentoML" in text
    assert "Ray Serve (@serve.batch)" in text and "Targets (issue 26, part 4)" in text
