"""The soak's bookkeeping (loadtest/soak_stats.py): windows, slopes, end-state verdicts."""

from __future__ import annotations

import pytest

from loadtest.opsreport_base import Call
from loadtest.soak_stats import ZOMBIE, Limits, Sample, Window, attribute, end_state, series, slope_per_hour


def test_requests_go_to_the_first_window_they_overlap_and_failures_elsewhere_are_lost() -> None:
    windows = [Window("stub kill", 10.0, 20.0), Window("gate kill", 30.0, 40.0, probes=(Call(30, 31, "HTTP 413", True),))]
    calls = [
        Call(0.0, 1.0),  # before: ok
        Call(9.0, 10.5, "not healthy"),  # started before the fault, ended inside: the window's
        Call(19.0, 31.0, "UNAVAILABLE"),  # overlaps both: the first one's
        Call(25.0, 26.0, "deadline exceeded"),  # between the windows: lost
        Call(40.0, 41.0),  # touches the end: inside, ok
        Call(41.5, 42.0, "UNAVAILABLE"),  # after: lost
    ]
    a = attribute(calls, windows)
    assert (a.outside.sent, a.outside.ok, a.outside.lost) == (3, 1, 2)
    assert sorted(a.outside.lost_errors) == ["UNAVAILABLE", "deadline exceeded"]
    assert [(t.sent, t.lost) for t in a.windows] == [(2, 2), (1, 0)]
    assert [(t.sent, t.expected, t.lost) for t in a.probes] == [(0, 0, 0), (1, 1, 0)]


def test_slope_is_a_least_squares_line_per_hour() -> None:
    assert slope_per_hour([(0.0, 100.0), (1800.0, 110.0), (3600.0, 120.0)]) == pytest.approx(20.0)
    assert slope_per_hour([(0.0, 5.0), (60.0, 7.0), (120.0, 5.0)]) == pytest.approx(0.0)
    assert slope_per_hour([(5.0, 1.0)]) == 0.0
    assert slope_per_hour([(5.0, 1.0), (5.0, 2.0)]) == 0.0


def _samples(rss_of: dict[int, tuple[str, list[float]]], fds: int = 10, times: int = 11, step: float = 360.0) -> list[Sample]:
    return [
        Sample(i * step, pid, role, values[i], fds)
        for pid, (role, values) in rss_of.items()
        for i in range(times)
        if i < len(values)
    ]


def test_a_steady_climb_is_a_leak_a_step_at_start_up_is_not() -> None:
    hour = [float(i) for i in range(11)]  # 11 samples over one hour
    samples = _samples({
        1: ("tritonserver", [100.0 + 10 * x for x in hour]),  # +100 MB/h throughout
        2: ("stub core", [150.0] + [300.0] * 10),  # warm-up step, then flat
        3: ("nginx worker", [7.0] * 11),
    })  # fmt: skip
    procs = {p.pid: p for p in series(samples)}
    assert procs[1].slope_mb_h == pytest.approx(100.0)
    assert procs[1].late_growth_mb == pytest.approx(50.0)
    assert procs[2].late_slope_mb_h == pytest.approx(0.0)
    state = end_state(samples, [(0.0, 4, 64 * 2**20), (3600.0, 4, 64 * 2**20)], list(procs.values()), Limits())
    assert len(state.leaks) == 1 and state.leaks[0].startswith("tritonserver (pid 1)")


def test_a_short_lived_process_is_not_judged_by_its_slope() -> None:
    samples = _samples({1: ("supervisor", [100.0] * 11), 2: ("stub core", [100.0, 200.0])})
    state = end_state(samples[:-1], [], series(samples[:-1]), Limits())
    assert not [leak for leak in state.leaks if "pid 2" in leak]


def test_end_state_names_processes_descriptors_and_shm_that_did_not_come_back() -> None:
    start = [Sample(0.0, 1, "tritonserver", 60, 70), Sample(0.0, 2, "stub core", 150, 4), Sample(0.0, 3, "nginx worker", 7, 14)]
    end = [
        Sample(100.0, 1, "tritonserver", 60, 200),  # descriptors not returned
        Sample(100.0, 4, "stub core", 150, 26),  # a reloaded stub inherits some: within the margin
        Sample(100.0, 5, "nginx worker", 7, 14),
        Sample(100.0, 6, "nginx worker", 7, 14),  # one worker more
        Sample(100.0, 2, ZOMBIE, 0, 0),  # the killed stub
    ]
    shm = [(0.0, 4, 64 * 2**20), (100.0, 5, 80 * 2**20)]
    state = end_state(start + end, shm, [], Limits(), stubs_killed=1)
    assert sorted(state.leaks) == [
        "/dev/shm: 5 regions, 80 MiB at the end; 4, 64 MiB at the start",
        "nginx worker: 2 process(es) at the end, 1 at the start",
        "tritonserver: 200 open file descriptors at the end, 70 at the start",
    ]
    assert (
        end_state(start + end, shm, [], Limits(), stubs_killed=0).leaks[0]
        == "1 new zombie process(es) at the end, 0 stub(s) killed"
    )
