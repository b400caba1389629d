"""``detserve bench``'s accounting: the load generator's CPU, the target ratios, the hop and memory
tables, and ``detserve tune --apply``; on recorded figures, no server (tests/integration/test_bench.py
runs the real thing)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from loadtest.bench_figures import (
    CAPACITY_RATIO,
    FLASK_PER_CPU_RATIO,
    LOAD_SHARE,
    PER_CPU_RATIO,
    TARGET_RATIO,
    cpu_accounting,
    ratios,
    targets,
)
from loadtest.bench_report import render_bench
from loadtest.procstats import CpuSeries


class _Report:
    requests, failures = 101, 1


def _series() -> CpuSeries:
    # 10 s window: tritonserver 2 CPU s, core stub 8, preprocess stub 4, two postprocess stubs 1 each, Locust 1
    roles = {1: "tritonserver", 2: "stub m_core", 3: "stub m_preprocess", 4: "stub m_postprocess", 5: "stub m_postprocess"}
    roles[6] = "locust"
    start = {1: 0.0, 2: 0.0, 3: 0.0, 4: 0.0, 5: 0.0, 6: 3.0}
    end = {1: 2.0, 2: 8.0, 3: 4.0, 4: 1.0, 5: 1.0, 6: 99.0}  # Locust's own figure wins over the sampled one
    return CpuSeries(samples=[(100.0, start), (110.0, end)], roles=roles, threads=dict.fromkeys(roles, 3))


def test_cpu_accounting_uses_locust_window_and_own_figure(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    cpu = cpu_accounting(_series(), {"start": 100.0, "stop": 110.0, "cpu_s": 1.0}, _Report())
    assert cpu["ok_requests"] == 100 and cpu["window_s"] == pytest.approx(10.0)
    assert cpu["server_cpu_s"] == pytest.approx(16.0)
    assert cpu["locust_share"] == pytest.approx(1.0 / 20.0)
    assert cpu["idle_share"] == pytest.approx(1 - 17.0 / 20.0)
    post = cpu["roles"]["stub m_postprocess"]
    assert post["processes"] == 2 and post["threads"] == 6 and post["ms_per_request"] == pytest.approx(20.0)
    assert cpu["roles"]["stub m_core"]["share"] == pytest.approx(0.4)


def _results(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    cpu = cpu_accounting(_series(), {"start": 100.0, "stop": 110.0, "cpu_s": 1.0}, _Report())

    def report(rps: float, p99: float) -> dict[str, Any]:
        return {"throughput_rps": rps, "latency_ms": {"p50": p99 / 2, "p99": p99}, "failures": 0}

    memory = [
        {"pid": 1, "role": "tritonserver", "rss_mb": 200.0, "pss_mb": 150.0, "uss_mb": 100.0, "threads": 40},
        {"pid": 2, "role": "stub m_core", "rss_mb": 120.0, "pss_mb": 60.0, "uss_mb": 40.0, "threads": 4},
    ]
    steps = [{"users": 1, "throughput_rps": 5.0, "p50": 100.0, "p99": 150.0}, {"users": 4, "throughput_rps": 9.0, "p99": 180.0}]
    r: dict[str, Any] = {
        "model": "m",
        "config": {"users": 16, "duration_s": 10.0},
        "fingerprint": {"cpu": "test"},
        "inprocess": {
            "best_images_per_s": 12.5,
            "best_images_per_cpu_s": 7.0,
            "best_batch_size": 8,
            "threads": 2,
            "stage_cpu_ms_per_image": {"preprocess": 40.0, "core": 70.0, "postprocess": 15.0},
            "runs": [
                {"tensor_bytes": {"request": 50_000, "preprocessed": 1_228_824, "core_outputs": 150_000, "detections": 2404}}
            ],
        },
        "triton": {
            "report": report(10.0, 400.0),
            "cpu": cpu,
            "memory": memory,
            "memory_after_load": memory,
            "sweep": {"steps": steps},
            "server_rss_mb": 320.0,
            "server_rss_mb_after_load": 320.0,
        },
        "triton_no_batching": {"report": report(9.0, 300.0), "cpu": cpu},
        "flask": {"report": report(4.0, 1500.0), "cpu": {**cpu, "server_cpu_s": 4.0}},
        "fused": {"report": report(11.0, 350.0), "cpu": cpu},
    }
    r["ratios"] = ratios(r)
    r["targets"] = targets(r)
    return r


def test_ratios_with_the_load_generator_accounted_for(monkeypatch: pytest.MonkeyPatch) -> None:
    r = _results(monkeypatch)
    rat = r["ratios"]
    assert rat[LOAD_SHARE] == pytest.approx(0.05)
    assert rat[CAPACITY_RATIO] == pytest.approx(10.0 / (12.5 * 0.95))
    assert TARGET_RATIO == PER_CPU_RATIO and rat[PER_CPU_RATIO] == pytest.approx((100 / 16.0) / 7.0)
    assert rat[FLASK_PER_CPU_RATIO] == pytest.approx((100 / 16.0) / (100 / 4.0))
    assert rat["served / in-process limit (throughput)"] == pytest.approx(0.8)  # the raw figure stays
    assert rat["fused CPU layout / ensemble (throughput)"] == pytest.approx(1.1)
    by_name = {t["ratio"]: t for t in r["targets"]}
    assert by_name[TARGET_RATIO]["met"] is True
    assert by_name["served / Flask (throughput)"]["met"] is False
    assert "160.0 CPU ms per request" in by_name["served / Flask (throughput)"]["bounded_by"]
    assert by_name["served p99 / Flask p99"]["met"] is True
    assert by_name["p99 at ~70% of peak / unloaded p50"]["met"] is True


def test_render_has_targets_cpu_hops_and_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    text = render_bench(_results(monkeypatch))
    for heading in ("## Targets (issue 16)", "## CPU per process", "## Hops, per request", "## Server memory per process"):
        assert heading in text
    assert "| stub m_postprocess | 2 | 6 | 2.0 | 10% | 20.0 |" in text
    assert "| preprocess stub (decode, resize, normalise) | 1200 KB | 40.0 | 40.0 | 0.0 |" in text
    assert "| total | 2 | 320 | 210 | 140 |" in text
    assert "(f) fused CPU layout" in text
    assert "| gate (nginx gRPC proxy) | 49 KB | 0.0 | | |" in text


def test_tune_apply_edits_only_what_the_variant_changes(tmp_path: Path) -> None:
    from tritonclient.grpc import model_config_pb2 as mc

    from detserve.tritonconfig import read_config, render
    from loadtest.tune import Variant, apply_variant, best_row, ort_thread_variants, set_ort_threads

    for role in ("preprocess", "core", "postprocess"):
        config = mc.ModelConfig(name=f"m_{role}", backend="python")
        key = "intra_op_threads" if role == "core" else "torch_threads"
        config.parameters[key].string_value = "1"
        (tmp_path / f"m_{role}").mkdir()
        (tmp_path / f"m_{role}" / "config.pbtxt").write_text(render(config))
    assert [v.name for v in ort_thread_variants(2)] == ["ORT 1 thread", "ORT 2 threads"]
    changed = apply_variant(tmp_path, "m", Variant("ORT 2", set_ort_threads(2)))
    assert changed == [tmp_path / "m_core" / "config.pbtxt"]
    assert read_config(tmp_path / "m_core").parameters["intra_op_threads"].string_value == "2"
    assert apply_variant(tmp_path, "m", Variant("ORT 2", set_ort_threads(2))) == []
    rows = [
        {"variant": "a", "throughput_rps": 5.0, "failures": 0},
        {"variant": "b", "throughput_rps": 9.0, "failures": 3},
        {"variant": "c", "throughput_rps": 7.0, "failures": 0},
    ]
    assert best_row(rows)["variant"] == "c"


def test_stubs_wait_passively_unless_the_operator_says_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    from detserve.ops.embedded import server_environment

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert server_environment(embedded=False)["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert server_environment(embedded=False)["OMP_WAIT_POLICY"] == "ACTIVE"
