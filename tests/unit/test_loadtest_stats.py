"""Load-test arithmetic on hand-made Triton statistics, stability, percentiles and the report files.

The statistics JSON copies the shape Triton 2.51 returned for the ssdlite ensemble: int64 values
as strings, and a model that has served nothing without counts and with empty ``{}`` phases.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from detserve.errors import DetserveError
from loadtest import stats
from loadtest.report import LoadReport, render_markdown, write_report
from loadtest.stats import StatsError, Window

PHASE_NAMES = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")


def fresh_model(name: str) -> dict[str, Any]:
    """A model that has not served a request yet, exactly as Triton reports it."""
    phases: dict[str, Any] = {p: {} for p in (*PHASE_NAMES, "cache_hit", "cache_miss")}
    return {"name": name, "version": "1", "inference_stats": phases}


def served_model(name: str, inferences: int, executions: int, phases: dict[str, tuple[int, int]]) -> dict[str, Any]:
    """A model after traffic; ``phases`` maps phase -> (count, ns); absent phases stay ``{}``."""
    inference_stats: dict[str, Any] = {p: {} for p in (*PHASE_NAMES, "cache_hit", "cache_miss")}
    for phase, (count, ns) in phases.items():
        inference_stats[phase] = {"count": str(count), "ns": str(ns)}
    per_batch = {p: inference_stats[p] for p in ("compute_input", "compute_infer", "compute_output")}
    return {
        "name": name,
        "version": "1",
        "last_inference": "1795826512630",
        "inference_count": str(inferences),
        "execution_count": str(executions),
        "inference_stats": inference_stats,
        "batch_stats": [{"batch_size": "1", **per_batch}],
    }


def statistics(*models: dict[str, Any]) -> dict[str, Any]:
    return {"model_stats": list(models)}


BEFORE = statistics(
    served_model(
        "ssdlite",
        1,
        1,
        {"success": (1, 400_000_000), "queue": (1, 5_000), "compute_input": (1, 300_000), "compute_infer": (1, 390_000_000)},
    ),
    served_model("ssdlite_core", 1, 1, {"success": (1, 20_000_000), "queue": (1, 1_000_000), "compute_infer": (1, 15_000_000)}),
    fresh_model("ssdlite_postprocess"),
)
AFTER = statistics(
    served_model(
        "ssdlite",
        33,
        33,
        {
            "success": (33, 400_000_000 + 32 * 50_000_000),
            "fail": (2, 6_000_000),
            "queue": (33, 5_000 + 32 * 10_000),
            "compute_input": (33, 300_000 + 32 * 250_000),
            "compute_infer": (33, 390_000_000 + 32 * 45_000_000),
            "compute_output": (32, 32 * 1_500_000),
        },
    ),
    served_model(
        "ssdlite_core",
        33,
        9,
        {
            "success": (33, 20_000_000 + 32 * 30_000_000),
            "queue": (33, 1_000_000 + 32 * 8_000_000),
            "compute_infer": (33, 15_000_000 + 32 * 20_000_000),
        },
    ),
    served_model("ssdlite_postprocess", 32, 8, {"success": (32, 32 * 12_000_000), "compute_infer": (32, 32 * 9_000_000)}),
)


class FakeClient:
    """Stands in for tritonclient.grpc.InferenceServerClient: returns canned statistics."""

    def __init__(self, *answers: dict[str, Any]) -> None:
        self.answers = list(answers)

    def get_inference_statistics(self, as_json: bool = False) -> dict[str, Any]:
        assert as_json
        return self.answers.pop(0)


def test_snapshot_parses_strings_and_missing_keys_as_zero() -> None:
    snap = stats.snapshot(FakeClient(BEFORE))
    assert set(snap) == {"ssdlite", "ssdlite_core", "ssdlite_postprocess"}
    core = snap["ssdlite_core"]
    assert (core.inference_count, core.execution_count) == (1, 1)
    assert core.queue == stats.Phase(1, 1_000_000)
    assert core.fail == stats.Phase(0, 0)
    fresh = snap["ssdlite_postprocess"]
    assert (fresh.inference_count, fresh.execution_count, fresh.success.count, fresh.compute_infer.ns) == (0, 0, 0, 0)


def test_snapshot_wraps_client_failure() -> None:
    class Broken:
        def get_inference_statistics(self, as_json: bool = False) -> dict[str, Any]:
            raise ConnectionError("connection refused")

    with pytest.raises(DetserveError, match="inference statistics"):
        stats.snapshot(Broken())


def test_same_name_in_two_versions_is_not_merged() -> None:
    v1, v2 = fresh_model("m"), fresh_model("m")
    v2["version"] = "2"
    assert set(stats.parse_statistics(statistics(v1, v2))) == {"m@1", "m@2"}


def test_delta_per_model_arithmetic() -> None:
    split = stats.delta(stats.parse_statistics(BEFORE), stats.parse_statistics(AFTER))
    ens = split["ssdlite"]
    assert (ens.requests, ens.failures, ens.inferences, ens.executions) == (32, 2, 32, 32)
    assert ens.avg_batch_size == 1.0
    assert ens.request_ms == pytest.approx(50.0)
    assert ens.queue_ms == pytest.approx(0.01)
    assert ens.compute_input_ms == pytest.approx(0.25)
    assert ens.compute_infer_ms == pytest.approx(45.0)
    # compute_output had no count in BEFORE ({}), 32 after: a phase appearing mid-window starts from 0
    assert ens.compute_output_ms == pytest.approx(1.5)
    assert ens.compute_ms == pytest.approx(46.75)

    core = split["ssdlite_core"]
    assert (core.requests, core.inferences, core.executions) == (32, 32, 8)
    assert core.avg_batch_size == pytest.approx(4.0)
    assert core.queue_ms == pytest.approx(8.0)
    assert core.compute_infer_ms == pytest.approx(20.0)
    assert core.compute_input_ms == 0.0  # count delta 0 -> 0, not a division error

    post = split["ssdlite_postprocess"]  # was fresh (no counts at all) before the window
    assert (post.requests, post.executions, post.avg_batch_size) == (32, 8, 4.0)
    assert post.compute_infer_ms == pytest.approx(9.0)


def test_delta_without_traffic_is_all_zero() -> None:
    snap = stats.parse_statistics(BEFORE)
    split = stats.delta(snap, snap)["ssdlite"]
    assert (split.requests, split.executions, split.avg_batch_size, split.queue_ms, split.compute_infer_ms) == (
        0,
        0,
        0.0,
        0.0,
        0.0,
    )


def test_model_loaded_mid_window_counts_from_zero() -> None:
    after = stats.parse_statistics(AFTER)
    before = {k: v for k, v in after.items() if k != "ssdlite_postprocess"}
    assert stats.delta(before, after)["ssdlite_postprocess"].requests == 32


def test_server_restarted_mid_window_counts_from_zero_and_is_marked() -> None:
    # AFTER is a fresh server: fewer requests than BEFORE; the split is what it served since
    restarted = statistics(
        served_model("ssdlite", 3, 3, {"success": (3, 150_000_000)}),
        fresh_model("ssdlite_core"),
        fresh_model("ssdlite_postprocess"),
    )
    split = stats.delta(stats.parse_statistics(AFTER), stats.parse_statistics(restarted))
    ens = split["ssdlite"]
    assert (ens.requests, ens.inferences, ens.reset) == (3, 3, True)
    assert ens.request_ms == pytest.approx(50.0)
    assert split["ssdlite_core"].reset and split["ssdlite_core"].requests == 0
    notes = stats.reset_notes(split)
    assert len(notes) == 3 and "`ssdlite_core`" in notes[1] and "reloaded" in notes[1]


def core_stats(inferences: int, executions: int, infer_ns: int) -> dict[str, Any]:
    return served_model(
        "ssdlite_core", inferences, executions, {"success": (inferences, infer_ns), "compute_infer": (inferences, infer_ns)}
    )


def test_model_reloaded_mid_run_keeps_what_it_served_before() -> None:
    # the core's stub is killed after 40 requests and its model reloaded: its counters restart, and
    # 10 more requests are served by the new instance before the run ends
    snaps = [
        stats.parse_statistics(statistics(core_stats(30, 10, 30 * 20_000_000))),
        stats.parse_statistics(statistics(core_stats(70, 20, 70 * 20_000_000))),  # 40 served
        stats.parse_statistics(statistics(core_stats(4, 2, 4 * 30_000_000))),  # reloaded: 4 since
        stats.parse_statistics(statistics(core_stats(10, 4, 10 * 30_000_000))),  # 6 more
    ]
    core = stats.accumulate(snaps)["ssdlite_core"]
    assert (core.requests, core.inferences, core.executions, core.reset) == (50, 50, 14, True)
    assert core.compute_infer_ms == pytest.approx((40 * 20 + 10 * 30) / 50)
    # without a reload the same arithmetic is a plain difference, unmarked
    plain = stats.accumulate(snaps[:2])["ssdlite_core"]
    assert (plain.requests, plain.reset) == (40, False)


def test_reload_is_seen_when_any_counter_decreases() -> None:
    # more requests after the reload than before it: counts alone look monotonic, the summed ns do not
    before = stats.parse_statistics(statistics(core_stats(5, 5, 5 * 50_000_000)))
    after = stats.parse_statistics(statistics(core_stats(6, 6, 6 * 10_000_000)))
    core = stats.delta(before, after)["ssdlite_core"]
    assert (core.requests, core.reset) == (6, True)


def test_model_missing_from_a_snapshot_was_reloaded() -> None:
    snaps = [
        stats.parse_statistics(statistics(core_stats(30, 10, 30 * 20_000_000))),
        stats.parse_statistics(statistics()),  # unloading at that instant
        stats.parse_statistics(statistics(core_stats(35, 12, 35 * 20_000_000))),
    ]
    core = stats.accumulate(snaps)["ssdlite_core"]
    assert (core.requests, core.reset) == (35, True)


def test_accumulate_needs_two_snapshots() -> None:
    with pytest.raises(StatsError, match="at least 2"):
        stats.accumulate([stats.parse_statistics(BEFORE)])


def test_naive_throughput() -> None:
    assert stats.naive_throughput(50.0) == pytest.approx(20.0)
    assert stats.naive_throughput(50.0, batch=4) == pytest.approx(80.0)
    with pytest.raises(StatsError):
        stats.naive_throughput(0.0)


def windows(*pairs: tuple[float, float]) -> list[Window]:
    return [Window(throughput=t, p95_ms=p) for t, p in pairs]


def test_stable_when_last_three_within_tolerance() -> None:
    # an unstable ramp-up first: only the last n windows count
    ws = windows((5, 900), (20, 300), (100, 52), (105, 50), (98, 49))
    assert stats.is_stable(ws)
    assert stats.stability(ws)[1] == "stable: 3 windows within 10%"


def test_unstable_throughput_or_latency() -> None:
    assert not stats.is_stable(windows((100, 50), (100, 50), (130, 50)))  # throughput drifts 17% from mean
    assert not stats.is_stable(windows((100, 50), (100, 50), (100, 70)))  # p95 drifts
    verdict = stats.stability(windows((100, 50), (100, 50), (100, 70)))[1]
    assert verdict.startswith("NOT stable:") and "p95" in verdict
    assert stats.is_stable(windows((100, 50), (100, 50), (130, 50)), tolerance=0.2)


def test_fewer_than_n_windows_is_not_stable() -> None:
    assert not stats.is_stable(windows((100, 50), (100, 50)))
    assert "only 2 window" in stats.stability(windows((100, 50), (100, 50)))[1]
    assert stats.is_stable(windows((100, 50), (100, 50)), n=2)
    assert not stats.is_stable([])


def test_window_without_requests_is_not_stable() -> None:
    ws = [*windows((100, 50), (100, 50)), Window.from_latencies([], duration_s=5.0)]
    assert ws[-1].throughput == 0.0 and ws[-1].p95_ms is None
    assert not stats.is_stable(ws)


def test_percentiles_linear() -> None:
    values = list(range(1, 101))  # 1..100
    pct = stats.percentiles(values)
    assert list(pct) == ["p50", "p90", "p95", "p99"]
    assert pct["p50"] == pytest.approx(50.5)
    assert pct["p95"] == pytest.approx(95.05)
    assert pct["p99"] == pytest.approx(float(np.percentile(values, 99, method="linear")))
    assert stats.percentiles([7.0]) == dict.fromkeys(pct, 7.0)
    with pytest.raises(StatsError):
        stats.percentiles([])


def test_window_from_latencies() -> None:
    w = Window.from_latencies([10.0, 20.0, 30.0, 40.0], duration_s=2.0, start_s=4.0)
    assert (w.throughput, w.requests, w.start_s) == (2.0, 4, 4.0)
    assert w.p50_ms == pytest.approx(25.0)


def test_fingerprint_without_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    info = stats.fingerprint()
    assert info["gpu"] == "none"
    assert info["cpu_count"] == os.cpu_count()
    assert info["packages"]["tritonclient"]  # installed in the dev environment
    assert "triton_server" not in info
    json.dumps(info)


def test_fingerprint_reads_nvidia_smi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    smi = tmp_path / "nvidia-smi"
    smi.write_text(
        "#!/bin/sh\n"
        'if [ -n "$1" ]; then echo "NVIDIA H100 80GB HBM3, 550.54.15, 1980 MHz, 71.23 W"; exit 0; fi\n'
        'echo "| NVIDIA-SMI 550.54.15    Driver Version: 550.54.15    CUDA Version: 12.4     |"\n'
    )
    smi.chmod(smi.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", str(tmp_path))
    gpus = stats.fingerprint()["gpu"]
    assert gpus == [
        {
            "name": "NVIDIA H100 80GB HBM3",
            "driver_version": "550.54.15",
            "clocks.sm": "1980 MHz",
            "power.draw": "71.23 W",
            "cuda": "12.4",
        }
    ]


def make_report(steps: list[dict[str, float]] | None = None) -> LoadReport:
    split = stats.delta(stats.parse_statistics(BEFORE), stats.parse_statistics(AFTER))
    ws = [Window.from_latencies([40.0 + i, 45.0 + i, 60.0 + i, 90.0], duration_s=0.2, start_s=i * 0.2) for i in range(4)]
    return LoadReport(
        title="ssdlite: fixed load, 8 users",
        model="ssdlite",
        users=8,
        duration_s=30.0,
        requests=600,
        failures=3,
        throughput_rps=19.9,
        latency_ms={"p50": 45.0, "p90": 70.0, "p95": 80.0, "p99": 95.0},
        windows=ws,
        stable=stats.is_stable(ws),
        server_split=split,
        naive_throughput_rps=stats.naive_throughput(split["ssdlite"].compute_ms),
        fingerprint={"cpu_model": "Test CPU | 2 cores", "gpu": "none", "packages": {"torch": "2.14.1", "tensorrt": None}},
        steps=steps or [],
        notes=["2 CPU cores shared by client and server"],
    )


def test_markdown_contains_the_key_rows() -> None:
    md = render_markdown(make_report())
    assert md.startswith("# ssdlite: fixed load, 8 users")
    assert "| throughput | 19.90 req/s |" in md
    assert "| latency p95 | 80.0 ms |" in md
    assert "| failures | 3 (0.5%) |" in md
    assert (
        "| model | requests | failures | avg batch | queue ms | compute input ms | compute infer ms | compute output ms |" in md
    )
    assert "| `ssdlite` (ensemble) | 32 | 2 | 1.00 | 0.01 | 0.25 | 45.00 | 1.50 |" in md
    assert "| `ssdlite_core` | 32 | 0 | 4.00 | 8.00 | 0.00 | 20.00 | 0.00 |" in md
    assert md.index("`ssdlite_core`") < md.index("`ssdlite_postprocess`")  # pipeline order
    assert "| naive (1000 / compute ms per inference) | 21.39 |" in md
    assert "| measured / naive | 0.93× |" in md
    assert "**stable: 3 windows within 10%**" in md
    assert "- 2 CPU cores shared by client and server" in md
    assert "| cpu_model | Test CPU \\| 2 cores |" in md  # a pipe cannot break the table
    assert "| packages.tensorrt | not installed |" in md


def test_markdown_unstable_sweep_and_missing_naive() -> None:
    report = make_report(steps=[{"users": 1, "throughput_rps": 8.0, "p50": 110.0, "p90": 120.0, "p95": 125.0, "p99": 130.0}])
    report.windows = windows((10, 100), (20, 300))
    report.naive_throughput_rps = 0.0
    md = render_markdown(report)
    assert "**NOT stable: only 2 window(s), need 3**" in md
    assert "| 1 | 8.00 | 110.0 | 120.0 | 125.0 | 130.0 |" in md
    assert "naive estimate: not available" in md


def test_write_report_produces_three_files(tmp_path: Path) -> None:
    report = make_report()
    paths = write_report(report, tmp_path / "out")
    assert set(paths) == {"json", "markdown", "plot"}
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and paths["plot"].stat().st_size > 1000
    assert paths["markdown"].read_text() == render_markdown(report)
    raw = json.loads(paths["json"].read_text())
    assert raw["server_split"]["ssdlite"]["compute_ms"] == pytest.approx(46.75)
    assert raw["windows"][0]["p95_ms"] == pytest.approx(report.windows[0].p95_ms)
    again = LoadReport.from_dict(raw)
    assert again.server_split == report.server_split and again.windows == report.windows


def test_write_report_plots_sweep_and_empty_runs(tmp_path: Path) -> None:
    steps = [
        {"users": u, "throughput_rps": 8.0 * u, "p50": 100.0 + u, "p90": 110.0, "p95": 120.0, "p99": 150.0} for u in (1, 2, 4)
    ]
    assert write_report(make_report(steps), tmp_path / "sweep")["plot"].stat().st_size > 1000
    empty = make_report()
    empty.windows, empty.latency_ms, empty.server_split = [], {}, {}
    paths = write_report(empty, tmp_path / "empty")
    assert paths["plot"].stat().st_size > 1000
    assert "No server statistics were recorded." in paths["markdown"].read_text()


def test_report_of_a_run_with_a_reload_marks_the_row_and_round_trips(tmp_path: Path) -> None:
    # the run that used to end without a report ("counter inference_count went backwards")
    report = make_report()
    restarted = statistics(served_model("ssdlite_core", 4, 2, {"success": (4, 80_000_000)}))
    before = stats.parse_statistics(AFTER)
    split = stats.accumulate([before, {**before, **stats.parse_statistics(restarted)}])
    report.server_split = split
    report.notes = stats.reset_notes(split)
    paths = write_report(report, tmp_path / "out")
    md = paths["markdown"].read_text()
    assert "| `ssdlite_core` (reloaded mid-run, see notes) | 4 |" in md
    assert "- Triton's counters of `ssdlite_core` restarted during the run" in md
    again = LoadReport.from_dict(json.loads(paths["json"].read_text()))
    assert again.server_split["ssdlite_core"].reset and not again.server_split["ssdlite"].reset
