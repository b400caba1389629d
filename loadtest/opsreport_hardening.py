"""The ops report's rows for the attacks on the admin API and the gate (docs/hardening.md), each with
traffic flowing (loadtest/opsreport.py).

- the admin key searched for in every process's command line and environment;
- every admin API called without the key and with a guessed one (gRPC and HTTP), including a
  model load that carries code, and a shared-memory registration of a python stub's own region
  (it made tritonserver abort before);
- requests over the size limit;
- a model that cannot serve (core file corrupted, its stub killed): readiness false, then true.
"""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from detserve.pipeline import CORE, model_name
from loadtest.opsreport_base import (
    KEY,
    MODEL,
    Call,
    ClientLoad,
    Row,
    Setup,
    Tally,
    copy_repository,
    scenario_server,
    stub_pids,
)

SIZE_LIMIT = 8 * 1024 * 1024


def key_exposure(s: Setup) -> Row:
    """Every process's cmdline and environ searched for the key (what ps and /proc show)."""
    with (
        scenario_server(copy_repository(s.base, s.work / "key"), key=True) as server,
        ClientLoad(server.options.grpc_url, s.images, s.users) as load,
    ):
        t0 = time.monotonic()
        load.wait_for(s.users)
        searched, found = 0, []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue  # this process holds the key: it started the server
            for what in ("cmdline", "environ"):
                try:
                    text = (entry / what).read_bytes()
                except OSError:
                    continue
                searched += 1
                if KEY.encode() in text:
                    found.append(f"/proc/{entry.name}/{what}")
        in_log = KEY in server.log_path.read_text(errors="replace")
        held = time.monotonic() - t0
    fault = f"the admin key searched for in {searched} /proc/*/cmdline and environ files and in Triton's log"
    notes = f"found in: {', '.join(found) or 'none'}; in Triton's log: {'yes' if in_log else 'no'}"
    calls = load.calls + [Call(t0, t0, f"key readable at {p}") for p in found]
    return Row("admin key exposure", s.users, held, fault, Tally.of(calls), notes)


def _admin_calls(client: Any, stub_region: str, marker: Path) -> dict[str, Callable[[dict[str, str] | None], Any]]:
    model_py = (
        "import pathlib\nclass TritonPythonModel:\n    def initialize(self, args):\n"
        f"        pathlib.Path({str(marker)!r}).write_text('ran')\n    def execute(self, requests):\n        return []\n"
    )
    config = json.dumps({"name": "evil", "backend": "python", "max_batch_size": 0})
    return {
        "load with a code override": lambda h: client.load_model(
            "evil", config=config, files={"file:1/model.py": model_py.encode()}, headers=h
        ),
        "unload": lambda h: client.unload_model(MODEL, headers=h),
        "repository index": lambda h: client.get_model_repository_index(headers=h),
        "model config": lambda h: client.get_model_config(MODEL, headers=h),
        "register the stub's shm region": lambda h: client.register_system_shared_memory("x", stub_region, 64, headers=h),
        "log verbosity 5": lambda h: client.update_log_settings({"log_verbose_level": 5}, headers=h),
        "trace settings": lambda h: client.update_trace_settings(settings={"trace_level": ["TIMESTAMPS"]}, headers=h),
    }


def _http_admin(base: str) -> list[Call]:
    calls = []
    for method, path in (("POST", "/v2/repository/index"), ("POST", "/v2/logging"), ("GET", f"/v2/models/{MODEL}/config")):
        t0 = time.monotonic()
        try:
            urllib.request.urlopen(urllib.request.Request(base + path, data=b"{}" if method == "POST" else None, method=method))
            calls.append(Call(t0, time.monotonic(), f"HTTP {path} answered without the key"))
        except urllib.error.HTTPError as e:
            error = f"HTTP {e.code} {path}"
            calls.append(Call(t0, time.monotonic(), error, expected_error=e.code == 403))
    return calls


def admin_without_key(s: Setup) -> Row:
    """Every admin API without the key and with a guessed one: all refused, nothing runs, nothing aborts."""
    import tritonclient.grpc as grpcclient

    marker = Path("/tmp") / f"detserve-ops-{uuid.uuid4().hex}"
    calls: list[Call] = []
    with (
        scenario_server(copy_repository(s.base, s.work / "admin"), key=True) as server,
        ClientLoad(server.options.grpc_url, s.images, s.users) as load,
    ):
        t0 = time.monotonic()
        region = _stub_region(server)
        client = grpcclient.InferenceServerClient(server.options.grpc_url)
        try:
            for name, call in _admin_calls(client, region, marker).items():
                for headers in (None, {"triton-grpc-protocol-admin-key": "guessed-0123456789abcdef"}):
                    c0 = time.monotonic()
                    try:
                        call(headers)
                        calls.append(Call(c0, time.monotonic(), f"{name}: accepted without the key"))
                    except Exception as e:
                        denied = "PERMISSION_DENIED" in str(getattr(e, "status", lambda: "")())
                        calls.append(Call(c0, time.monotonic(), f"{name}: {e}", expected_error=denied))
        finally:
            client.close()
        calls += _http_admin(f"http://{server.options.host}:{server.options.http_port}")
        load.wait_for(load.completed() + 2 * s.users)
        alive = server.process is not None and server.process.poll() is None
        held = time.monotonic() - t0
    if marker.exists():
        calls.append(Call(t0, t0, "the model code sent without the key ran"))
    fault = (
        f"{len(calls)} admin calls without the key or with a guessed one (gRPC: 7 APIs x 2, HTTP: 3), stub region {region or '?'}"
    )
    notes = f"code ran: {'yes' if marker.exists() else 'no'}; tritonserver alive after: {'yes' if alive else 'NO'}"
    return Row("admin APIs without the key", s.users + 1, held, fault, Tally.of(load.calls + calls), notes)


def _stub_region(server: Any) -> str:
    """A live python stub's shared-memory region name (argv[2], visible to every user in ps)."""
    for pid in stub_pids(server, model_name(MODEL, CORE)):
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            return "/" + args[2].decode().lstrip("/")
        except (OSError, IndexError):
            continue
    return "/triton_python_backend_shm_region_unknown"


def oversized_requests(s: Setup) -> Row:
    """Requests over the gate's limit: refused as they arrive, the server serves on."""
    import numpy as np
    import tritonclient.grpc as grpcclient

    calls: list[Call] = []
    repo = copy_repository(s.base, s.work / "oversized")
    with (
        scenario_server(repo, max_request_bytes=SIZE_LIMIT) as server,
        ClientLoad(server.options.grpc_url, s.images, s.users) as load,
    ):
        t0 = time.monotonic()
        client = grpcclient.InferenceServerClient(server.options.grpc_url)
        try:
            for _ in range(3):
                blob = s.images[0] + b"\0" * (3 * SIZE_LIMIT)
                inp = grpcclient.InferInput("IMAGE", [1, 1], "BYTES")
                inp.set_data_from_numpy(np.array([[blob]], dtype=np.object_))
                c0 = time.monotonic()
                try:
                    client.infer(MODEL, [inp], client_timeout=60)
                    calls.append(Call(c0, time.monotonic(), "an oversized request was served"))
                except Exception as e:
                    exhausted = "RESOURCE_EXHAUSTED" in str(getattr(e, "status", lambda: "")())
                    calls.append(Call(c0, time.monotonic(), str(e), expected_error=exhausted))
        finally:
            client.close()
        load.wait_for(load.completed() + 2 * s.users)
        held = time.monotonic() - t0
    worst = max(c.end - c.start for c in calls)
    fault = f"3 requests of {3 * SIZE_LIMIT // 2**20} MiB against a {SIZE_LIMIT // 2**20} MiB limit"
    return Row("oversized requests", s.users + 1, held, fault, Tally.of(load.calls + calls), f"refused in <= {worst:.2f} s each")


def _ready(url: str) -> tuple[bool, str]:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    try:
        return bool(client.is_server_ready()), ""
    except Exception as e:
        return False, str(e.message() if hasattr(e, "message") else e)
    finally:
        client.close()


def _until(cond: Callable[[], bool], timeout_s: float) -> float:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout_s:
            return float("nan")
        time.sleep(0.25)
    return time.monotonic() - t0


def unservable_model(s: Setup) -> Row:
    """The core's file corrupted and its stub killed: readiness false (naming it) until the file is back."""
    repo = copy_repository(s.base, s.work / "unservable")
    onnx = repo / model_name(MODEL, CORE) / "1" / "model.onnx"
    good = onnx.read_bytes()
    with scenario_server(repo) as server:
        url = server.options.grpc_url
        with ClientLoad(url, s.images, s.users) as load:
            t0 = time.monotonic()
            load.wait_for(s.users)
            onnx.write_bytes(b"not an onnx file")
            t_fault = time.monotonic()
            for pid in stub_pids(server, model_name(MODEL, CORE)):
                os.kill(pid, signal.SIGKILL)
            to_false = _until(lambda: "reload failed" in _ready(url)[1], 120)
            why = _ready(url)[1]
            onnx.write_bytes(good)
            t_restore = time.monotonic()
            to_true = _until(lambda: _ready(url)[0], 120)
            load.wait_for(load.completed() + 2 * s.users)
            held = time.monotonic() - t0
    # a request sent before readiness came back may fail (the model could not serve: that is what
    # readiness said); one sent after readiness is true again must not: that would be lost
    back = t_restore + to_true
    calls = [Call(c.start, c.end, c.error, expected_error=c.error is not None and c.end >= t_fault and c.start <= back)
             for c in load.calls]  # fmt: skip
    late = [c.end - back for c in load.calls if c.error is not None and c.start <= back]
    fault = "core's model.onnx corrupted, its stub SIGKILLed; the file restored afterwards"
    notes = (
        f"ready false {to_false:.1f} s after the kill ({why[:160]}); true again {to_true:.1f} s after the restore; "
        f"the last failure of a request sent before that ended {max(late, default=0.0):+.1f} s from it"
    )
    return Row("model that cannot serve (readiness)", s.users, held, fault, Tally.of(calls), notes)


HARDENING_SCENARIOS: list[Callable[[Setup], Row]] = [key_exposure, admin_without_key, oversized_requests, unservable_model]
