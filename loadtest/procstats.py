"""Who used the CPU and the memory during a load test: per-process figures from /proc (Linux).

On a small machine the load generator (Locust) runs beside the server and takes part of the same
cores, so a served throughput compared with an in-process limit that pays for no client is not a
fair comparison. ``CpuSampler`` samples the cumulative CPU time (user + system) of every process
below a root (the bench process: tritonserver, each python stub, the nginx gate, Locust) a few
times a second; ``CpuSeries.window`` interpolates each process's counter at the start and end of
the measured window and sums them per role. ``memory_table`` reads RSS, PSS (shared pages split
between the processes that map them) and USS (pages only that process maps) per process.

A role is what the process is for: ``tritonserver``, ``gate`` (nginx), ``locust``,
``stub <model>`` (every instance of one python model), ``flask`` (the baseline service), or ``other``.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from detserve.ops.watchdog import stub_identity

CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
PROC = Path("/proc")


@dataclass(frozen=True)
class ProcInfo:
    pid: int
    ppid: int
    cpu_s: float  # user + system, cumulative since the process started
    threads: int
    argv: tuple[str, ...]


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # the command name (field 2) is in parentheses and may itself hold spaces or parentheses
    return raw[raw.rfind(")") + 2 :].split()


def read_proc(pid: int) -> ProcInfo | None:
    """One process's parent, CPU seconds and thread count; None when it is gone."""
    fields = _stat_fields(pid)
    if fields is None:
        return None
    try:
        argv = tuple(a.decode(errors="replace") for a in (PROC / str(pid) / "cmdline").read_bytes().split(b"\0") if a)
    except OSError:
        argv = ()
    # after the name: state(0) ppid(1) ... utime(11) stime(12) ... num_threads(17)
    cpu = (int(fields[11]) + int(fields[12])) / CLK_TCK
    return ProcInfo(pid, int(fields[1]), cpu, int(fields[17]), argv)


def descendants(root: int) -> list[ProcInfo]:
    """Every live process below ``root`` (not ``root`` itself), from one pass over /proc."""
    infos: dict[int, ProcInfo] = {}
    for entry in PROC.iterdir():
        if entry.name.isdigit() and (info := read_proc(int(entry.name))) is not None:
            infos[info.pid] = info
    children: dict[int, list[int]] = {}
    for info in infos.values():
        children.setdefault(info.ppid, []).append(info.pid)
    out, todo = [], list(children.get(root, []))
    while todo:
        pid = todo.pop()
        out.append(infos[pid])
        todo.extend(children.get(pid, []))
    return out


def role_of_process(argv: Iterable[str]) -> str:
    """What a process is for, from its command line (module docstring)."""
    args = list(argv)
    if not args:
        return "other"
    if (ident := stub_identity(args)) is not None:
        return f"stub {ident[0]}"
    head = args[0]
    if head.endswith("tritonserver"):
        return "tritonserver"
    if head.startswith("nginx") or Path(head).name == "nginx":
        return "gate"
    if "locust" in args[:3] or any(a.endswith("/locust") for a in args[:2]):
        return "locust"
    if "loadtest.flask_baseline" in args[:3]:
        return "flask"
    return "other"


@dataclass
class CpuSeries:
    """Samples of every process's cumulative CPU seconds: (time.time(), {pid: cpu_s}), plus each pid's role."""

    samples: list[tuple[float, dict[int, float]]] = field(default_factory=list)
    machine: list[tuple[float, float]] = field(default_factory=list)  # (time, busy CPU seconds of all cores, /proc/stat)
    roles: dict[int, str] = field(default_factory=dict)
    threads: dict[int, int] = field(default_factory=dict)  # the most threads seen per process

    def _at(self, pid: int, t: float) -> float:
        """``pid``'s cumulative CPU at time ``t``, interpolated; 0 before it was first seen."""
        points = [(ts, vals[pid]) for ts, vals in self.samples if pid in vals]
        if not points or t <= points[0][0]:
            return 0.0 if not points or self.samples[0][0] < points[0][0] else points[0][1]
        for (t0, v0), (t1, v1) in itertools.pairwise(points):
            if t <= t1:
                return v0 + (v1 - v0) * (t - t0) / max(t1 - t0, 1e-9)
        return points[-1][1]

    def per_process(self, t0: float, t1: float) -> dict[int, float]:
        """CPU seconds each process used between ``t0`` and ``t1`` (epoch seconds)."""
        pids = {pid for _, vals in self.samples for pid in vals}
        return {pid: max(self._at(pid, t1) - self._at(pid, t0), 0.0) for pid in sorted(pids)}

    def window(self, t0: float, t1: float) -> dict[str, float]:
        """CPU seconds per role between ``t0`` and ``t1``."""
        out: dict[str, float] = {}
        for pid, cpu in self.per_process(t0, t1).items():
            role = self.roles.get(pid, "other")
            out[role] = out.get(role, 0.0) + cpu
        return out

    def machine_busy(self, t0: float, t1: float) -> float | None:
        """CPU seconds every process on the machine used between ``t0`` and ``t1`` (others included)."""
        if len(self.machine) < 2:
            return None

        def at(t: float) -> float:
            for (ta, va), (tb, vb) in itertools.pairwise(self.machine):
                if t <= tb:
                    return va + (vb - va) * (min(max(t, ta), tb) - ta) / max(tb - ta, 1e-9)
            return self.machine[-1][1]

        return max(at(t1) - at(t0), 0.0)

    def instances(self) -> dict[str, int]:
        """How many processes each role had (python stubs: one per model instance)."""
        out: dict[str, int] = {}
        for role in self.roles.values():
            out[role] = out.get(role, 0) + 1
        return out


def machine_busy_s() -> float | None:
    """Busy CPU seconds of all cores since boot (/proc/stat: everything but idle and iowait)."""
    try:
        fields = (PROC / "stat").read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return None
    ticks = [int(v) for v in fields[1:9]]  # user nice system idle iowait irq softirq steal
    return (sum(ticks) - ticks[3] - ticks[4]) / CLK_TCK


class CpuSampler:
    """Samples the CPU counters of every process below ``root`` in a thread, every ``interval_s``."""

    def __init__(self, root: int | None = None, interval_s: float = 0.25) -> None:
        self.root = os.getpid() if root is None else root
        self.interval_s = interval_s
        self.series = CpuSeries()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> None:
        now = time.time()
        values = {}
        for info in descendants(self.root):
            if info.pid not in self.series.roles:
                self.series.roles[info.pid] = role_of_process(info.argv)
            values[info.pid] = info.cpu_s
            self.series.threads[info.pid] = max(self.series.threads.get(info.pid, 0), info.threads)
        self.series.samples.append((now, values))
        if (busy := machine_busy_s()) is not None:
            self.series.machine.append((now, busy))

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def __enter__(self) -> CpuSampler:
        self.sample()
        self._thread = threading.Thread(target=self._run, name="cpu-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()


@dataclass(frozen=True)
class ProcessMemory:
    pid: int
    role: str
    rss_mb: float
    pss_mb: float
    uss_mb: float  # private pages: what ending this process alone would free
    threads: int


def _smaps_rollup_kb(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        for line in (PROC / str(pid) / "smaps_rollup").read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[0].endswith(":") and parts[2] == "kB":
                out[parts[0][:-1]] = int(parts[1])
    except OSError:
        pass
    return out


def memory_of(info: ProcInfo) -> ProcessMemory:
    kb = _smaps_rollup_kb(info.pid)
    uss = kb.get("Private_Clean", 0) + kb.get("Private_Dirty", 0)
    return ProcessMemory(
        info.pid, role_of_process(info.argv), kb.get("Rss", 0) / 1024, kb.get("Pss", 0) / 1024, uss / 1024, info.threads
    )


def memory_table(root: int, include_root: bool = True) -> list[ProcessMemory]:
    """RSS/PSS/USS of ``root`` (when asked) and every process below it."""
    infos = descendants(root)
    if include_root and (me := read_proc(root)) is not None:
        infos.insert(0, me)
    return [memory_of(i) for i in infos]


def memory_by_role(rows: Iterable[ProcessMemory]) -> dict[str, dict[str, float]]:
    """Per role: processes, RSS, PSS and USS in MB (summed over the role's processes)."""
    out: dict[str, dict[str, float]] = {}
    for r in rows:
        agg = out.setdefault(r.role, {"processes": 0, "rss_mb": 0.0, "pss_mb": 0.0, "uss_mb": 0.0, "threads": 0})
        agg["processes"] += 1
        agg["rss_mb"] += r.rss_mb
        agg["pss_mb"] += r.pss_mb
        agg["uss_mb"] += r.uss_mb
        agg["threads"] += r.threads
    return out


def totals(by_role: Mapping[str, Mapping[str, float]], key: str) -> float:
    return float(sum(v[key] for v in by_role.values()))
