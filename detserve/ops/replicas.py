"""Scale out on one machine: N tritonserver replicas behind one gate (nginx) that balances gRPC and HTTP.

Each replica listens on Unix sockets in its own private runtime directory (detserve/ops/gate.py); the
gate spreads calls over them and, when one stops answering, passes a call that could not be
delivered to the next replica (``grpc_next_upstream``); clients retry what still fails (idempotent
inference), so killing a replica loses no request. The gate is the same as a single server's:
admin key, request-size limit, readiness (false while any replica has a model that cannot serve).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from detserve.errors import ServerError
from detserve.ops.gate import GateConfig, private_directory, upstream_in
from detserve.ops.health import GateHelper
from detserve.ops.nginx import Gate
from detserve.ops.server import ServerOptions, TritonServer, free_port
from detserve.ops.stubshm import new_prefix as new_shm_prefix


@dataclass
class ReplicaSet:
    """``replicas`` servers of one repository behind one gate on ``options``' public address.

    ``options`` describes every replica (repository, admin key, limits, log file: replica i logs to
    ``<log_file>.<i>``); its ports are the gate's; each replica's metrics get a port of their own,
    ``metrics_port + i`` (free ports when ``metrics_port`` is 0).
    """

    options: ServerOptions
    replicas: int = 2
    servers: list[TritonServer] = field(default_factory=list)
    gate: Gate | None = None
    helper: GateHelper | None = None
    workdir: Path | None = None

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ServerError(f"--replicas must be >= 1, got {self.replicas}")

    @property
    def grpc_url(self) -> str:
        return self.options.grpc_url

    def _replica_options(self, i: int) -> ServerOptions:
        o = self.options
        log = o.log_file.with_name(f"{o.log_file.name}.{i}") if o.log_file else None
        metrics = o.metrics_port + i if o.metrics_port else free_port(o.host)
        # each replica its own /dev/shm prefix (detserve/ops/stubshm.py): replace() would copy the template's
        return replace(o, public=False, metrics_port=metrics, log_file=log, shm_prefix=new_shm_prefix())

    def start(self, timeout_s: float = 300.0) -> None:
        for i in range(self.replicas):
            server = TritonServer(self._replica_options(i))
            self.servers.append(server)
            server.start()
        for server in self.servers:
            server.wait_ready(timeout_s)
        o = self.options
        self.workdir = private_directory("detserve-gate-")
        upstreams = tuple(upstream_in(s.runtime) for s in self.servers if s.runtime is not None)
        self.helper = GateHelper(
            self.workdir / "helper.sock",
            [s.internal_url for s in self.servers],
            lambda: [s.failing for s in self.servers],
            o.repository,
            metrics=[(s.options.metrics_address, s.options.metrics_port) for s in self.servers],
        )
        self.helper.start()
        helper = self.helper.socket
        cfg = GateConfig(
            self.workdir, o.host, o.grpc_port, o.http_port, upstreams, o.admin_key, o.max_request_bytes, helper_socket=helper
        )
        self.gate = Gate(cfg)
        self.gate.start()
        for server in self.servers:  # stub deaths and tritonserver restarts: readiness of the whole set
            server.on_readiness = lambda _failing: self._publish_readiness()

    def _publish_readiness(self) -> None:
        failing: dict[str, str] = {}
        for i, server in enumerate(self.servers):
            failing.update({f"replica {i} {model}": why for model, why in server.failing.items()})
        if self.gate is not None:
            self.gate.set_unready(failing)

    def kill_replica(self, index: int) -> None:
        """Fault injection: SIGKILL one replica and its stubs (no drain)."""
        proc = self.servers[index].process
        if proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def stop(self) -> None:
        for server in self.servers:  # drain first: the gate keeps passing in-flight calls meanwhile
            if server.process is not None and server.process.poll() is None:
                server.drain()
        if self.gate is not None:
            self.gate.stop()
            self.gate = None
        if self.helper is not None:
            self.helper.stop()
            self.helper = None
        for server in self.servers:
            server.stop()
        self.servers.clear()
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None


@contextlib.contextmanager
def running_replicas(repository: Path, replicas: int = 2) -> Iterator[ReplicaSet]:
    opts = ServerOptions(repository, grpc_port=free_port(), http_port=free_port(), metrics_port=0)
    rs = ReplicaSet(opts, replicas)
    try:
        rs.start()
        yield rs
    finally:
        rs.stop()
