"""Locust user for a detserve ensemble over gRPC (run by ``detserve loadtest``; usable alone).

    locust -f loadtest/locust_grpc.py --headless --host 127.0.0.1:8001 -u 16 -r 16 -t 30s

Environment (set by the runner):
    DETSERVE_MODEL            ensemble name (default "demo")
    DETSERVE_IMAGES           folder of images to draw from (default: the sample photographs)
    DETSERVE_SCORE_THRESHOLD, DETSERVE_IOU_THRESHOLD, DETSERVE_MAX_DET   per-request controls
    DETSERVE_SHAPE            fixed | step | sweep (see ``DetserveShape``)
    DETSERVE_USERS, DETSERVE_DURATION_S, DETSERVE_STEP_S, DETSERVE_STEP_USERS, DETSERVE_SWEEP   shape parameters
    DETSERVE_LATENCY_LOG      CSV file to write every request's (start, latency_ms, users, ok)
    DETSERVE_RETRIES          retries of a transient failure (a replica gone), with backoff; default 0
    DETSERVE_CPU_LOG          JSON file for this process's own CPU seconds between test start and stop
"""

from __future__ import annotations

# gevent-compatible gRPC must be initialised before any channel exists.
import grpc.experimental.gevent as grpc_gevent

grpc_gevent.init_gevent()

import os  # noqa: E402
import random  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
from locust import LoadTestShape, User, events, task  # noqa: E402

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
_LOG: list[tuple[float, float, int, int]] = []  # (start, latency_ms, users, ok)


def image_pool() -> list[bytes]:
    folder = os.environ.get("DETSERVE_IMAGES")
    if folder:
        files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise RuntimeError(f"no images in {folder}")
        return [p.read_bytes() for p in files]
    from detserve.runtime.samples import sample_files

    return list(sample_files().values())


def request_parameters() -> dict[str, Any]:
    from clients.grpc_client import request_parameters as build

    def opt(name: str, cast: type) -> Any:
        value = os.environ.get(name)
        return cast(value) if value not in (None, "") else None

    return build(opt("DETSERVE_SCORE_THRESHOLD", float), opt("DETSERVE_IOU_THRESHOLD", float), opt("DETSERVE_MAX_DET", int))


class TritonDetectUser(User):
    """Closed loop: each user sends its next request when the previous one returns."""

    host = "127.0.0.1:8001"

    def on_start(self) -> None:
        import tritonclient.grpc as grpcclient

        self.model = os.environ.get("DETSERVE_MODEL", "demo")
        self.pool = image_pool()
        self.params = request_parameters() or None
        self.client = grpcclient.InferenceServerClient(self.host)  # one client per user
        self.rng = random.Random(id(self))
        self.retries = int(os.environ.get("DETSERVE_RETRIES", "0"))

    def on_stop(self) -> None:
        # an open channel keeps the Locust process from exiting
        self.client.close()

    @task
    def detect(self) -> None:
        import tritonclient.grpc as grpcclient

        blob = self.rng.choice(self.pool)
        inp = grpcclient.InferInput("IMAGE", [1, 1], "BYTES")
        inp.set_data_from_numpy(np.array([[blob]], dtype=np.object_))
        start = time.time()
        t0 = time.perf_counter()
        exception: Exception | None = None
        length = 0
        try:
            from clients.grpc_client import with_retries

            result = with_retries(
                lambda: self.client.infer(self.model, [inp], parameters=self.params, client_timeout=60.0), self.retries, 0.1, 60.0
            )
            length = _response_bytes(result)
        except Exception as e:  # reported to Locust as a failure
            exception = e
        ms = (time.perf_counter() - t0) * 1000.0
        users = self.environment.runner.user_count if self.environment.runner else 0
        _LOG.append((start, ms, users, int(exception is None)))
        self.environment.events.request.fire(
            request_type="grpc", name=self.model, response_time=ms, response_length=length, exception=exception, context={}
        )


def _response_bytes(result: Any) -> int:
    response = result.get_response()
    return int(sum(len(c) for c in response.raw_output_contents))


class DetserveShape(LoadTestShape):
    """fixed: N users for the duration; step: +N users every step; sweep: listed levels, one step each."""

    def __init__(self) -> None:
        super().__init__()
        self.kind = os.environ.get("DETSERVE_SHAPE", "fixed")
        self.users = int(os.environ.get("DETSERVE_USERS", "8"))
        self.duration = float(os.environ.get("DETSERVE_DURATION_S", "30"))
        self.step_s = float(os.environ.get("DETSERVE_STEP_S", "10"))
        self.step_users = int(os.environ.get("DETSERVE_STEP_USERS", str(max(1, self.users // 4))))
        levels = os.environ.get("DETSERVE_SWEEP", "1,2,4,8,16")
        self.levels = [int(v) for v in levels.split(",") if v.strip()]

    def tick(self) -> tuple[int, float] | None:
        t = self.get_run_time()
        if self.kind == "sweep":
            i = int(t // self.step_s)
            return (self.levels[i], float(self.levels[i])) if i < len(self.levels) else None
        if t >= self.duration:
            return None
        if self.kind == "step":
            n = min(self.users, (int(t // self.step_s) + 1) * self.step_users)
            return (n, float(n))
        return (self.users, float(self.users))


_CPU: dict[str, float] = {}


def _cpu_now() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)  # every thread of this (single-process) Locust
    return usage.ru_utime + usage.ru_stime


@events.test_start.add_listener
def _cpu_start(environment: Any, **_: Any) -> None:
    _CPU.update(start=time.time(), start_cpu_s=_cpu_now())


def _write_cpu() -> None:
    """The load generator's own cost over the load window (loadtest/procstats.py uses it)."""
    path = os.environ.get("DETSERVE_CPU_LOG")
    if not path or "start" not in _CPU:
        return
    import json

    stop, cpu = time.time(), _cpu_now()
    Path(path).write_text(json.dumps({"start": _CPU["start"], "stop": stop, "cpu_s": cpu - _CPU["start_cpu_s"]}))


@events.test_stop.add_listener
def _write_log(environment: Any, **_: Any) -> None:
    _write_cpu()
    path = os.environ.get("DETSERVE_LATENCY_LOG")
    if not path:
        return
    with open(path, "w") as f:
        f.write("start,latency_ms,users,ok\n")
        for start, ms, users, ok in _LOG:
            f.write(f"{start:.6f},{ms:.3f},{users},{ok}\n")
