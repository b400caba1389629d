"""Scale out on one machine: N tritonserver replicas behind nginx as a gRPC load balancer (loopback).

nginx (Debian's package) spreads gRPC calls over the replicas and, when one stops answering,
passes a call that could not be delivered to the next replica (``grpc_next_upstream``); clients
retry what still fails (idempotent inference), so killing a replica loses no request.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from detserve.errors import ServerError
from detserve.server import ServerOptions, TritonServer, free_port

NGINX_CONF = """\
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    client_max_body_size 64m;  # encoded images travel in the gRPC body
    upstream triton_grpc {{
{servers}
        keepalive 64;
    }}
    server {{
        listen {host}:{port} http2;
        location / {{
            grpc_pass grpc://triton_grpc;
            # a replica that refuses or drops the connection: try the next one
            # gRPC calls are POSTs; inference is idempotent, so they may go to the next replica too
            grpc_next_upstream error timeout http_502 http_503 http_504 non_idempotent;
            grpc_next_upstream_tries {tries};
            grpc_read_timeout 120s;
        }}
    }}
}}
"""


def nginx_binary() -> str:
    path = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if path is None:
        raise ServerError("nginx is not installed", hint="apt-get install nginx-light (Debian), or run one replica")
    return path


def nginx_config(prefix: Path, host: str, port: int, upstream_ports: list[int]) -> str:
    servers = "\n".join(f"        server {host}:{p} max_fails=1 fail_timeout=5s;" for p in upstream_ports)
    return NGINX_CONF.format(prefix=prefix, host=host, port=port, servers=servers, tries=len(upstream_ports))


@dataclass
class ReplicaSet:
    """``replicas`` servers of one repository plus an nginx gRPC front on ``grpc_port``."""

    repository: Path
    replicas: int = 2
    host: str = "127.0.0.1"
    grpc_port: int = 0
    servers: list[TritonServer] = field(default_factory=list)
    nginx: subprocess.Popen[bytes] | None = None
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="detserve-nginx-")))

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ServerError(f"--replicas must be >= 1, got {self.replicas}")
        self.grpc_port = self.grpc_port or free_port(self.host)

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    def start(self, timeout_s: float = 300.0) -> None:
        binary = nginx_binary()
        for _ in range(self.replicas):
            opts = ServerOptions(self.repository, self.host, free_port(), free_port(), free_port())
            server = TritonServer(opts)
            server.start()
            self.servers.append(server)
        for server in self.servers:
            server.wait_ready(timeout_s)
        conf = self.workdir / "nginx.conf"
        conf.write_text(nginx_config(self.workdir, self.host, self.grpc_port, [s.options.grpc_port for s in self.servers]))
        self.nginx = subprocess.Popen(
            [binary, "-p", str(self.workdir), "-c", str(conf), "-g", "daemon off;"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        self._wait_front(timeout_s=15.0)

    def _wait_front(self, timeout_s: float) -> None:
        import tritonclient.grpc as grpcclient

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.nginx is not None and self.nginx.poll() is not None:
                err = self.nginx.stderr.read().decode(errors="replace") if self.nginx.stderr else ""
                raise ServerError(f"nginx exited: {err.strip()}")
            client = grpcclient.InferenceServerClient(self.grpc_url)
            with contextlib.suppress(Exception):
                if client.is_server_ready():
                    client.close()
                    return
            client.close()
            time.sleep(0.2)
        raise ServerError(f"the nginx front on {self.grpc_url} did not answer within {timeout_s:.0f} s")

    def kill_replica(self, index: int) -> None:
        """Fault injection: SIGKILL one replica and its stubs (no drain)."""
        proc = self.servers[index].process
        if proc is not None:
            with contextlib.suppress(ProcessLookupError):
                import os

                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def stop(self) -> None:
        if self.nginx is not None:
            self.nginx.terminate()
            try:
                self.nginx.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.nginx.kill()
            self.nginx = None
        for server in self.servers:
            server.stop()
        self.servers.clear()
        shutil.rmtree(self.workdir, ignore_errors=True)


@contextlib.contextmanager
def running_replicas(repository: Path, replicas: int = 2) -> Iterator[ReplicaSet]:
    rs = ReplicaSet(repository, replicas)
    try:
        rs.start()
        yield rs
    finally:
        rs.stop()
