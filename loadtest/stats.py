"""Numbers a load test reports: latency percentiles, stability, the machine's fingerprint, and
Triton's own per-model statistics (parsed in ``detserve.ops.tritonstats``, re-exported here).

Client-side latency says what a user waits; Triton's statistics say *where* the time goes.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
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

from detserve.errors import ClientError
from detserve.ops.tritonstats import (  # noqa: F401 - the load test's view of the server statistics
    PHASES,
    ModelStats,
    Phase,
    PhaseSplit,
    SnapshotPoller,
    StatsError,
    accumulate,
    delta,
    increase,
    parse_statistics,
    reset_notes,
    snapshot,
)

PERCENTILES = (50, 90, 95, 99)
PACKAGES = ("torch", "torchvision", "onnxruntime", "onnxruntime-gpu", "tensorrt", "tritonclient", "nvidia-pytriton", "numpy")
NVIDIA_SMI_QUERY = "name,driver_version,clocks.sm,power.draw"
SUBPROCESS_TIMEOUT_S = 10


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


def busy_share(split: PhaseSplit, window_s: float, instances: int) -> float:
    """How much of ``window_s`` a model's instances spent executing (0..1 per instance, averaged).

    Triton charges every request of a batch the batch's whole compute time, so the time the
    instances were busy is the per-request compute time times the executions, not the requests."""
    if window_s <= 0 or instances < 1 or not split.requests:
        return 0.0
    return split.compute_ms / 1000.0 * split.executions / (window_s * instances)
