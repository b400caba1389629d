"""What one tritonserver is asked to be: its repository, its public address, its limits, its command line.

``ServerOptions`` is the operator's side (the ``serve`` flags, the tests' fixtures); ``server.py``
runs it. The ports are checked here, before anything starts, so a port in use is one clear error
instead of a gate or a tritonserver that dies during start-up.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

from detserve.errors import ServerError
from detserve.ops.embedded import backend_directory, pytriton_root
from detserve.ops.gate import DEFAULT_MAX_REQUEST_BYTES, triton_listen_args
from detserve.ops.stubshm import new_prefix as new_shm_prefix
from detserve.ops.stubshm import prefix_args

EXIT_TIMEOUT_S = 10
SUMMARY_LATENCIES = "--metrics-config=summary_latencies=true"
DRAIN_TIMEOUT_S = 30.0
PYTHON_BACKEND = "libtriton_python.so"  # the python backend, in <backend directory>/python


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(_family(host), socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


# where Triton's metrics listen unless asked otherwise (a gate on 0.0.0.0 must not publish them on
# every interface). IPv4 even with an IPv6 gate: Triton 2.51 logs "Started Metrics Service at ::1:P"
# for --metrics-address=::1 but nothing answers on [::1]:P (checked).
METRICS_LOOPBACK = "127.0.0.1"


def check_port(host: str, port: int, what: str) -> None:
    with socket.socket(_family(host), socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise ServerError(f"{what} port {port} on {host} is already in use", hint=f"pass another --{what}-port") from e


@dataclass
class ServerOptions:
    """One tritonserver: its repository, the public address of its gate, its limits and admin key.

    tritonserver itself listens on Unix sockets in a private runtime directory (detserve/ops/gate.py);
    ``host``/``grpc_port``/``http_port`` are the gate's (nginx) public address; metrics (read-only)
    are served by Triton on ``metrics_host:metrics_port``, loopback unless set (a gate on 0.0.0.0
    must not publish Triton's metrics on every interface by accident). Model control is always explicit (all models
    loaded at start): detserve drains and restarts dead stubs through the private socket. Users
    reach the admin APIs only through the gate, with ``admin_key``; without one they are closed.
    """

    repository: Path
    host: str = "127.0.0.1"
    grpc_port: int = 8001
    http_port: int = 8000
    metrics_port: int = 8002
    log_file: Path | None = None
    log_verbose: int = 0
    extra_args: list[str] = field(default_factory=list)
    shm_prefix: str = field(default_factory=new_shm_prefix, repr=False)  # its stubs' /dev/shm regions (stubshm.py)
    drain_timeout_s: float = DRAIN_TIMEOUT_S
    admin_key: str | None = field(default=None, repr=False)
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    metrics_host: str | None = None  # None: METRICS_LOOPBACK
    public: bool = True  # False: no gate of its own (a replica behind a shared gate)
    tritonserver: Path | None = None  # default: the binary inside nvidia-pytriton
    backend_directory: Path | None = None  # default: the python backend of nvidia-pytriton
    max_request_pixels: int | None = None  # the stubs' per-request pixel budget; None: each model's build value

    def __post_init__(self) -> None:
        for arg in self.extra_args:
            if (owned := owned_flag(arg)) is not None:
                name = arg.split("=", 1)[0]
                said = name if name == owned else f"{name} (tritonserver reads it as {owned})"
                raise ServerError(f"{said} is set by detserve and cannot be passed as an extra flag")

    @property
    def embedded(self) -> bool:
        """Whether tritonserver needs nvidia-pytriton's set-up (embedded.py): its binary needs its libraries, and its
        python backend (the default) our stub's environment. Before, only a missing --tritonserver counted: naming
        the embedded binary (or backends) with --tritonserver started the stubs without numpy or torch."""
        if self.tritonserver is None or self.backend_directory is None:
            return True
        try:
            own = (pytriton_root() / "bin" / "tritonserver", backend_directory())
        except ServerError:  # no nvidia-pytriton (NVIDIA's image): both are that image's own
            return False
        return self.tritonserver.resolve() == own[0].resolve() or self.backend_directory.resolve() == own[1].resolve()

    def check_paths(self) -> None:
        """A --tritonserver or --backend-directory that cannot serve is refused naming it, before anything starts
        (before: a FileNotFoundError from the spawn not naming the path, or a server whose models all failed)."""
        if self.tritonserver is not None and not (self.tritonserver.is_file() and os.access(self.tritonserver, os.X_OK)):
            raise ServerError(
                f"--tritonserver {self.tritonserver}: not an executable file",
                hint="give the tritonserver binary itself (e.g. /opt/tritonserver/bin/tritonserver in NVIDIA's image)",
            )
        if self.backend_directory is not None and not (self.backend_directory / "python" / PYTHON_BACKEND).is_file():
            raise ServerError(
                f"--backend-directory {self.backend_directory}: no python backend (python/{PYTHON_BACKEND}), "
                "which every detserve model runs on",
                hint="give the folder holding the backends (e.g. /opt/tritonserver/backends in NVIDIA's image)",
            )

    def command(self, runtime: Path) -> list[str]:
        binary = self.tritonserver or (pytriton_root() / "bin" / "tritonserver")
        backends = self.backend_directory or backend_directory()
        return [
            str(binary),
            f"--model-repository={self.repository.resolve()}",
            f"--backend-directory={backends}",
            *triton_listen_args(runtime),
            f"--metrics-address={self.metrics_address}",
            f"--metrics-port={self.metrics_port}",
            # p50/p90/p95/p99/p99.9 of each model's request, queue and compute times (nv_inference_*_summary_us,
            # the p99 alert of docker/prometheus-rules.yml): measured cheap (docs/performance.md)
            *self._summary_latencies(),
            f"--exit-timeout-secs={EXIT_TIMEOUT_S}",
            "--strict-readiness=true",
            "--model-control-mode=explicit",
            "--load-model=*",
            # images of several MB per request: start the stubs' shared memory large enough
            "--backend-config=python,shm-default-byte-size=16777216",
            "--backend-config=python,shm-growth-byte-size=16777216",
            *prefix_args(self.shm_prefix),
            f"--log-verbose={self.log_verbose}",
            # the gRPC front keeps up to N request objects for reuse, each holding the raw bytes of
            # the last request it carried (default 8: 8 x the largest request, never returned)
            "--grpc-infer-allocation-pool-size=0",
            # the gate stamps each call's arrival and grpc-timeout as detserve-* headers; Triton hands
            # them to the models as request parameters, so preprocessing can drop abandoned requests
            "--grpc-header-forward-pattern=^detserve-",
            "--http-header-forward-pattern=^detserve-",
            *self.extra_args,
        ]

    def _summary_latencies(self) -> list[str]:
        """On unless the operator sets it (``--triton-arg=--metrics-config=summary_latencies=false``): with both
        flags on the line, ours first, tritonserver kept the summaries on (checked), so ours must go."""
        if any(arg.startswith(SUMMARY_LATENCIES.rsplit("=", 1)[0] + "=") for arg in self.extra_args):
            return []
        return [SUMMARY_LATENCIES]

    @property
    def metrics_address(self) -> str:
        return self.metrics_host or METRICS_LOOPBACK

    @property
    def grpc_url(self) -> str:
        return f"[{self.host}]:{self.grpc_port}" if ":" in self.host else f"{self.host}:{self.grpc_port}"


# flags detserve chooses itself: the listen addresses (Unix sockets behind the gate), model control
# (drain and stub restarts need explicit control) and any restriction key (never on a command line)
_OWNED_FLAGS = {
    "--grpc-address",
    "--grpc-port",
    "--http-address",
    "--http-port",
    "--model-control-mode",
    "--grpc-restricted-protocol",
    "--http-restricted-api",
    "--allow-grpc",
    "--allow-http",
}


def owned_flag(arg: str) -> str | None:
    """The detserve-owned flag that the extra tritonserver argument ``arg`` sets, abbreviated or not: tritonserver
    parses with getopt_long, which takes any unambiguous prefix of a long option (checked with 2.51:
    ``--grpc-addr=unix:...`` set the gRPC address, ``--model-control=poll`` the model control mode). Before, only
    the full names were refused, so ``--triton-arg=--grpc-addr=0.0.0.0`` moved tritonserver's keyless gRPC
    (the admin APIs included) off its private socket, past the gate."""
    name = arg.split("=", 1)[0]
    if not name.startswith("--") or len(name) <= 2:
        return None
    return next((flag for flag in sorted(_OWNED_FLAGS) if flag.startswith(name)), None)
