"""``detserve serve``: one server or N replicas behind the gate, kept running until stopped.

The loop keeps every part alive: a tritonserver that dies is restarted with backoff,
readiness false meanwhile, naming how it ended (``TritonServer.supervise``; with replicas the gate
sends to the others); a gate whose nginx master dies has its whole process group killed and starts
again on the same ports (``Gate.supervise``). Each event is printed with the signal or exit code.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable, Iterator

from detserve.ops.nginx import Gate
from detserve.ops.server import ServerOptions, TritonServer

Echo = Callable[[str], None]
POLL_S = 0.5


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _describe(options: ServerOptions, replicas: int) -> list[str]:
    o = options
    lines = [
        f"ready: gRPC {_address(o.host, o.grpc_port)}  HTTP {_address(o.host, o.http_port)}"
        "  (the gate: nginx in front of tritonserver)"
    ]
    if replicas > 1:
        lines.append(f"replicas: {replicas}, metrics on {o.metrics_address}, ports from {o.metrics_port} (one per replica)")
    else:
        lines.append(f"metrics: http://{_address(o.metrics_address, o.metrics_port)}/metrics")
    if o.admin_key:
        lines.append("admin APIs (load/unload, config, shared memory, trace, logging): open with the admin key")
    else:
        lines.append("admin APIs closed: start with DETSERVE_ADMIN_KEY_FILE (or DETSERVE_ADMIN_KEY) set to open them")
    lines.append(f"request size limit: {o.max_request_bytes} bytes")
    lines.append("a tritonserver or gate that dies is restarted (readiness false meanwhile)")
    return lines


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """A second Ctrl-C / SIGTERM while stopping would abandon tritonserver and nginx half-stopped
    (seen: both orphaned, still listening); the stop is bounded by its own timeouts."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def supervise_once(servers: list[TritonServer], gate: Gate | None, echo: Echo) -> None:
    """One look at every part: restart what died (see the module docstring), report what happened."""
    for i, server in enumerate(servers):
        if line := server.supervise():
            echo(f"replica {i}: {line}" if len(servers) > 1 else line)
    if gate is not None and (line := gate.supervise()):
        echo(line)


def serve_until_stopped(options: ServerOptions, replicas: int = 1, echo: Echo = lambda _: None) -> None:
    """Start, report, keep every part up, and stop (draining) on KeyboardInterrupt or a failure."""
    from detserve.ops.replicas import ReplicaSet

    group = ReplicaSet(options, replicas) if replicas > 1 else None
    single = TritonServer(options) if group is None else None
    try:
        # inside the try: a SIGTERM during start-up still stops what was started
        if group is not None:
            group.start()
        elif single is not None:
            single.start()
            single.wait_ready()
            echo(f"Triton log: {single.log_path}")
        for line in _describe(options, replicas):
            echo(line)
        servers = group.servers if group is not None else [single] if single is not None else []
        gate = group.gate if group is not None else single.gate if single is not None else None
        while True:
            supervise_once(servers, gate, echo)
            time.sleep(POLL_S)
    except KeyboardInterrupt:
        echo("stopping (draining in-flight requests)...")
    finally:
        with _signals_held():
            if group is not None:
                group.stop()
            elif single is not None:
                single.stop()
