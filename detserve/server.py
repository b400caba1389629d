"""Start and stop the Triton server that ships inside the ``nvidia-pytriton`` wheel.

Two things make that binary serve our python-backend models (both checked on this machine kind):
- a backend directory holding the python backend *and* the stub built for the running Python;
- the stub runs Python in isolated mode (PYTHONPATH is ignored) and finds its prefix through the
  ``python3`` on PATH: with this interpreter's ``bin`` first on PATH it uses this virtualenv's
  site-packages (torch, onnxruntime, detserve). Without that it picks the base interpreter's
  numpy, and BYTES inputs arrive corrupted. The interpreter's own libpython goes first on
  LD_LIBRARY_PATH so the stub loads the same libpython as the interpreter.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from detserve.errors import ServerError

EXIT_TIMEOUT_S = 10


def pytriton_root() -> Path:
    try:
        import pytriton
    except ImportError as e:
        raise ServerError("nvidia-pytriton is not installed", hint="pip install 'detserve[server]'") from e
    root = Path(pytriton.__file__).parent / "tritonserver"
    if not (root / "bin" / "tritonserver").is_file():
        raise ServerError(f"no tritonserver binary under {root}")
    return root


def backend_directory() -> Path:
    """A backend directory with the python backend and the stub for this Python (symlinks, cached)."""
    root = pytriton_root()
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / py / "triton_python_backend_stub"
    if not stub.is_file():
        raise ServerError(f"nvidia-pytriton ships no python backend stub for Python {py}")
    target = Path(sys.prefix) / "var" / "detserve" / f"backends-py{py}" / "python"
    target.mkdir(parents=True, exist_ok=True)
    sources = {
        "libtriton_python.so": root / "backends" / "python" / "libtriton_python.so",
        "triton_python_backend_utils.py": root / "backends" / "python" / "triton_python_backend_utils.py",
        "triton_python_backend_stub": stub,
    }
    for name, src in sources.items():
        link = target / name
        if not link.exists() or link.resolve() != src.resolve():
            link.unlink(missing_ok=True)
            link.symlink_to(src)
    return target.parent


def server_environment() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    libs = [sysconfig.get_config_var("LIBDIR") or "", str(pytriton_root().parent.parent / "nvidia_pytriton.libs")]
    env["LD_LIBRARY_PATH"] = os.pathsep.join([p for p in libs if p] + [env.get("LD_LIBRARY_PATH", "")])
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # __pycache__ in a repository makes Triton reload models
    env.pop("PYTHONPATH", None)
    return env


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _check_port(host: str, port: int, what: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise ServerError(f"{what} port {port} on {host} is already in use", hint=f"pass another --{what}-port") from e


@dataclass
class ServerOptions:
    repository: Path
    host: str = "127.0.0.1"
    grpc_port: int = 8001
    http_port: int = 8000
    metrics_port: int = 8002
    log_file: Path | None = None
    log_verbose: int = 0
    extra_args: list[str] = field(default_factory=list)

    def command(self) -> list[str]:
        return [
            str(pytriton_root() / "bin" / "tritonserver"),
            f"--model-repository={self.repository.resolve()}",
            f"--backend-directory={backend_directory()}",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.grpc_port}",
            f"--http-address={self.host}",
            f"--http-port={self.http_port}",
            f"--metrics-address={self.host}",
            f"--metrics-port={self.metrics_port}",
            f"--exit-timeout-secs={EXIT_TIMEOUT_S}",
            "--strict-readiness=true",
            # images of several MB per request: start the stubs' shared memory large enough
            "--backend-config=python,shm-default-byte-size=16777216",
            "--backend-config=python,shm-growth-byte-size=16777216",
            f"--log-verbose={self.log_verbose}",
            *self.extra_args,
        ]

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"


class TritonServer:
    """A tritonserver process: started in its own process group so nothing outlives ``stop()``."""

    def __init__(self, options: ServerOptions) -> None:
        self.options = options
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = options.log_file or Path(tempfile.mkstemp(prefix="tritonserver-", suffix=".log")[1])

    def start(self) -> None:
        opts = self.options
        if not opts.repository.is_dir():
            raise ServerError(f"model repository not found: {opts.repository}", hint="build one with `detserve build`")
        for what, port in (("grpc", opts.grpc_port), ("http", opts.http_port), ("metrics", opts.metrics_port)):
            _check_port(opts.host, port, what)
        log = open(self.log_path, "wb")  # noqa: SIM115 - handed to the child process
        self.process = subprocess.Popen(
            opts.command(), stdout=log, stderr=subprocess.STDOUT, env=server_environment(), start_new_session=True
        )
        log.close()

    def wait_ready(self, timeout_s: float = 300.0) -> None:
        import tritonclient.grpc as grpcclient

        deadline = time.monotonic() + timeout_s
        client = grpcclient.InferenceServerClient(self.options.grpc_url)
        try:
            while time.monotonic() < deadline:
                if self.process is None or self.process.poll() is not None:
                    raise ServerError("tritonserver exited during start-up: " + self.errors(), hint=f"full log: {self.log_path}")
                with contextlib.suppress(Exception):
                    if client.is_server_ready():
                        return
                time.sleep(0.5)
        finally:
            client.close()
        self.stop()
        raise ServerError(f"tritonserver not ready after {timeout_s:.0f} s: " + self.errors(), hint=f"full log: {self.log_path}")

    def errors(self) -> str:
        """Triton's own error lines (model load failures, port errors) from its log."""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        wanted = [
            ln for ln in lines if ln.startswith("E") or "failed to load" in ln or "UNAVAILABLE" in ln or "error:" in ln.lower()
        ]
        return "\n".join(wanted[-15:]) or "\n".join(lines[-10:])

    def stop(self, timeout_s: float = EXIT_TIMEOUT_S + 10) -> None:
        """SIGTERM (Triton drains in-flight requests), then SIGKILL the whole group if needed."""
        proc = self.process
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=timeout_s)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # stubs left behind by a crash
        proc.wait()
        self.process = None

    def __enter__(self) -> TritonServer:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def running_server(repository: Path, **kwargs: object) -> Iterator[TritonServer]:
    """A server on free loopback ports (tests, the demo)."""
    opts = ServerOptions(
        repository=repository,
        grpc_port=free_port(),
        http_port=free_port(),
        metrics_port=free_port(),
        **kwargs,  # type: ignore[arg-type]
    )
    with TritonServer(opts) as server:
        yield server
