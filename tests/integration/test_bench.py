"""`detserve bench` end to end with tiny durations: every stage runs and the ratio table is complete."""

from __future__ import annotations

from pathlib import Path

import pytest

from loadtest.bench import BenchConfig, run_bench

pytestmark = pytest.mark.slow


def test_bench_runs_every_stage(tmp_path: Path) -> None:
    from converters.repository import BuildRequest, build_repository

    repo = tmp_path / "repo"
    build_repository(BuildRequest("ssdlite320_mobilenet_v3_large", repo, name="demo", num_classes=5, spread_init_seed=0))
    cfg = BenchConfig(
        repository=repo, model="demo", out_dir=tmp_path / "bench", users=4, duration_s=4.0, sweep=(1, 4),
        sweep_step_s=3.0, inprocess_seconds=0.5, shm_requests=2,
    )  # fmt: skip
    results = run_bench(cfg, lambda _: None)
    assert set(results["ratios"]) >= {
        "served / in-process limit (throughput)",
        "served / Flask (throughput)",
        "served p99 / Flask p99",
        "dynamic batching on / off (throughput)",
        "p99 at ~70% of peak / unloaded p50",
        "4K: gRPC / shared memory (mean latency)",
    }
    for key in ("triton", "triton_no_batching", "flask"):
        assert results[key]["report"]["failures"] == 0, key
    assert results["triton"]["server_rss_mb"] > 0
    text = (tmp_path / "bench" / "bench.md").read_text()
    assert "(b) Flask + eager PyTorch" in text and "Server memory" in text
