"""Run Locust headless against a served ensemble and turn the run into a report.

Throughput and latency come from every request's own record (written by the Locust user), the
server-side split from deltas of Triton's statistics over the same window, so the report shows
transfer + queueing + execution together, next to the naive "1000 / ms per inference".
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from detserve.errors import DetserveError
from detserve.pipeline import role_of
from loadtest import stats
from loadtest.report import LoadReport, write_report

LOCUSTFILE = Path(__file__).with_name("locust_grpc.py")
SHAPES = ("fixed", "step", "sweep")
STATS_INTERVAL_S = 1.0
CPU_LOG = "locust_cpu.json"  # the load generator's own CPU seconds over the load window (locust_grpc.py)


@dataclass(frozen=True)
class LoadTestConfig:
    grpc_url: str
    model: str
    out_dir: Path
    users: int = 8
    duration_s: float = 30.0
    shape: str = "fixed"
    step_s: float = 10.0
    sweep: tuple[int, ...] = (1, 2, 4, 8, 16)
    images: Path | None = None
    score_threshold: float | None = None
    iou_threshold: float | None = None
    max_det: int | None = None
    window_s: float = 5.0
    warmup_requests: int = 16
    title: str = ""
    retries: int = 0

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise DetserveError(f"unknown load shape {self.shape!r}", hint=f"choose one of: {', '.join(SHAPES)}")
        if self.users < 1 or self.duration_s <= 0 or self.step_s <= 0:
            raise DetserveError("users must be >= 1 and durations > 0")
        if self.images is not None and not self.images.is_dir():
            raise DetserveError(f"image folder not found: {self.images}")

    @property
    def total_s(self) -> float:
        return self.step_s * len(self.sweep) if self.shape == "sweep" else self.duration_s


@dataclass(frozen=True)
class RequestLog:
    start: np.ndarray  # epoch seconds
    latency_ms: np.ndarray
    users: np.ndarray
    ok: np.ndarray

    @classmethod
    def read(cls, path: Path) -> RequestLog:
        rows = list(csv.DictReader(path.open()))
        if not rows:
            raise DetserveError(
                f"the load test recorded no requests ({path})", hint="is the server reachable and the model ready?"
            )
        col = {k: np.array([float(r[k]) for r in rows]) for k in ("start", "latency_ms", "users", "ok")}
        return cls(col["start"], col["latency_ms"], col["users"].astype(int), col["ok"].astype(bool))


def _locust_env(cfg: LoadTestConfig, log_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    values = {
        "DETSERVE_MODEL": cfg.model,
        "DETSERVE_IMAGES": str(cfg.images or ""),
        "DETSERVE_SHAPE": cfg.shape,
        "DETSERVE_USERS": str(cfg.users),
        "DETSERVE_DURATION_S": str(cfg.duration_s),
        "DETSERVE_STEP_S": str(cfg.step_s),
        "DETSERVE_SWEEP": ",".join(str(v) for v in cfg.sweep),
        "DETSERVE_LATENCY_LOG": str(log_path),
        "DETSERVE_CPU_LOG": str(log_path.with_name(CPU_LOG)),
        "DETSERVE_RETRIES": str(cfg.retries),
        "DETSERVE_SCORE_THRESHOLD": "" if cfg.score_threshold is None else str(cfg.score_threshold),
        "DETSERVE_IOU_THRESHOLD": "" if cfg.iou_threshold is None else str(cfg.iou_threshold),
        "DETSERVE_MAX_DET": "" if cfg.max_det is None else str(cfg.max_det),
    }
    env.update(values)
    return env


def run_locust(cfg: LoadTestConfig, locustfile: Path = LOCUSTFILE, host: str | None = None) -> RequestLog:
    """Locust headless, closed loop; stops by itself at the end of the shape."""
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    log_path = cfg.out_dir / "requests.csv"
    log_path.unlink(missing_ok=True)
    log_path.with_name(CPU_LOG).unlink(missing_ok=True)
    cmd = [
        sys.executable, "-m", "locust", "-f", str(locustfile), "--headless", "--host", host or cfg.grpc_url,
        "--csv", str(cfg.out_dir / "locust"), "--html", str(cfg.out_dir / "locust.html"),
        "--only-summary", "--stop-timeout", "10", "--exit-code-on-error", "0", "--loglevel", "WARNING",
    ]  # fmt: skip
    timeout = cfg.total_s + 120
    try:
        proc = subprocess.run(cmd, env=_locust_env(cfg, log_path), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise DetserveError(f"locust did not stop within {timeout:.0f} s") from e
    (cfg.out_dir / "locust.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0 or not log_path.is_file():
        tail = "\n".join((proc.stderr or proc.stdout).splitlines()[-15:])
        raise DetserveError(f"locust failed (exit {proc.returncode}):\n{tail}", hint=f"full log: {cfg.out_dir / 'locust.log'}")
    return RequestLog.read(log_path)


def read_locust_cpu(out_dir: Path) -> dict[str, float] | None:
    """``{"start", "stop"}`` (epoch seconds of the load window) and ``cpu_s`` Locust used in it; None if not written."""
    import json

    path = Path(out_dir) / CPU_LOG
    if not path.is_file():
        return None
    raw = json.loads(path.read_text())
    return {k: float(raw[k]) for k in ("start", "stop", "cpu_s")}


def windows_of(log: RequestLog, window_s: float, skip_s: float = 0.0) -> list[stats.Window]:
    """Consecutive windows over the run (by completion time), after ``skip_s`` of ramp-up."""
    done = log.start + log.latency_ms / 1000.0
    origin = float(log.start.min())
    t0 = origin + skip_s
    end = float(done.max())
    out = []
    while t0 + window_s <= end + 1e-9:
        inside = (done >= t0) & (done < t0 + window_s)
        out.append(
            stats.Window.from_latencies(
                log.latency_ms[inside & log.ok].tolist(), window_s, start_s=t0 - origin, failures=int((inside & ~log.ok).sum())
            )
        )
        t0 += window_s
    return out


def sweep_steps(log: RequestLog, cfg: LoadTestConfig) -> list[dict[str, float]]:
    """Per concurrency level: throughput and percentiles, the first second of each level skipped."""
    steps = []
    t_start = float(log.start.min())
    for i, users in enumerate(cfg.sweep):
        lo, hi = t_start + i * cfg.step_s + 1.0, t_start + (i + 1) * cfg.step_s
        sel = (log.start >= lo) & (log.start < hi) & log.ok
        if not sel.any():
            continue
        pct = stats.percentiles(log.latency_ms[sel])
        steps.append({"users": float(users), "throughput_rps": float(sel.sum()) / (hi - lo), **pct})
    return steps


@dataclass
class LoadTestResult:
    report: LoadReport
    files: dict[str, Path] = field(default_factory=dict)


def _warm_up(cfg: LoadTestConfig) -> None:
    """A few requests first, so model loading/first-call costs stay out of the measurement."""
    from clients.grpc_client import DetectorClient

    blobs = _pool(cfg.images)
    with DetectorClient(cfg.grpc_url, cfg.model) as client:
        client.check_ready()
        results = client.detect_many((blobs * cfg.warmup_requests)[: cfg.warmup_requests], max_in_flight=min(cfg.users, 16))
    errors = [r for r in results if isinstance(r, DetserveError)]
    if errors:
        raise DetserveError(f"warm-up requests failed: {errors[0]}")


def _pool(images: Path | None) -> list[bytes]:
    if images is None:
        from detserve.runtime.samples import sample_files

        return list(sample_files().values())
    return [p.read_bytes() for p in sorted(images.iterdir()) if p.is_file()]


def run_loadtest(cfg: LoadTestConfig, notes: Sequence[str] = ()) -> LoadTestResult:
    _warm_up(cfg)
    # snapshots every second, not only at both ends: a model reloaded mid-run (a killed stub
    # brought back) restarts its counters, and the split must keep what it served before
    poller = stats.SnapshotPoller(cfg.grpc_url, STATS_INTERVAL_S)
    poller.start()
    try:
        log = run_locust(cfg)
    finally:
        snapshots = poller.stop()
    split = stats.accumulate(snapshots)
    report = build_report(cfg, log, split, [*notes, *stats.reset_notes(_own(split, cfg.model))])
    return LoadTestResult(report, write_report(report, cfg.out_dir))


def build_report(
    cfg: LoadTestConfig, log: RequestLog, split: dict[str, stats.PhaseSplit], notes: list[str], triton: bool = True
) -> LoadReport:
    """``triton=False`` for a service that is not a Triton server (the Flask baseline)."""
    done = log.start + log.latency_ms / 1000.0
    elapsed = max(float(done.max() - log.start.min()), 1e-9)
    ok = log.ok
    ramp = cfg.step_s if cfg.shape == "step" else 1.0
    windows = windows_of(log, cfg.window_s, skip_s=0.0 if cfg.shape == "sweep" else ramp)
    ensemble = split.get(cfg.model)
    compute_ms = sum(ensemble_phase_ms(split, cfg.model).values()) if ensemble else 0.0
    return LoadReport(
        title=cfg.title or f"{cfg.model}: {cfg.shape} load, {cfg.users} users",
        model=cfg.model,
        users=cfg.users,
        duration_s=elapsed,
        requests=len(ok),
        failures=int((~ok).sum()),
        throughput_rps=float(ok.sum()) / elapsed,
        latency_ms=stats.percentiles(log.latency_ms[ok]) if ok.any() else {},
        windows=windows,
        stable=stats.is_stable(windows),
        server_split=_own(split, cfg.model),
        naive_throughput_rps=stats.naive_throughput(compute_ms) if compute_ms > 0 else 0.0,
        fingerprint=stats.fingerprint(cfg.grpc_url if triton else None),
        steps=sweep_steps(log, cfg) if cfg.shape == "sweep" else [],
        notes=notes,
    )


def _own(split: dict[str, stats.PhaseSplit], model: str) -> dict[str, stats.PhaseSplit]:
    """The ensemble's own rows and its composing models'."""
    return {name: s for name, s in split.items() if name == model or name.startswith(model + "_")}


def ensemble_phase_ms(split: dict[str, stats.PhaseSplit], model: str) -> dict[str, float]:
    """Per-request compute time of each composing model (what one inference costs, no queueing)."""
    out = {}
    for name, s in split.items():
        role = role_of(name, model)
        if role is not None and s.requests:
            out[role] = s.compute_input_ms + s.compute_infer_ms + s.compute_output_ms
    return out
