"""The soak's bookkeeping (loadtest/soak.py): fault windows, per-process samples, slopes, verdicts.

Pure functions over what the soak recorded, so that the rules are tested without a server:

- a request belongs to the first fault window it overlaps (it was sent, or still retrying, while
  the fault was in effect); a request that fails outside every window is LOST;
- each process of the server (the supervisor, tritonserver, each stub, the nginx master and
  workers) is a series of (time, RSS, open descriptors) samples keyed by pid; its RSS slope is a
  least-squares line in MB/hour;
- the end state is compared with the start: processes per role, descriptors per role, and the
  server's /dev/shm regions.

The records themselves (the schedule, what one soak saw) are here too, so the soak (soak.py) and
its report (soak_render.py) both read them from below instead of from each other.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from detserve.errors import DetserveError
from loadtest.opsreport_base import Call, Tally

ZOMBIE = "zombie"


@dataclass(frozen=True)
class Window:
    """One fault: from its injection until readiness was back (plus a grace), monotonic seconds."""

    fault: str
    start: float
    end: float
    recovered: bool = True  # readiness came back before the window's time limit
    detail: str = ""
    probes: tuple[Call, ...] = ()  # the fault's own requests (an attack's): refused as expected or not

    def overlaps(self, call: Call) -> bool:
        return call.start <= self.end and call.end >= self.start


@dataclass(frozen=True)
class Attribution:
    outside: Tally  # requests that overlap no window: every failure there is lost
    windows: list[Tally]  # per window: the load's requests that overlapped it
    probes: list[Tally]  # per window: the fault's own requests


def attribute(calls: Iterable[Call], windows: Sequence[Window]) -> Attribution:
    """Split the load's requests by fault window (the first one each overlaps) and tally them."""
    outside: list[Call] = []
    inside: list[list[Call]] = [[] for _ in windows]
    for call in calls:
        index = next((i for i, w in enumerate(windows) if w.overlaps(call)), None)
        (outside if index is None else inside[index]).append(call)
    return Attribution(Tally.of(outside), [Tally.of(c) for c in inside], [Tally.of(list(w.probes)) for w in windows])


@dataclass(frozen=True)
class Sample:
    """One process seen at one time."""

    t: float  # monotonic seconds
    pid: int
    role: str  # supervisor, tritonserver, stub <model>, nginx master, nginx worker, other
    rss_mb: float
    fds: int


def slope_per_hour(points: Sequence[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, value) in value per hour; 0 with fewer than 2 distinct times."""
    n = len(points)
    if n < 2:
        return 0.0
    mt = sum(t for t, _ in points) / n
    mv = sum(v for _, v in points) / n
    var = sum((t - mt) ** 2 for t, _ in points)
    if var == 0:
        return 0.0
    return sum((t - mt) * (v - mv) for t, v in points) / var * 3600.0


@dataclass(frozen=True)
class ProcessSeries:
    pid: int
    role: str
    first: float
    last: float
    rss_first: float
    rss_last: float
    rss_max: float
    fds_first: int
    fds_last: int
    fds_max: int
    slope_mb_h: float  # over every sample of the process
    late_slope_mb_h: float  # over its second half: a start-up or one attack's step is not a trend
    late_growth_mb: float  # what that late slope adds over the second half

    @property
    def seconds(self) -> float:
        return self.last - self.first

    def to_dict(self) -> dict[str, Any]:
        return {k: round(v, 2) if isinstance(v, float) else v for k, v in self.__dict__.items()}


def series(samples: Iterable[Sample]) -> list[ProcessSeries]:
    """One series per pid, in order of appearance."""
    by_pid: dict[int, list[Sample]] = {}
    for s in samples:
        by_pid.setdefault(s.pid, []).append(s)
    out = []
    for pid, ss in by_pid.items():
        ss.sort(key=lambda s: s.t)
        mid = (ss[0].t + ss[-1].t) / 2
        late = [(s.t, s.rss_mb) for s in ss if s.t >= mid]
        late_slope = slope_per_hour(late)
        out.append(
            ProcessSeries(
                pid, ss[-1].role, ss[0].t, ss[-1].t, ss[0].rss_mb, ss[-1].rss_mb, max(s.rss_mb for s in ss),
                ss[0].fds, ss[-1].fds, max(s.fds for s in ss), slope_per_hour([(s.t, s.rss_mb) for s in ss]),
                late_slope, late_slope * (ss[-1].t - mid) / 3600.0,
            )
        )  # fmt: skip
    return out


@dataclass(frozen=True)
class Limits:
    """When a growth counts as a leak (the soak's verdict)."""

    rss_mb_per_h: float = 50.0  # late slope of a process...
    rss_min_growth_mb: float = 8.0  # ...that also added this much over its second half...
    min_share: float = 0.4  # ...and lived at least this share of the sampled time
    # descriptors per role at the end may exceed the start by this (or 25 %): a stub started by a
    # reload inherits ~20 of tritonserver's descriptors (measured: 26 against the first stub's 4)
    fds_margin: int = 32


def _by_role(samples: Iterable[Sample], t: float) -> dict[str, tuple[int, int]]:
    """role -> (processes, descriptors) among the samples taken at time ``t``."""
    out: dict[str, tuple[int, int]] = {}
    for s in samples:
        if s.t == t:
            n, fds = out.get(s.role, (0, 0))
            out[s.role] = (n + 1, fds + s.fds)
    return out


@dataclass(frozen=True)
class EndState:
    start: dict[str, tuple[int, int]]  # role -> (processes, descriptors) at the first sample
    end: dict[str, tuple[int, int]]  # ... and at the last
    shm_start: tuple[int, int]  # (regions, bytes)
    shm_end: tuple[int, int]
    leaks: list[str] = field(default_factory=list)


def end_state(
    samples: Sequence[Sample],
    shm: Sequence[tuple[float, int, int]],
    procs: Sequence[ProcessSeries],
    limits: Limits,
    stubs_killed: int = 0,
) -> EndState:
    """Compare the last sample with the first, and judge every process's slope (``Limits``).

    Zombies are counted apart: a python stub killed by the soak stays a zombie until its
    tritonserver exits (Triton 2.51 never waits for it); more zombies than stubs killed is a leak.
    """
    times = sorted({s.t for s in samples})
    if not times:
        return EndState({}, {}, (0, 0), (0, 0), ["no sample of the server's processes was taken"])
    start, end = _by_role(samples, times[0]), _by_role(samples, times[-1])
    leaks = []
    zombies = end.get(ZOMBIE, (0, 0))[0] - start.get(ZOMBIE, (0, 0))[0]
    if zombies > stubs_killed:
        leaks.append(f"{zombies} new zombie process(es) at the end, {stubs_killed} stub(s) killed")
    for role in sorted((set(start) | set(end)) - {ZOMBIE}):
        (n0, f0), (n1, f1) = start.get(role, (0, 0)), end.get(role, (0, 0))
        if n1 != n0:
            leaks.append(f"{role}: {n1} process(es) at the end, {n0} at the start")
        if f1 > f0 + max(limits.fds_margin, f0 // 4):
            leaks.append(f"{role}: {f1} open file descriptors at the end, {f0} at the start")
    shm_start = (shm[0][1], shm[0][2]) if shm else (0, 0)
    shm_end = (shm[-1][1], shm[-1][2]) if shm else (0, 0)
    if shm_end[0] > shm_start[0] or shm_end[1] > shm_start[1] + 16 * 2**20:
        leaks.append(f"/dev/shm: {shm_end[0]} regions, {shm_end[1] / 2**20:.0f} MiB at the end; "
                     f"{shm_start[0]}, {shm_start[1] / 2**20:.0f} MiB at the start")  # fmt: skip
    span = times[-1] - times[0]
    for p in procs:
        if (
            span > 0
            and p.seconds >= limits.min_share * span
            and p.late_slope_mb_h > limits.rss_mb_per_h
            and p.late_growth_mb > limits.rss_min_growth_mb
        ):
            leaks.append(
                f"{p.role} (pid {p.pid}): RSS {p.rss_first:.0f} -> {p.rss_last:.0f} MB, "
                f"+{p.late_slope_mb_h:.0f} MB/h over its second half"
            )
    return EndState(start, end, shm_start, shm_end, leaks)


@dataclass(frozen=True)
class Schedule:
    duration_s: float
    warmup_s: float
    gap_s: float  # quiet time before each fault
    sample_s: float

    @classmethod
    def for_duration(cls, duration_s: float) -> Schedule:
        if duration_s < 60:
            raise DetserveError(f"a soak of {duration_s:.0f} s is too short", hint="at least 1m; 3m sees every fault once")
        return cls(
            duration_s, min(30.0, duration_s / 10), min(60.0, max(8.0, duration_s / 30)), min(15.0, max(2.0, duration_s / 120))
        )


@dataclass(frozen=True)
class SoakResult:
    schedule: Schedule
    t_start: float  # monotonic: the load began
    users: int
    seconds: float
    own_cpu_s: float  # CPU time of the soak process (clients, sampler, faults), beside the server's
    calls: list[Call]
    windows: list[Window]
    samples: list[Sample]
    shm: list[tuple[float, int, int]]
    tritonservers: list[int]
    left_after_stop: list[str]
    shm_after_stop: tuple[int, int]
    service_exited: str | None
    limits: Limits
