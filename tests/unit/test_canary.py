"""The canary's verdict rules and its reading of Triton's metrics (no server: ops/canary.py)."""

from __future__ import annotations

from detserve.ops.canary import Side, Thresholds, _window, judge
from detserve.ops.canary_metrics import Sample, parse_sample

METRICS = """\
# HELP nv_inference_request_success Number of successful inference requests, all batch sizes
nv_inference_request_success{model="ssdlite",version="1"} 40
nv_inference_request_success{model="ssdlite_core",version="2"} 40
nv_inference_request_failure{model="ssdlite",reason="REJECTED",version="1"} 1
nv_inference_request_failure{model="ssdlite",reason="BACKEND",version="1"} 2
nv_inference_request_duration_us{model="ssdlite",version="1"} 4300000
nv_inference_request_summary_us{model="ssdlite",version="1",quantile="0.5"} 90000
nv_inference_request_summary_us{model="ssdlite",version="1",quantile="0.99"} 180000
nv_inference_request_summary_us_count{model="ssdlite",version="1"} 43
nv_inference_request_summary_us{model="ssdlite_core",version="2",quantile="0.99"} 900000
"""


def test_metrics_of_one_model_are_summed_over_reasons_and_versions() -> None:
    s = parse_sample(METRICS, "ssdlite")
    assert s == Sample(success=40, failure=3, request_us=4_300_000, p99_us=180_000)
    assert parse_sample(METRICS, "ssdlite", entry="ssdlite_core").received == 40
    assert parse_sample(METRICS.replace('"0.99"} 180000', '"0.99"} NaN'), "ssdlite").p99_us is None
    assert parse_sample(METRICS, "other") == Sample(0, 0, 0, None)


# measured on Triton 2.51: 6 requests, the core failing every other one (tests/integration/test_canary.py's version 4)
ENSEMBLE_FAILURES = """\
nv_inference_request_success{model="ssdlite",version="1"} 3
nv_inference_request_failure{model="ssdlite",reason="OTHER",version="1"} 6
nv_inference_request_failure{model="ssdlite",reason="BACKEND",version="1"} 0
nv_inference_request_success{model="ssdlite_preprocess",version="4"} 6
nv_inference_request_failure{model="ssdlite_preprocess",reason="OTHER",version="4"} 0
nv_inference_request_success{model="ssdlite_core",version="4"} 6
"""


def test_failed_ensemble_requests_are_what_its_first_step_received_minus_its_successes() -> None:
    assert parse_sample(ENSEMBLE_FAILURES, "ssdlite").failure == 6  # Triton's counter: each failure twice
    end = parse_sample(ENSEMBLE_FAILURES, "ssdlite", entry="ssdlite_preprocess")
    assert end.received == 6
    side = Side("canary")
    _window(side, "replica 0", Sample(0, 0, 0, None, 0), end)
    assert (side.requests, side.failures) == (6, 3)
    # the step was reloaded before the window (its counters restarted) while the ensemble's kept counting:
    # the window's increases still give the failures (before: 0, clipped from a negative difference)
    side = Side("canary")
    _window(side, "replica 0", Sample(40, 0, 0, None, 5), Sample(48, 0, 0, None, 20))
    assert (side.requests, side.failures) == (15, 7)


def test_window_takes_the_increase_and_a_reset_counts_from_zero() -> None:
    side = Side("canary")
    _window(side, "replica 0", Sample(10, 1, 1_000_000, None), Sample(30, 1, 3_000_000, 150_000))
    assert (side.requests, side.failures, side.mean_ms, side.p99_ms) == (20, 0, 100.0, 150.0)
    _window(side, "replica 1", Sample(50, 5, 9_000_000, None), Sample(4, 0, 800_000, 300_000))  # reloaded: reset
    assert (side.requests, side.failures, side.p99_ms) == (24, 0, 300.0)
    _window(side, "replica 2", "http://x/metrics: refused", Sample(1, 0, 0, None))
    assert "replica 2: metrics unavailable" in side.notes[0]


def _side(label: str, requests: int = 100, failures: int = 0, p99: float = 100.0, dets: int = 5, **kw: object) -> Side:
    return Side(label, requests, failures, p99, p99 / 2, [dets] * 10, **kw)  # type: ignore[arg-type]


def test_a_canary_that_returns_nothing_is_worse_even_when_fast() -> None:
    v = judge(_side("canary", p99=20.0, dets=0), _side("rest"), Thresholds())
    assert not v.ok and v.reasons == ("detections per image 0.00 vs 5.00",)
    table = v.table()
    assert "worse: detections per image" in table and "det/img" in table and "100%" in table  # empty share


def test_failures_and_latency_beyond_the_thresholds_are_worse() -> None:
    th = Thresholds()
    assert judge(_side("canary", failures=5), _side("rest"), th).reasons == ("failure ratio 5.0% vs 0.0%",)
    assert judge(_side("canary", failures=1), _side("rest"), th).ok  # 1 % more: within the default
    assert judge(_side("canary", p99=260.0), _side("rest", p99=100.0), th).reasons == ("p99 260.0 ms vs 100.0 ms",)
    assert judge(_side("canary", p99=190.0), _side("rest", p99=100.0), th).ok  # 1.5 x 100 + 50 ms
    assert judge(_side("canary", probe_failures=2), _side("rest"), th).reasons[0].startswith("2 probe request(s) failed")


def test_a_good_canary_passes_and_nothing_seen_is_not_a_pass() -> None:
    assert judge(_side("canary", dets=4), _side("rest", dets=5), Thresholds()).ok
    assert judge(_side("canary"), _side("rest", dets=0), Thresholds()).ok  # the rest finds nothing either
    empty = judge(Side("canary"), _side("rest"), Thresholds())
    assert "no request reached the canary in the window: nothing to judge" in empty.reasons
