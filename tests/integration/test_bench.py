"""`detserve bench` end to end with tiny durations (slow): every stage runs and the ratio table is complete;
and (fast) the per-process CPU accounting of one short served run against the session's server."""

from __future__ import annotations

from pathlib import Path

import pytest

from detserve.ops.server import TritonServer
from loadtest.bench import BenchConfig, run_bench
from loadtest.bench_figures import CAPACITY_RATIO, FLASK_PER_CPU_RATIO, FUSED_RATIO, PER_CPU_RATIO
from tests.integration.conftest import SHAPES


def test_cpu_accounting_of_a_served_run(server: TritonServer, tmp_path: Path) -> None:
    """Locust's own CPU over its load window, every stub of the loaded model seen with CPU used."""
    from loadtest.bench import server_memory
    from loadtest.bench_figures import cpu_accounting
    from loadtest.procstats import CpuSampler
    from loadtest.runner import LoadTestConfig, read_locust_cpu, run_loadtest

    cfg = LoadTestConfig(grpc_url=server.options.grpc_url, model=SHAPES, out_dir=tmp_path, users=2, duration_s=3.0)
    with CpuSampler() as sampler:
        report = run_loadtest(cfg).report
    locust = read_locust_cpu(tmp_path)
    assert locust is not None and locust["cpu_s"] > 0 and 2.0 < locust["stop"] - locust["start"] < 10.0
    cpu = cpu_accounting(sampler.series, locust, report)
    roles = cpu["roles"]
    for step in ("preprocess", "core", "postprocess"):
        assert roles[f"stub {SHAPES}_{step}"]["cpu_s"] > 0, step
    assert roles["tritonserver"]["cpu_s"] > 0 and "gate" in roles and roles["locust"]["cpu_s"] == locust["cpu_s"]
    assert 0 < cpu["locust_share"] < 1 and cpu["server_cpu_s"] > 0
    memory = server_memory(server)
    assert {"tritonserver", "gate", f"stub {SHAPES}_core"} <= {m["role"] for m in memory}
    assert all(m["uss_mb"] <= m["rss_mb"] for m in memory)


@pytest.mark.slow
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
        CAPACITY_RATIO,
        PER_CPU_RATIO,
        FLASK_PER_CPU_RATIO,
        FUSED_RATIO,
    }
    assert results["triton"]["cpu"]["locust_cpu_s"] > 0 and results["fused"]["cpu"]["server_cpu_s"] > 0
    for key in ("triton", "triton_no_batching", "flask"):
        assert results[key]["report"]["failures"] == 0, key
    assert results["triton"]["server_rss_mb"] > 0
    text = (tmp_path / "bench" / "bench.md").read_text()
    assert "(b) Flask + eager PyTorch" in text and "Server memory" in text
    assert "## Targets (issue 16)" in text and "## Hops, per request" in text


@pytest.mark.slow
def test_bench_runs_a_two_stage_model(tmp_path: Path) -> None:
    """issue 12, part 7: a multi-step family (Faster R-CNN) through every stage of the bench: the in-process
    limit runs the declared chain, Flask serves the eager two-stage model, the ratios are the single-stage ones
    (+ the fused layout's) and the hops table has a row per step; the fused layout serves the whole chain."""
    from converters.repository import BuildRequest, build_repository

    repo = tmp_path / "repo"
    detector = "fasterrcnn_mobilenet_v3_large_320_fpn"
    build_repository(BuildRequest(detector, repo, name="frcnn", num_classes=5, spread_init_seed=0))
    cfg = BenchConfig(
        repository=repo, model="frcnn", out_dir=tmp_path / "bench", users=2, duration_s=4.0, sweep=(1, 2),
        sweep_step_s=3.0, inprocess_seconds=0.5, shm_requests=2,
    )  # fmt: skip
    results = run_bench(cfg, lambda _: None)
    steps = ["core", "proposals", "roi_core", "postprocess"]
    assert results["inprocess"]["steps"] == steps
    assert set(results["inprocess"]["stage_cpu_ms_per_image"]) == {"preprocess", *steps}
    assert "fused_skipped" not in results and results["fused"]["report"]["failures"] == 0
    assert set(results["ratios"]) >= {
        "served / in-process limit (throughput)",
        "served / Flask (throughput)",
        "dynamic batching on / off (throughput)",
        CAPACITY_RATIO,
        PER_CPU_RATIO,
        FLASK_PER_CPU_RATIO,
    }
    for key in ("triton", "triton_no_batching", "flask"):
        assert results[key]["report"]["failures"] == 0, key
    roles = results["triton"]["cpu"]["roles"]
    assert all(roles[f"stub frcnn_{s}"]["cpu_s"] > 0 for s in ["preprocess", *steps])
    text = (tmp_path / "bench" / "bench.md").read_text()
    assert "(f) fused CPU layout" in text and "| roi_core stub |" in text
    assert "core -> proposals -> roi_core -> postprocess" in text
