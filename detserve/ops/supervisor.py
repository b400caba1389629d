"""``detserve serve``: one server or N replicas behind the gate, kept running until stopped.

The loop also keeps the gate alive: nginx that exits (killed, crashed) is started again on the same
address, so the public address comes back without touching tritonserver.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from detserve.errors import DetserveError, ServerError
from detserve.ops.server import ServerOptions, TritonServer

Echo = Callable[[str], None]
POLL_S = 0.5


def _describe(options: ServerOptions, replicas: int) -> list[str]:
    o = options
    lines = [f"ready: gRPC {o.host}:{o.grpc_port}  HTTP {o.host}:{o.http_port}  (the gate: nginx in front of tritonserver)"]
    if replicas > 1:
        lines.append(f"replicas: {replicas}, metrics on ports from {o.metrics_port} (one per replica)")
    else:
        lines.append(f"metrics: http://{o.host}:{o.metrics_port}/metrics")
    if o.admin_key:
        lines.append("admin APIs (load/unload, config, shared memory, trace, logging): open with the admin key")
    else:
        lines.append("admin APIs closed: start with DETSERVE_ADMIN_KEY_FILE (or DETSERVE_ADMIN_KEY) set to open them")
    lines.append(f"request size limit: {o.max_request_bytes} bytes")
    return lines


def serve_until_stopped(options: ServerOptions, replicas: int = 1, echo: Echo = lambda _: None) -> None:
    """Start, report, keep the gate up, and stop (draining) on KeyboardInterrupt or a failure."""
    if replicas > 1:
        _replicas_until_stopped(options, replicas, echo)
        return
    server = TritonServer(options)
    try:
        server.start()  # inside the try: a SIGTERM during start-up still stops what was started
        server.wait_ready()
        for line in _describe(options, 1):
            echo(line)
        echo(f"Triton log: {server.log_path}")
        while server.process is not None and server.process.poll() is None:
            if server.gate is not None and not server.gate.alive:
                echo("the gate (nginx) exited: starting it again")
                server.gate.start()
            time.sleep(POLL_S)
        raise ServerError("tritonserver exited: " + server.errors(), hint=f"full log: {server.log_path}")
    except KeyboardInterrupt:
        echo("stopping (draining in-flight requests)...")
    finally:
        server.stop()


def _replicas_until_stopped(options: ServerOptions, replicas: int, echo: Echo) -> None:
    from detserve.ops.replicas import ReplicaSet

    rs = ReplicaSet(options, replicas)
    try:
        rs.start()
        for line in _describe(options, replicas):
            echo(line)
        while all(s.process is not None and s.process.poll() is None for s in rs.servers):
            if rs.gate is not None and not rs.gate.alive:
                echo("the gate (nginx) exited: starting it again")
                rs.gate.start()
            time.sleep(POLL_S)
        raise DetserveError(
            "a replica exited: " + "; ".join(s.errors() for s in rs.servers if s.process and s.process.poll() is not None)
        )
    except KeyboardInterrupt:
        echo("stopping replicas (draining in-flight requests)...")
    finally:
        rs.stop()
