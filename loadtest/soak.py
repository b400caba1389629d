"""The soak (``detserve ops-report --soak 30m``): steady load on a real ``detserve serve`` while faults
are injected on a schedule, and what the server's processes hold over time.

The service is the real ``detserve serve`` command in a child process (what users run: the
supervisor loop, tritonserver, its python stubs and the nginx gate, an admin key from a 0600
file, a small ``--max-request-bytes``). ``users`` gRPC clients send one photograph after another
(ops-report's ``ClientLoad``: deadlines, retries of transient errors) for the whole duration.

After a warm-up, one fault at a time (``soak_faults.FAULTS``, in turn, a quiet gap before each):
bad inputs, oversized requests, finding 1's deep-nesting JSON, finding 3's idle streams (bounded),
SIGKILL of a python stub, of the nginx master, of tritonserver. A fault's window runs from its
injection until readiness through the gate is back and stable, plus a grace; requests that fail
outside every window are LOST (must be 0), each window's failures are counted.

Every few seconds each server process's RSS and open descriptors are sampled, and the bytes of
the server's /dev/shm regions (read through ``/proc/<tritonserver>/root/dev/shm``: the server may
run in its own mount namespace). The end state is compared with the start (soak_stats.py). Then
the service is stopped with SIGTERM and nothing of it may be left: processes, regions, ports.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from detserve.errors import DetserveError
from loadtest.opsreport_base import KEY, MODEL, ClientLoad, Echo, build_request
from loadtest.soak_faults import FAULTS, Fault, Service, ready, server_processes
from loadtest.soak_render import write_report
from loadtest.soak_stats import Limits, Sample, Schedule, SoakResult, Window

SOAK_MAX_REQUEST_BYTES = 8 * 2**20  # small, so that an oversized request is cheap to send
CLIENT_DEADLINE_S = 30.0
RETRIES = 12
SETTLE_S = 3.0  # a fault's effect (a dead stub seen by the watchdog) takes a moment to show
STABLE_S = 2.0  # readiness must hold this long to close a window...
GRACE_S = 3.0  # ...and the window stays open this much longer (in-flight retries land)
RECOVER_LIMIT_S = 240.0
END_SETTLE_S = 45.0  # a replaced stub may live 30 s after its reload (stubshm.RETIRE_GRACE_S)
PREFIX_OPTION = "shm-region-prefix-name="


def ensure_base(work: Path, echo: Echo) -> Path:
    """``<work>/base``: ops-report's small ssdlite repository (version 1), built once (~20 s)."""
    from converters.repository import build_repository

    base = work / "base"
    if not (base / MODEL / "config.pbtxt").is_file():
        echo(f"building {MODEL} into {base}")
        shutil.rmtree(base, ignore_errors=True)
        build_repository(build_request(base, 1, seed=0))
    return base


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_service(repo: Path, run_dir: Path, images: list[bytes], timeout_s: float = 300.0) -> Service:
    """``detserve serve`` on free loopback ports with an admin key from a 0600 file; returns once ready."""
    key_file = run_dir / "admin.key"
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(KEY + "\n")
    grpc_port, http_port, metrics_port = _free_port(), _free_port(), _free_port()
    command = [
        sys.executable, "-m", "detserve.app.cli", "serve", "--repository", str(repo), "--host", "127.0.0.1",
        "--grpc-port", str(grpc_port), "--http-port", str(http_port), "--metrics-port", str(metrics_port),
        "--max-request-bytes", str(SOAK_MAX_REQUEST_BYTES), "--log-file", str(run_dir / "tritonserver.log"),
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "DETSERVE_ADMIN_KEY"}
    env.update(DETSERVE_ADMIN_KEY_FILE=str(key_file), PYTHONUNBUFFERED="1")
    log_path = run_dir / "serve.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    svc = Service(process, "127.0.0.1", grpc_port, http_port, SOAK_MAX_REQUEST_BYTES, images, log_path)
    deadline = time.monotonic() + timeout_s
    while not ready(svc):
        if not svc.alive or time.monotonic() > deadline:
            stop_service(svc, [])
            raise DetserveError(f"detserve serve did not become ready: {svc.log_tail()}", hint=f"its log: {log_path}")
        time.sleep(0.5)
    return svc


@dataclass
class Sampler:
    """Every ``interval_s``: each server process's RSS and descriptors, and the server's /dev/shm regions."""

    svc: Service
    interval_s: float
    samples: list[Sample] = field(default_factory=list)
    shm: list[tuple[float, int, int]] = field(default_factory=list)  # (t, regions, bytes)
    prefixes: set[str] = field(default_factory=set)  # every shm prefix the server used
    tritonservers: list[int] = field(default_factory=list)  # pids in order: a restart adds one
    seen: dict[int, tuple[str, int | None]] = field(default_factory=dict)  # pid -> (role, start ticks)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def sample(self) -> None:
        from detserve.ops.stubshm import process_start

        t = time.monotonic()
        shm_dir = Path("/dev/shm")
        for info, role in server_processes(self.svc):
            rss, fds = _rss_mb(info.pid), _fds(info.pid)
            if rss is None:
                continue  # gone meanwhile
            self.samples.append(Sample(t, info.pid, role, rss, fds))
            if info.pid not in self.seen:
                self.seen[info.pid] = (role, process_start(info.pid))
            if role == "tritonserver":
                if info.pid not in self.tritonservers:
                    self.tritonservers.append(info.pid)
                self.prefixes |= {a.split(PREFIX_OPTION, 1)[1] for a in info.argv if PREFIX_OPTION in a}
                shm_dir = Path(f"/proc/{info.pid}/root/dev/shm")
        self.shm.append((t, *shm_usage(shm_dir, self.prefixes)))

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def __enter__(self) -> Sampler:
        self.sample()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def _rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        return None
    return 0.0  # a zombie has no VmRSS line


def _fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def shm_usage(shm_dir: Path, prefixes: set[str]) -> tuple[int, int]:
    """(regions, bytes allocated) of the server's regions in ``shm_dir``: all of them in a private
    /dev/shm (another mount than the host's), else those named with one of the server's prefixes."""
    try:
        private = os.stat(shm_dir).st_dev != os.stat("/dev/shm").st_dev
        entries = list(os.scandir(shm_dir))
    except OSError:
        return 0, 0
    count = size = 0
    for e in entries:
        if private or any(e.name.startswith(p) for p in prefixes):
            with contextlib.suppress(OSError):
                size += e.stat(follow_symlinks=False).st_blocks * 512
                count += 1
    return count, size


def _wait_recovered(svc: Service, t0: float) -> float | None:
    """When readiness through the gate was back and held ``STABLE_S`` (at least ``SETTLE_S`` after
    ``t0``); None if the service exited or it did not come back within ``RECOVER_LIMIT_S``."""
    since: float | None = None
    while time.monotonic() - t0 < RECOVER_LIMIT_S and svc.alive:
        now = time.monotonic()
        if ready(svc):
            since = now if since is None else since
            if now - since >= STABLE_S and now - t0 >= SETTLE_S:
                return since
        else:
            since = None
        time.sleep(0.5)
    return None


def inject(name: str, fault: Fault, svc: Service) -> Window:
    """One fault and its window."""
    t0 = time.monotonic()
    try:
        probes, detail = fault(svc)
    except Exception as e:  # the fault itself broke (not the server): say so, keep the window
        probes, detail = [], f"the fault could not be injected: {type(e).__name__}: {e}"
    back = _wait_recovered(svc, t0)
    if back is None:
        why = "detserve serve exited" if not svc.alive else f"not ready {RECOVER_LIMIT_S:.0f} s after the fault"
        return Window(name, t0, time.monotonic(), False, f"{detail}; {why}", tuple(probes))
    time.sleep(GRACE_S)
    return Window(name, t0, time.monotonic(), True, f"{detail}; ready again after {back - t0:.1f} s", tuple(probes))


def _sleep_watching(svc: Service, seconds: float) -> bool:
    """Sleep, but return False as soon as the service exits."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if not svc.alive:
            return False
        time.sleep(min(0.5, max(0.0, end - time.monotonic())))
    return svc.alive


def run_faults(svc: Service, schedule: Schedule, t_end: float, echo: Echo) -> list[Window]:
    """Faults in turn, a gap before each, while one more fits before ``t_end``; stops if the service exits."""
    windows: list[Window] = []
    turn = 0
    # a window lasts a few seconds to ~30 s (a tritonserver restart); keep the end quiet
    while time.monotonic() + schedule.gap_s + 30.0 < t_end:
        if not _sleep_watching(svc, schedule.gap_s):
            break
        name, fault = FAULTS[turn % len(FAULTS)]
        turn += 1
        window = inject(name, fault, svc)
        echo(f"  {name}: {window.detail} ({window.end - window.start:.1f} s window)")
        windows.append(window)
        if not svc.alive:
            break
    return windows


def settle(sampler: Sampler, start_roles: dict[str, int]) -> None:
    """Sample until the processes per role match the start (a replaced stub lingers up to 30 s), at most END_SETTLE_S."""
    deadline = time.monotonic() + END_SETTLE_S
    while True:
        sampler.sample()
        t = sampler.samples[-1].t if sampler.samples else 0.0
        now: dict[str, int] = {}
        for s in sampler.samples:
            if s.t == t:
                now[s.role] = now.get(s.role, 0) + 1
        if now == start_roles or time.monotonic() > deadline or not sampler.svc.alive:
            return
        time.sleep(2.0)


def stop_service(svc: Service, seen: list[tuple[int, str, int | None]]) -> list[str]:
    """SIGTERM to ``detserve serve`` (it drains and stops); then what of it is left: processes, ports."""
    from detserve.ops.stubshm import process_start

    left: list[str] = []
    if svc.alive:
        svc.process.send_signal(signal.SIGTERM)
    try:
        svc.process.wait(timeout=90)
    except subprocess.TimeoutExpired:
        left.append("detserve serve did not exit within 90 s of SIGTERM")
        svc.process.kill()
        svc.process.wait()
    time.sleep(2.0)  # children that exit with their parent
    for port in (svc.grpc_port, svc.http_port):
        with socket.socket() as s:
            if s.connect_ex((svc.host, port)) == 0:
                left.append(f"port {port} still answers after detserve serve stopped")
    for pid, role, start in seen:
        if start is not None and process_start(pid) == start:
            left.append(f"{role} (pid {pid}) still running after detserve serve stopped")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)  # the soak cleans up after itself all the same
    return left


def soak(repo: Path, run_dir: Path, images: list[bytes], users: int, schedule: Schedule, echo: Echo) -> SoakResult:
    """Start the service, hold the load, inject the faults, sample, settle, stop; return what was seen."""
    svc = start_service(repo, run_dir, images)
    echo(f"detserve serve ready (pid {svc.process.pid}); {users} users for {schedule.duration_s:.0f} s")
    t_start, cpu_start = time.monotonic(), time.process_time()  # the soak's own CPU: its clients and sampler
    t_end = t_start + schedule.duration_s
    exited: str | None = None
    sampler = Sampler(svc, schedule.sample_s)
    try:
        with ClientLoad(svc.grpc_url, images, users, retries=RETRIES, timeout_s=CLIENT_DEADLINE_S) as load:
            _sleep_watching(svc, schedule.warmup_s)
            with sampler:
                start_roles: dict[str, int] = {}
                for s in sampler.samples:
                    start_roles[s.role] = start_roles.get(s.role, 0) + 1
                windows = run_faults(svc, schedule, t_end, echo)
                _sleep_watching(svc, t_end - time.monotonic())
            if svc.alive:
                settle(sampler, start_roles)
        if not svc.alive:
            exited = f"detserve serve exited (code {svc.process.returncode}): {svc.log_tail()}"
    finally:
        seen = [(pid, role, start) for pid, (role, start) in sampler.seen.items()]
        left = stop_service(svc, seen)
    after = shm_usage(Path("/dev/shm"), sampler.prefixes)
    return SoakResult(
        schedule, t_start, users, time.monotonic() - t_start, time.process_time() - cpu_start, list(load.calls), windows, sampler.samples, sampler.shm,
        sampler.tritonservers, left, after, exited, Limits(),
    )  # fmt: skip


def run_soak(work: Path, out: Path, duration_s: float, users: int = 3, echo: Echo = lambda _: None) -> tuple[Path, list[str]]:
    """The soak; writes ``out/soak-report.md`` and ``out/soak-report.json``; returns (the markdown, the problems found).

    The problems: requests lost outside the fault windows, faults the service did not recover
    from, attacks answered instead of refused, leaks (processes, descriptors, RSS slopes,
    /dev/shm), anything left after the service stopped. None of them raises: the report says them.
    """
    from detserve.runtime.samples import sample_files

    schedule = Schedule.for_duration(duration_s)
    work, out = Path(work), Path(out)
    base = ensure_base(work, echo)
    repo = work / "soak"
    shutil.rmtree(repo, ignore_errors=True)
    shutil.copytree(base, repo)
    run_dir = work / "soak-run"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(mode=0o700, parents=True)
    photos = sample_files()
    result = soak(repo, run_dir, [photos[n] for n in sorted(photos)][:4], users, schedule, echo)
    out.mkdir(parents=True, exist_ok=True)
    return write_report(result, out)
