"""Numbers a load test reports: Triton's own per-model statistics, latency percentiles, stability, environment.

Client-side latency says what a user waits; Triton's statistics say *where* the time goes (queue vs
compute, per composing model of the ensemble) and how well the dynamic batcher groups requests.
Both are cumulative counters on the server, so a measurement is the difference of snapshots; a
model reloaded mid-run (a killed stub brought back) restarts its counters, so a run is polled
every second and the increases are summed (``accumulate``) rather than failing the report.

Checked against Triton 2.51 (the embedded server):
- JSON int64 values arrive as strings; a model that has served nothing has no ``inference_count``,
  ``execution_count`` or ``last_inference`` keys and empty ``{}`` phases.
- queue/compute counts are per *request*; ``execution_count`` is per batch, so
  ``inference_count / execution_count`` is the average batch size the batcher achieved.
- ``fail.count`` of an ensemble counts each failed request twice, and a python-backend model whose
  response carries an error counts it as a success: trust the client's failure count.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import itertools
import os
import platform
import re
import shutil
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from detserve.errors import ClientError, DetserveError

PHASES = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")
PERCENTILES = (50, 90, 95, 99)
PACKAGES = ("torch", "torchvision", "onnxruntime", "onnxruntime-gpu", "tensorrt", "tritonclient", "nvidia-pytriton", "numpy")
NVIDIA_SMI_QUERY = "name,driver_version,clocks.sm,power.draw"
SUBPROCESS_TIMEOUT_S = 10


class StatsError(DetserveError):
    """Server statistics cannot be read or do not form a valid measurement window."""


@dataclass(frozen=True)
class Phase:
    """One cumulative counter pair: how many requests, and their summed duration."""

    count: int = 0
    ns: int = 0


@dataclass(frozen=True)
class ModelStats:
    """One model version's cumulative statistics at one instant."""

    name: str
    version: str
    inference_count: int
    execution_count: int
    success: Phase
    fail: Phase
    queue: Phase
    compute_input: Phase
    compute_infer: Phase
    compute_output: Phase

    @classmethod
    def from_json(cls, entry: Mapping[str, Any]) -> ModelStats:
        """Parse one ``model_stats`` entry; absent keys are zero (a model that served nothing has none)."""
        phases = entry.get("inference_stats") or {}
        return cls(
            name=str(entry["name"]),
            version=str(entry.get("version", "")),
            inference_count=int(entry.get("inference_count", 0)),
            execution_count=int(entry.get("execution_count", 0)),
            **{p: _phase(phases.get(p)) for p in PHASES},
        )


def _phase(raw: Mapping[str, Any] | None) -> Phase:
    raw = raw or {}
    return Phase(count=int(raw.get("count", 0)), ns=int(raw.get("ns", 0)))


def parse_statistics(stats: Mapping[str, Any]) -> dict[str, ModelStats]:
    """Key by model name; a name loaded in several versions is keyed ``name@version`` so nothing is merged."""
    try:
        models = [ModelStats.from_json(e) for e in stats.get("model_stats", [])]
    except (KeyError, TypeError, ValueError) as e:
        raise StatsError(f"unexpected inference statistics from Triton: {e!r}") from e
    names = [m.name for m in models]
    return {(m.name if names.count(m.name) == 1 else f"{m.name}@{m.version}"): m for m in models}


def snapshot(client: Any) -> dict[str, ModelStats]:
    """All loaded models' statistics now, from a ``tritonclient.grpc.InferenceServerClient``."""
    try:
        raw = client.get_inference_statistics(as_json=True)
    except Exception as e:
        raise ClientError(f"cannot read inference statistics: {e}", hint="is the Triton server still running?") from e
    return parse_statistics(raw)


class SnapshotPoller:
    """Statistics snapshots every ``interval_s`` while a run goes on, for ``accumulate``.

    A model reloaded mid-run (a killed stub brought back) restarts its counters: with only a
    snapshot at each end of the run, everything it served before the reload would be lost. The
    first and last snapshots are taken in ``start``/``stop`` and must succeed; one in between that
    fails (the server busy restarting something) is skipped.
    """

    def __init__(self, grpc_url: str, interval_s: float = 1.0) -> None:
        import threading

        self.grpc_url, self.interval_s = grpc_url, interval_s
        self.snapshots: list[dict[str, ModelStats]] = []
        self.skipped = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="detserve-stats-poller", daemon=True)
        self._client: Any = None

    def start(self) -> None:
        import tritonclient.grpc as grpcclient

        self._client = grpcclient.InferenceServerClient(self.grpc_url)
        self.snapshots.append(snapshot(self._client))
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.snapshots.append(snapshot(self._client))
            except DetserveError:
                self.skipped += 1

    def stop(self) -> list[dict[str, ModelStats]]:
        """The last snapshot, then all of them in time order."""
        self._stop.set()
        self._thread.join()
        try:
            self.snapshots.append(snapshot(self._client))
        finally:
            with contextlib.suppress(Exception):
                self._client.close()
        return self.snapshots


@dataclass(frozen=True)
class PhaseSplit:
    """Where a model's time went over one measurement window; ``*_ms`` are averages per request.

    ``reset`` is true when the model's counters restarted inside the window (it was reloaded: a
    dead stub brought back, a rollout, a server restart); its numbers then sum the increments seen
    between snapshots, and what it served between the last snapshot and the reload is missing.
    """

    model: str
    requests: int
    failures: int
    inferences: int
    executions: int
    avg_batch_size: float
    request_ms: float
    queue_ms: float
    compute_input_ms: float
    compute_infer_ms: float
    compute_output_ms: float
    reset: bool = False

    @property
    def compute_ms(self) -> float:
        """Input + infer + output: the time an instance was busy per request."""
        return self.compute_input_ms + self.compute_infer_ms + self.compute_output_ms


def _avg_ms(phase: Phase) -> float:
    return phase.ns / phase.count / 1e6 if phase.count else 0.0


def _counters(s: ModelStats) -> list[int]:
    """Every cumulative counter of a snapshot, in a fixed order (``_from_counters`` reads it back)."""
    return [s.inference_count, s.execution_count, *(v for p in PHASES for v in (getattr(s, p).count, getattr(s, p).ns))]


def _from_counters(name: str, version: str, values: Sequence[int]) -> ModelStats:
    phases = {p: Phase(values[2 + 2 * i], values[3 + 2 * i]) for i, p in enumerate(PHASES)}
    return ModelStats(name, version, values[0], values[1], **phases)


def increase(before: ModelStats | None, after: ModelStats) -> tuple[ModelStats, bool]:
    """What a model served between two snapshots, and whether its counters restarted in between.

    Counters only grow while a model stays loaded; any one of them lower than before means the
    model was reloaded (its counters start again from zero), so ``after`` itself is the increase.
    A model absent from ``before`` (loaded in between) also counts from zero, without a reset.
    """
    if before is None:
        return after, False
    b, a = _counters(before), _counters(after)
    if any(x < y for x, y in zip(a, b, strict=True)):
        return after, True
    return _from_counters(after.name, after.version, [x - y for x, y in zip(a, b, strict=True)]), False


def _split(name: str, served: ModelStats, reset: bool) -> PhaseSplit:
    executions = served.execution_count
    return PhaseSplit(
        model=name,
        requests=served.success.count,
        failures=served.fail.count,
        inferences=served.inference_count,
        executions=executions,
        avg_batch_size=served.inference_count / executions if executions else 0.0,
        request_ms=_avg_ms(served.success),
        queue_ms=_avg_ms(served.queue),
        compute_input_ms=_avg_ms(served.compute_input),
        compute_infer_ms=_avg_ms(served.compute_infer),
        compute_output_ms=_avg_ms(served.compute_output),
        reset=reset,
    )


def accumulate(snapshots: Sequence[Mapping[str, ModelStats]]) -> dict[str, PhaseSplit]:
    """Per-model split over a window from its snapshots in time order (two or more).

    Each step between consecutive snapshots adds its increase (see ``increase``), so a model
    reloaded mid-window keeps what was seen before the reload and what it served after; only
    the requests between the last snapshot before the reload and the reload itself are lost.
    Snapshots taken often (``SnapshotPoller``) keep that gap small. Models in the last snapshot only.
    """
    if len(snapshots) < 2:
        raise StatsError(f"a measurement window needs at least 2 statistics snapshots, got {len(snapshots)}")
    totals: dict[str, list[int]] = {}
    resets: set[str] = set()
    seen = set(snapshots[0])
    for before, after in itertools.pairwise(snapshots):
        for name, a in after.items():
            served, reset = increase(before.get(name), a)
            if reset or (name in seen and name not in before):  # gone from a snapshot: unloaded, then loaded again
                resets.add(name)
            totals[name] = [x + y for x, y in zip(totals.get(name, [0] * len(_counters(a))), _counters(served), strict=True)]
        seen |= set(after)
    last = snapshots[-1]
    return {name: _split(name, _from_counters(name, last[name].version, totals[name]), name in resets) for name in last}


def delta(before: Mapping[str, ModelStats], after: Mapping[str, ModelStats]) -> dict[str, PhaseSplit]:
    """Per-model split between two snapshots; a model loaded mid-window starts from zero, one
    reloaded mid-window (counters went backwards) counts from zero and is marked ``reset``."""
    return accumulate([before, after])


def reset_notes(split: Mapping[str, PhaseSplit]) -> list[str]:
    """A report's note for each model whose counters restarted during the run."""
    return [
        f"Triton's counters of `{name}` restarted during the run (the model was reloaded: a stub died and was "
        "brought back, a rollout, or a server restart); its server-side row sums the statistics snapshots "
        "taken during the run and misses what it served between the last snapshot and the reload."
        for name, s in sorted(split.items())
        if s.reset
    ]


def naive_throughput(ms_per_inference: float, batch: int = 1) -> float:
    """The back-of-envelope ``1000 / ms * batch`` that reports set beside measured throughput.

    It assumes one request at a time with no queueing and no overlap between pipeline stages, so
    the gap to the measured number shows what batching, concurrency and contention did.
    """
    if ms_per_inference <= 0:
        raise StatsError(f"ms per inference must be > 0, got {ms_per_inference}")
    if batch < 1:
        raise StatsError(f"batch must be >= 1, got {batch}")
    return 1000.0 / ms_per_inference * batch


@dataclass(frozen=True)
class Window:
    """One fixed-length slice of a run; stability is judged on consecutive windows, as perf_analyzer does."""

    throughput: float  # completed requests per second
    p95_ms: float | None
    p50_ms: float | None = None
    p90_ms: float | None = None
    p99_ms: float | None = None
    requests: int = 0
    failures: int = 0
    start_s: float = 0.0
    duration_s: float = 0.0

    @classmethod
    def from_latencies(cls, latencies_ms: Sequence[float], duration_s: float, start_s: float = 0.0, failures: int = 0) -> Window:
        """A window from the successful requests that completed in it; no requests leaves the percentiles None."""
        if duration_s <= 0:
            raise StatsError(f"window duration must be > 0, got {duration_s}")
        pct: dict[str, float | None] = dict(percentiles(latencies_ms)) if len(latencies_ms) else dict.fromkeys(_keys())
        return cls(
            throughput=len(latencies_ms) / duration_s,
            p95_ms=pct["p95"],
            p50_ms=pct["p50"],
            p90_ms=pct["p90"],
            p99_ms=pct["p99"],
            requests=len(latencies_ms),
            failures=failures,
            start_s=start_s,
            duration_s=duration_s,
        )

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Window:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})


def _keys() -> list[str]:
    return [f"p{q}" for q in PERCENTILES]


def percentiles(latencies_ms: Iterable[float]) -> dict[str, float]:
    """p50/p90/p95/p99 with numpy's "linear" method (the default most tools use, so numbers compare)."""
    values = np.asarray(list(latencies_ms), dtype=np.float64)
    if values.size == 0:
        raise StatsError("no latencies to summarise: no request completed")
    qs = np.percentile(values, PERCENTILES, method="linear")
    return {k: float(v) for k, v in zip(_keys(), qs, strict=True)}


def _spread(values: Sequence[float]) -> float:
    """Largest relative distance from the mean (0 when all are 0)."""
    mean = float(np.mean(values))
    if mean == 0:
        return 0.0 if all(v == 0 for v in values) else float("inf")
    return max(abs(v - mean) for v in values) / abs(mean)


def stability(windows: Sequence[Window], n: int = 3, tolerance: float = 0.10) -> tuple[bool, str]:
    """The verdict and the sentence a report prints; see :func:`is_stable`."""
    if n < 1:
        raise StatsError(f"n must be >= 1, got {n}")
    if len(windows) < n:
        return False, f"NOT stable: only {len(windows)} window(s), need {n}"
    last = windows[-n:]
    p95s = [w.p95_ms for w in last]
    if any(p is None for p in p95s):
        return False, f"NOT stable: a window among the last {n} completed no request"
    tput, lat = _spread([w.throughput for w in last]), _spread([float(p) for p in p95s if p is not None])
    if tput <= tolerance and lat <= tolerance:
        return True, f"stable: {n} windows within {tolerance:.0%}"
    return False, (
        f"NOT stable: over the last {n} windows throughput deviates up to {tput:.1%} and p95 up to {lat:.1%}"
        f" from their mean (limit {tolerance:.0%})"
    )


def is_stable(windows: Sequence[Window], n: int = 3, tolerance: float = 0.10) -> bool:
    """perf_analyzer's rule: the last ``n`` windows each have throughput and p95 within ±tolerance of their mean."""
    return stability(windows, n, tolerance)[0]


def fingerprint(grpc_url: str | None = None) -> dict[str, Any]:
    """What a number was measured on, so two reports are only compared when their machines match."""
    info: dict[str, Any] = {
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_governor": _read_text(Path("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor")) or "unknown",
        "memory_total_gib": _memory_total_gib(),
        "os": _os_name(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "gpu": _gpus(),
        "packages": _package_versions(),
    }
    if grpc_url is not None:
        info["triton_server"] = _server_version(grpc_url)
    return info


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _cpu_model() -> str:
    text = _read_text(Path("/proc/cpuinfo")) or ""
    match = re.search(r"^(?:model name|Model|cpu model)\s*:\s*(.+)$", text, re.MULTILINE)
    return match.group(1).strip() if match else platform.processor() or "unknown"


def _memory_total_gib() -> float | None:
    match = re.search(r"^MemTotal:\s*(\d+)\s*kB", _read_text(Path("/proc/meminfo")) or "", re.MULTILINE)
    return round(int(match.group(1)) / 2**20, 1) if match else None


def _os_name() -> str:
    match = re.search(r'^PRETTY_NAME="?([^"\n]+)"?', _read_text(Path("/etc/os-release")) or "", re.MULTILINE)
    return match.group(1) if match else platform.platform()


def _run(cmd: list[str]) -> str | None:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def _gpus() -> list[dict[str, str]] | str:
    """One entry per GPU from nvidia-smi, or "none" where there is no nvidia-smi (or it fails: no driver)."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return "none"
    out = _run([smi, f"--query-gpu={NVIDIA_SMI_QUERY}", "--format=csv,noheader"])
    if not out or not out.strip():
        return "none"
    cuda = re.search(r"CUDA Version:\s*([\d.]+)", _run([smi]) or "")
    keys = NVIDIA_SMI_QUERY.split(",")
    gpus = []
    for line in out.strip().splitlines():
        gpu = dict(zip(keys, (v.strip() for v in line.split(",")), strict=False))
        gpu["cuda"] = cuda.group(1) if cuda else "unknown"
        gpus.append(gpu)
    return gpus


def _package_versions() -> dict[str, str | None]:
    """Versions from package metadata: importing torch or tensorrt here would cost seconds and memory."""
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _server_version(grpc_url: str) -> str:
    import tritonclient.grpc as grpcclient

    try:
        client = grpcclient.InferenceServerClient(grpc_url)
    except Exception as e:
        raise ClientError(f"cannot connect to {grpc_url}: {e}") from e
    try:
        meta = client.get_server_metadata(as_json=True)
    except Exception as e:
        raise ClientError(f"no Triton server answers at {grpc_url}: {e}", hint="start one with `detserve serve`") from e
    finally:
        with contextlib.suppress(Exception):
            client.close()
    return f"{meta.get('name', 'triton')} {meta.get('version', 'unknown')}"
