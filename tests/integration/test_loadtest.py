"""A short Locust run against the real server: zero failures and a well-formed report (no timing asserts)."""

from __future__ import annotations

import json
from pathlib import Path

from detserve.ops.server import TritonServer
from detserve.tritonconfig import parse
from loadtest.bench import without_dynamic_batching
from loadtest.report import LoadReport
from loadtest.runner import LoadTestConfig, run_loadtest


def test_locust_run_reports_server_split(server: TritonServer, tmp_path: Path) -> None:
    cfg = LoadTestConfig(
        grpc_url=server.options.grpc_url, model="ssdlite", out_dir=tmp_path, users=4, duration_s=10.0, window_s=2.0,
        score_threshold=0.3, max_det=50,
    )  # fmt: skip
    result = run_loadtest(cfg)
    report = result.report
    assert report.requests > 0 and report.failures == 0
    assert set(report.latency_ms) == {"p50", "p90", "p95", "p99"}
    assert report.latency_ms["p50"] <= report.latency_ms["p99"]
    assert {"ssdlite", "ssdlite_preprocess", "ssdlite_core", "ssdlite_postprocess"} <= set(report.server_split)
    core = report.server_split["ssdlite_core"]
    assert core.requests >= report.requests and core.executions >= 1 and core.avg_batch_size >= 1.0
    assert report.naive_throughput_rps > 0 and report.windows
    assert report.fingerprint["triton_server"]
    for name in ("report.json", "report.md", "latency.png", "locust_stats.csv", "locust.html", "requests.csv"):
        assert (tmp_path / name).is_file(), name
    again = LoadReport.from_dict(json.loads((tmp_path / "report.json").read_text()))
    assert again.requests == report.requests
    md = (tmp_path / "report.md").read_text()
    assert "ssdlite_core" in md and "p99" in md


def test_repository_copy_without_dynamic_batching(repository: Path, tmp_path: Path) -> None:
    out = without_dynamic_batching(repository, tmp_path / "plain", "ssdlite")
    for suffix in ("_preprocess", "_core", "_postprocess"):
        config = parse((out / f"ssdlite{suffix}" / "config.pbtxt").read_text())
        assert not config.HasField("dynamic_batching") and config.max_batch_size == 8
    assert parse((repository / "ssdlite_core" / "config.pbtxt").read_text()).HasField("dynamic_batching")
