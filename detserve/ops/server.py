"""Start, supervise and stop the Triton server that ships inside the ``nvidia-pytriton`` wheel.

A ``TritonServer`` owns one tritonserver process (in its own process group), its stub watchdog,
its /dev/shm regions and, when public, its nginx gate. Stopping drains first: the server always
runs explicit model control -- with the user's admin key, or an internal one only this object
knows -- so ``stop`` unloads the ensembles before SIGTERM (why: ``drain.py``).

What the server is asked to be (repository, addresses, limits, command line): ``server_options.py``;
the binary and its environment: ``embedded.py``; dead python stubs: ``watchdog.py``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from detserve.errors import DetserveError, ServerError
from detserve.ops.drain import DrainReport, drain_ensembles
from detserve.ops.embedded import server_environment
from detserve.ops.gate import GateConfig, internal_grpc_url, private_directory, upstream_in
from detserve.ops.health import GateHelper
from detserve.ops.nginx import Gate
from detserve.ops.plans import check_plans, serving_tensorrt
from detserve.ops.privateshm import wrap as wrap_private_shm
from detserve.ops.restarts import Backoff, Restart, describe_exit
from detserve.ops.server_options import EXIT_TIMEOUT_S, ServerOptions, check_port, free_port
from detserve.ops.stubshm import ServerShm
from detserve.ops.stubshm import prepare as prepare_shm
from detserve.ops.stubshm import release as release_shm
from detserve.ops.watchdog import StubRestart, StubWatchdog
from detserve.runtime.backend.common import MAX_REQUEST_PIXELS_ENV

# ServerOptions and free_port are part of this module's interface (callers start a server with them)
__all__ = ["DrainReport", "ServerOptions", "TritonServer", "free_port", "running_server"]

log = logging.getLogger(__name__)
# start-up lines of a CPU-only host that say nothing about why tritonserver stopped
_HARMLESS = ("CudaDriverHelper has not been initialized", "Failed to initialize NVML", "DCGM")


class TritonServer:
    """A tritonserver process behind its gate, in its own process group so nothing outlives ``stop()``."""

    def __init__(self, options: ServerOptions) -> None:
        self.options = options
        self.process: subprocess.Popen[bytes] | None = None
        self.gate: Gate | None = None
        self.helper: GateHelper | None = None  # per-model gRPC health and class names behind the gate
        self.runtime: Path | None = None
        self.last_drain: DrainReport | None = None
        self.watchdog: StubWatchdog | None = None
        self.shm: ServerShm | None = None  # what this start owns in /dev/shm, and its record
        self.log_path = options.log_file or Path(tempfile.mkstemp(prefix="tritonserver-", suffix=".log")[1])
        # restarts of a dead tritonserver (``supervise``): readiness false while ``down`` says why
        self.restarts: list[Restart] = []
        self.down: str | None = None
        self.on_readiness: Callable[[dict[str, str]], None] | None = None
        self._backoff = Backoff()
        self._restart_at: float | None = None
        self._past_stub_restarts: list[StubRestart] = []

    @property
    def internal_url(self) -> str:
        """tritonserver's own gRPC socket: no key, reachable only by this user (drain, stub restarts, tests)."""
        if self.runtime is None:
            raise ServerError("the server is not started")
        return internal_grpc_url(self.runtime)

    def start(self) -> None:
        opts = self.options
        if not opts.repository.is_dir():
            raise ServerError(f"model repository not found: {opts.repository}", hint="build one with `detserve build`")
        opts.check_paths()
        ports = [(opts.metrics_address, opts.metrics_port, "metrics")]
        if opts.public:
            ports += [(opts.host, opts.grpc_port, "grpc"), (opts.host, opts.http_port, "http")]
        for host, port, what in ports:
            check_port(host, port, what)
        try:
            # engines Triton could not deserialise: refused here, naming both TensorRT versions (ops/plans.py)
            check_plans(opts.repository, None if opts.tritonserver is None else serving_tensorrt(opts.backend_directory))
            self.runtime = private_directory()
            self._spawn()
            if opts.public:
                self.helper = GateHelper(
                    self.runtime / "helper.sock",
                    [self.internal_url],
                    lambda: [self.failing],
                    opts.repository,
                    metrics=[(opts.metrics_address, opts.metrics_port)],
                )
                self.helper.start()
                self.gate = Gate(
                    GateConfig(
                        self.runtime,
                        opts.host,
                        opts.grpc_port,
                        opts.http_port,
                        (upstream_in(self.runtime),),
                        opts.admin_key,
                        opts.max_request_bytes,
                        helper_socket=self.helper.socket,
                    )
                )
                self.gate.start()
        except BaseException:
            spawned = self.process is not None
            self.stop()  # a failed start leaves no process, runtime directory or record behind
            if self.options.log_file is None and not spawned:
                self.log_path.unlink(missing_ok=True)  # nothing ran: an empty log says nothing
            raise

    def _spawn(self) -> None:
        """tritonserver and its stub watchdog in ``self.runtime`` (a restart reuses it: the gate's upstreams stay)."""
        opts = self.options
        if self.runtime is None:
            raise ServerError("the server has no runtime directory: start() creates it")
        env = server_environment(embedded=opts.embedded)
        if opts.max_request_pixels is not None:  # the python stubs inherit it (runtime/backend/common.py)
            env[MAX_REQUEST_PIXELS_ENV] = str(opts.max_request_pixels)
        self.shm = prepare_shm(opts.extra_args, opts.shm_prefix)  # and clean up after dead servers
        out = open(self.log_path, "ab" if self.restarts else "wb")  # noqa: SIM115 - handed to the child; a restart appends
        self.process = subprocess.Popen(
            # umask 007: its sockets are group-connectable by the gate's workers (gate.private_directory)
            wrap_private_shm(opts.command(self.runtime)),
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            umask=0o007,
        )
        out.close()
        self.shm.record(self.process.pid)
        self.watchdog = StubWatchdog(self.process.pid, self.internal_url, on_failing=lambda _: self.publish_readiness())
        self.watchdog.start()

    def publish_readiness(self) -> None:
        """Hand ``failing`` to whoever answers readiness: ``on_readiness`` (a replica set), else this server's gate."""
        failing = self.failing
        if self.on_readiness is not None:
            self.on_readiness(failing)
        elif self.gate is not None:
            self.gate.set_unready(failing)

    @property
    def stub_restarts(self) -> list[StubRestart]:
        return self._past_stub_restarts + (list(self.watchdog.restarts) if self.watchdog else [])

    @property
    def failing(self) -> dict[str, str]:
        """Models that cannot serve now, with the reason (readiness is false while this is not empty)."""
        if self.down is not None:
            return {"tritonserver": self.down}  # every model went with it
        return dict(self.watchdog.failing) if self.watchdog else {}

    def supervise(self) -> str | None:
        """One step of keeping tritonserver running; the serve loop calls it every ``POLL_S``.

        A tritonserver that died (a crash, the OOM killer, a request that kills it) is counted, its
        stubs, /dev/shm regions and sockets released, readiness set false naming how it ended, and
        after a backoff started again in the same runtime directory, so the gate's upstreams hold.
        Returns a line for the operator when something happened.
        """
        proc = self.process
        if proc is None:
            return None  # stopped
        now = time.monotonic()
        if self._restart_at is not None:
            return self._respawn(now) if now >= self._restart_at else None
        if proc.poll() is not None:
            return self._died(now, describe_exit("tritonserver", proc.returncode))
        if self.down is not None and self._answers_ready():
            restart = self.restarts[-1]
            restart.seconds = now - restart.at
            self.down = None
            self._backoff.up(now)
            self.publish_readiness()
            return f"tritonserver ready again ({restart.seconds:.1f} s after: {restart.reason}; restart {len(self.restarts)})"
        return None

    def _died(self, now: float, why: str) -> str:
        self._release_dead()
        delay = self._backoff.next_delay(now)
        if self.down is None:  # a new death, not a restart that failed again
            self.restarts.append(Restart(why, now))
        else:
            self.restarts[-1].error = why
        self.down = f"{why}; restart {len(self.restarts)} in {delay:.0f} s"
        self._restart_at = now + delay
        self.publish_readiness()
        message = f"{why}: restart {len(self.restarts)} in {delay:.1f} s (Triton log: {self.log_path})"
        log.error("%s", message)
        return message

    def _respawn(self, now: float) -> str:
        self._restart_at = None
        try:
            self._spawn()
        except (DetserveError, OSError) as e:
            return self._died(now, f"tritonserver could not be started: {e}")
        self.down = f"{self.restarts[-1].reason}; restart {len(self.restarts)}: loading the models"
        self.publish_readiness()
        return f"tritonserver restart {len(self.restarts)}: started (pid {self.process.pid if self.process else '?'})"

    def _release_dead(self) -> None:
        """What a dead tritonserver leaves behind: its watchdog, stubs (its process group), regions, sockets."""
        if self.watchdog is not None:
            self.watchdog.stop()
            self._past_stub_restarts += self.watchdog.restarts
            self.watchdog = None
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        release_shm(self.shm)
        if self.runtime is not None:  # a stale socket file would make the new server's bind fail
            up = upstream_in(self.runtime)
            for path in (up.grpc_socket.with_name(up.grpc_socket.name + ":0"), up.grpc_socket, up.http_socket):
                path.unlink(missing_ok=True)

    def _answers_ready(self) -> bool:
        """A fresh client each time: one made before the socket existed backs off its reconnects up to
        2 minutes (gRPC's default), which kept a start that took 40 s on a busy machine waiting 2 more."""
        import tritonclient.grpc as grpcclient

        client = grpcclient.InferenceServerClient(self.internal_url)
        try:
            return bool(client.is_server_ready(client_timeout=2.0))
        except Exception:  # not up yet: any failure means not ready
            return False
        finally:
            client.close()

    def wait_ready(self, timeout_s: float = 300.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                how = describe_exit("tritonserver", self.process.returncode if self.process else None)
                raise ServerError(f"{how} during start-up: " + self.errors(), hint=f"full log: {self.log_path}")
            if self.gate is not None and not self.gate.alive:
                raise ServerError("the gate (nginx) exited during start-up: " + self.gate.errors())
            if self._answers_ready():
                return
            time.sleep(0.5)
        self.stop()
        raise ServerError(f"tritonserver not ready after {timeout_s:.0f} s: " + self.errors(), hint=f"full log: {self.log_path}")

    def errors(self) -> str:
        """Triton's own error lines (model load failures, port errors) from its log."""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        wanted = [
            ln
            for ln in lines
            if (ln.startswith("E") or "failed to load" in ln or "UNAVAILABLE" in ln or "error:" in ln.lower())
            and not any(noise in ln for noise in _HARMLESS)
        ]
        return "\n".join(wanted[-15:]) or "\n".join(lines[-10:])

    def stop(self, timeout_s: float = EXIT_TIMEOUT_S + 10) -> DrainReport | None:
        """Drain (see ``drain``), stop the gate, SIGTERM, then SIGKILL the whole group if it has not exited."""
        proc = self.process
        self._restart_at = None
        if proc is None:
            self._stop_gate()
            if self.runtime is not None:
                shutil.rmtree(self.runtime, ignore_errors=True)
                self.runtime = None
            return None
        if self.watchdog is not None:
            self.watchdog.stop()  # no reload while the server goes down
        report = None
        if proc.poll() is None:
            report = self.drain()
        self._stop_gate()
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=timeout_s)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # stubs left behind by a crash
        proc.wait()
        release_shm(self.shm)  # regions left by a SIGKILL, stubs that escaped the group
        self.process = None
        self.last_drain = report
        if self.runtime is not None:
            shutil.rmtree(self.runtime, ignore_errors=True)
            self.runtime = None
        return report

    def _stop_gate(self) -> None:
        if self.gate is not None:
            self.gate.stop()
            self.gate = None
        if self.helper is not None:
            self.helper.stop()
            self.helper = None

    def drain(self) -> DrainReport:
        """Unload the ensembles, outermost first, and wait until Triton has (``drain.py``).

        A drain that fails or times out is logged in the report, and SIGTERM follows anyway.
        """
        return drain_ensembles(self.internal_url, self.options.drain_timeout_s)

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
