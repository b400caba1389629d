"""`detserve bench --peers` end to end with tiny durations (slow): every peer serves under Locust, its CPU is
accounted to its own process tree, the targets against the best peer are computed and bench.md shows them."""

from __future__ import annotations

from pathlib import Path

import pytest

from loadtest.bench import BenchConfig, run_bench
from loadtest.peers.common import PEERS


@pytest.mark.slow
def test_bench_runs_the_peers(tmp_path: Path) -> None:
    pytest.importorskip("ray.serve", reason="the 'peers' extra is not installed")
    from converters.repository import BuildRequest, build_repository

    repo = tmp_path / "repo"
    build_repository(BuildRequest("ssdlite320_mobilenet_v3_large", repo, name="demo", num_classes=5, spread_init_seed=0))
    cfg = BenchConfig(
        repository=repo, model="demo", out_dir=tmp_path / "bench", users=4, duration_s=4.0, sweep=(1, 4),
        sweep_step_s=3.0, inprocess_seconds=0.5, shm_requests=2, fused=False, peers=True,
        peer_sweep=((2, 5.0), (4, 5.0)), peer_sweep_s=4.0,
    )  # fmt: skip
    results = run_bench(cfg, lambda _: None)
    assert set(results["peers"]) == set(PEERS)
    for peer, run in results["peers"].items():
        assert run["report"]["failures"] == 0 and run["report"]["requests"] > 0, peer
        roles = run["cpu"]["roles"]
        assert run["cpu"]["server_cpu_s"] > 0 and roles["locust"]["cpu_s"] > 0, peer
        assert all(role.startswith(f"peer {peer}: ") for role in roles if role != "locust"), roles
        assert run["memory_after_load"]["uss_mb"] > 100, peer  # the pipeline (torch, ORT) lives in the peer
        assert [s["max_batch_size"] for s in run["sweep"]] == [2, 4], peer
    assert [t["target"] for t in results["peer_targets"]] == [">= 1.20", "<= 1.00"]
    text = (tmp_path / "bench" / "bench.md").read_text()
    assert "## Peers: the same pipeline under Ray Serve, LitServe and BentoML" in text
    assert "Ray Serve (@serve.batch)" in text and "Targets (issue 26, part 4)" in text
