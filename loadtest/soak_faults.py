"""The soak's service (a real ``detserve serve`` process) and the faults it injects into it.

Each fault returns its own requests (``Call``s: an attack's, refused as expected or not) and a
line saying what it did. The processes are found below the ``detserve serve`` process by their
command lines, at the moment of the fault: a restart gives them new pids.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import http.client
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from loadtest.opsreport_base import MODEL, Call
from loadtest.opsreport_scenarios import bad_inputs
from loadtest.procstats import ProcInfo, descendants, read_proc, role_of_process
from loadtest.soak_stats import ZOMBIE

STREAM_CHANNELS, STREAMS_PER_CHANNEL, STREAM_HOLD_S = 20, 50, 5.0
STUB_KILL = "python stub SIGKILL"
NESTING = 40_000  # finding 1: Triton 2.51's JSON parser crashed at this depth
PROBE_TIMEOUT_S = 30.0


@dataclass
class Service:
    """A running ``detserve serve`` (the supervisor) and how to reach its gate."""

    process: subprocess.Popen[bytes]
    host: str
    grpc_port: int
    http_port: int
    max_request_bytes: int
    images: list[bytes]
    log_path: Path
    stub_turn: int = field(default=0)  # which stub the next stub kill takes (rotates over the models)

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = 8) -> str:
        """The end of its output, from its last ``error:`` line when there is one (what it said when it gave up)."""
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        errors = [i for i, line in enumerate(text) if line.startswith("error:")]
        return " | ".join(text[errors[-1] :][:lines] if errors else text[-lines:])


def _zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2 :].startswith("Z")


def role_of(info: ProcInfo, supervisor: int) -> str:
    """supervisor, tritonserver, stub <model>, nginx master, nginx worker, zombie, or other (procstats' roles)."""
    if info.pid == supervisor:
        return "supervisor"
    if _zombie(info.pid):
        return ZOMBIE  # a killed stub: Triton 2.51 never waits for it (detserve/ops/watchdog.py)
    role = role_of_process(info.argv)
    if role == "gate":
        return "nginx worker" if info.argv and "worker process" in info.argv[0] else "nginx master"
    return role


def server_processes(svc: Service) -> list[tuple[ProcInfo, str]]:
    """The supervisor and every process below it, with their roles."""
    me = read_proc(svc.process.pid)
    infos = ([me] if me is not None else []) + descendants(svc.process.pid)
    return [(i, role_of(i, svc.process.pid)) for i in infos]


def _pids(svc: Service, role: str) -> list[int]:
    return [i.pid for i, r in server_processes(svc) if r == role]


def ready(svc: Service, timeout_s: float = 2.0) -> bool:
    """``/v2/health/ready`` through the gate: what a load balancer sees."""
    conn = http.client.HTTPConnection(svc.host, svc.http_port, timeout=timeout_s)
    try:
        conn.request("GET", "/v2/health/ready")
        return conn.getresponse().status == 200
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


Probes = tuple[list[Call], str]
Fault = Callable[[Service], Probes]


def _kill(svc: Service, role: str, what: str) -> Probes:
    pids = _pids(svc, role)
    if not pids:
        return [Call(time.monotonic(), time.monotonic(), f"no {what} to kill")], f"no {what} found"
    os.kill(pids[0], signal.SIGKILL)
    return [], f"SIGKILL of {what} (pid {pids[0]})"


def kill_stub(svc: Service) -> Probes:
    stubs = sorted({r for _, r in server_processes(svc) if r.startswith("stub ")})
    if not stubs:
        return _kill(svc, "stub", "a python stub")
    role = stubs[svc.stub_turn % len(stubs)]
    svc.stub_turn += 1
    return _kill(svc, role, f"the python {role}")


def kill_tritonserver(svc: Service) -> Probes:
    return _kill(svc, "tritonserver", "tritonserver")


def kill_nginx_master(svc: Service) -> Probes:
    return _kill(svc, "nginx master", "the nginx master")


def _timed(call: Callable[[], str | None], expected: Callable[[str], bool], must_fail: bool = True) -> Call:
    """Run one probe: ``call`` returns None when it was answered, else the error text.

    A probe that must fail and was answered is a wrong outcome (its call carries an error that is
    not expected); one that fails for another reason than ``expected`` too.
    """
    t0 = time.monotonic()
    try:
        error = call()
    except Exception as e:
        error = f"{type(e).__name__}: {e}"
    if error is None:
        return Call(t0, time.monotonic(), "answered: it should have been refused" if must_fail else None)
    return Call(t0, time.monotonic(), error, expected_error=must_fail and expected(error))


def _http_post(svc: Service, path: str, body: bytes) -> str | None:
    """POST ``body``; None on 200, else 'HTTP <status>' (or the connection's error)."""
    conn = http.client.HTTPConnection(svc.host, svc.http_port, timeout=PROBE_TIMEOUT_S)
    try:
        conn.putrequest("POST", path)
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(len(body)))
        conn.endheaders()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # refused early: read the answer
            for i in range(0, len(body), 1 << 20):
                conn.send(body[i : i + (1 << 20)])
        status = conn.getresponse().status
        return None if status == 200 else f"HTTP {status}"
    finally:
        conn.close()


def _refused(error: str) -> bool:
    """An HTTP 4xx: the gate (or Triton) said no; a 5xx or a dropped connection is not a refusal."""
    return error.startswith("HTTP 4")


def deep_json(svc: Service) -> Probes:
    """Finding 1's body: BYTES data nested 40 000 deep (80 KB) to the served model over HTTP."""
    body = b'{"inputs":[{"name":"IMAGE","shape":[1,1],"datatype":"BYTES","data":' + b"[" * NESTING + b"]" * NESTING + b"}]}"
    call = _timed(lambda: _http_post(svc, f"/v2/models/{MODEL}/infer", body), _refused)
    return [call], f"HTTP infer with JSON nested {NESTING} deep ({len(body) // 1024} KB): {call.error or 'answered 200'}"


def oversized(svc: Service) -> Probes:
    """A gRPC and an HTTP request 1.5 x over ``--max-request-bytes``: refused while they arrive."""
    import numpy as np
    import tritonclient.grpc as grpcclient

    size = svc.max_request_bytes * 3 // 2

    def grpc_call() -> str | None:
        client = grpcclient.InferenceServerClient(svc.grpc_url)
        try:
            inp = grpcclient.InferInput("IMAGE", [1, 1], "BYTES")
            inp.set_data_from_numpy(np.array([[svc.images[0] + b"\0" * size]], dtype=np.object_))
            client.infer(MODEL, [inp], client_timeout=PROBE_TIMEOUT_S)
            return None
        except Exception as e:
            return f"{getattr(e, 'status', lambda: '')()} {e}"
        finally:
            client.close()

    calls = [
        _timed(grpc_call, lambda e: "RESOURCE_EXHAUSTED" in e),
        _timed(lambda: _http_post(svc, f"/v2/models/{MODEL}/infer", b" " * size), lambda e: e == "HTTP 413"),
    ]
    outcome = ", ".join(c.error[:40] if c.error else "served" for c in calls)
    return calls, f"gRPC + HTTP requests of {size / 2**20:.0f} MiB (limit {svc.max_request_bytes / 2**20:.0f} MiB): {outcome}"


def malformed(svc: Service) -> Probes:
    """ops-report's bad inputs, each once: the broken ones must be refused, the odd valid ones answered."""
    from clients.grpc_client import DetectorClient

    def detect(client: DetectorClient, blob: bytes) -> None:
        client.detect(blob)

    with DetectorClient(svc.grpc_url, MODEL, timeout_s=PROBE_TIMEOUT_S) as client:
        calls = [
            _timed(functools.partial(detect, client, blob), lambda _: True, must_fail)
            for _, blob, must_fail in bad_inputs(svc.images)
        ]
    wrong = sum(1 for c in calls if c.error is not None and not c.expected_error)
    return calls, f"{len(calls)} bad or odd inputs over gRPC ({wrong} with the wrong outcome)"


def idle_streams(svc: Service) -> Probes:
    """Finding 3, bounded: channels x ``ModelStreamInfer`` calls that never send, held, then closed."""
    import grpc
    from tritonclient.grpc import service_pb2_grpc

    async def attack() -> int:
        channels = [grpc.aio.insecure_channel(svc.grpc_url) for _ in range(STREAM_CHANNELS)]
        streams = []
        try:
            for channel in channels:
                stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
                streams += [stub.ModelStreamInfer() for _ in range(STREAMS_PER_CHANNEL)]
            await asyncio.sleep(STREAM_HOLD_S)
            return sum(1 for s in streams if not s.done())
        finally:
            for s in streams:
                s.cancel()
            for channel in channels:
                await channel.close()

    still_open = asyncio.run(attack())
    total = STREAM_CHANNELS * STREAMS_PER_CHANNEL
    return [], f"{STREAM_CHANNELS} channels x {STREAMS_PER_CHANNEL} idle ModelStreamInfer calls held {STREAM_HOLD_S:.0f} s " + (
        f"({still_open} of {total} still open at the end), then closed"
    )


# cheap faults first, so that a short soak still sees every kind once; those that once took the whole
# service down (a killed nginx master, deep-nesting JSON, a killed tritonserver: docs/hardening.md)
# last, so that the others are seen even if one of them does again
FAULTS: list[tuple[str, Fault]] = [
    ("malformed requests", malformed),
    ("oversized requests", oversized),
    ("idle-stream attack", idle_streams),
    (STUB_KILL, kill_stub),
    ("nginx master SIGKILL", kill_nginx_master),
    ("deep-nesting JSON", deep_json),
    ("tritonserver SIGKILL", kill_tritonserver),
]
