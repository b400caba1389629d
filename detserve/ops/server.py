"""Start and stop the Triton server that ships inside the ``nvidia-pytriton`` wheel.

Two things make that binary serve our python-backend models (both checked on this machine kind):
- a backend directory holding the python backend *and* the stub built for the running Python;
- the stub runs Python in isolated mode (PYTHONPATH is ignored) and finds its prefix through the
  ``python3`` on PATH: with this interpreter's ``bin`` first on PATH it uses this virtualenv's
  site-packages (torch, onnxruntime, detserve). Without that it picks the base interpreter's
  numpy, and BYTES inputs arrive corrupted. The interpreter's own libpython goes first on
  LD_LIBRARY_PATH so the stub loads the same libpython as the interpreter.

Because the stub's Python is isolated, ``PYTHONDONTWRITEBYTECODE`` does not reach it either: it
wrote ``__pycache__`` into every python model's version directory, and in explicit model control
Triton then saw the model as modified and reloaded it (with its dependants) on the next load. The
``python3`` first on the stubs' PATH is therefore a private prefix (``stub_prefix``) whose
``site-packages`` holds one ``.pth`` file: it turns bytecode writing off and adds this
interpreter's site-packages.

Stopping drains first (``TritonServer.drain``): on SIGTERM Triton 2.51 stops every model's
scheduler at once, composing models included, so an ensemble request that already passed its
first step is rejected at the next one ("scheduler ... has stopped accepting new inference
requests"). The server therefore always runs explicit model control -- with the user's admin key,
or an internal one only this object knows -- and ``stop`` unloads the ensembles first: Triton
refuses new requests for them at once and unloads each only when its in-flight requests are done.
Then SIGTERM.

A killed or crashed python stub is brought back by ``StubWatchdog``: Triton 2.51's python backend
never restarts a dead stub (python_backend removed the restart from ``ModelInstanceExecute`` in
r24.07, commit 27f04d1), so every request scheduled on that instance fails for good with "Stub
process '<instance>' is not healthy." and the stub stays a zombie child of tritonserver (nobody
waits for it). The watchdog sees those zombies and reloads their model through the
model-repository API (the same explicit control and key the drain uses). A plain load of an
unchanged model is a no-op in Triton, and a config identical to the served one only "updates" it
in place, so the reload overrides the served config with one parameter changed
(``detserve_stub_restart``): Triton loads fresh instances beside the dead ones and swaps them in
once ready (~10 s here); clients retry the "not healthy" answers meanwhile.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from detserve.errors import ServerError
from detserve.ops.cachedir import cache_directory
from detserve.ops.gate import (
    DEFAULT_MAX_REQUEST_BYTES,
    Gate,
    GateConfig,
    internal_grpc_url,
    private_directory,
    triton_listen_args,
    upstream_in,
)
from detserve.ops.stubshm import ServerShm, StubJanitor, prefix_args
from detserve.ops.stubshm import new_prefix as new_shm_prefix
from detserve.ops.stubshm import prepare as prepare_shm
from detserve.ops.stubshm import release as release_shm

EXIT_TIMEOUT_S = 10
DRAIN_TIMEOUT_S = 30.0
STUB_BINARY = "triton_python_backend_stub"
STUB_CHECK_S = 0.5
RESTART_PARAMETER = "detserve_stub_restart"
# never handed to tritonserver, nginx or the stubs
SECRET_VARIABLES = ("DETSERVE_ADMIN_KEY", "DETSERVE_ADMIN_KEY_FILE")

log = logging.getLogger(__name__)


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
    target = cache_directory() / f"backends-py{py}" / "python"
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


def stub_prefix() -> Path:
    """A private Python prefix for the stubs: this interpreter, bytecode writing off (module docstring)."""
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    root = cache_directory() / f"stub-prefix-py{py}"
    (root / "bin").mkdir(parents=True, exist_ok=True)
    link = root / "bin" / "python3"
    if not link.is_symlink() or os.readlink(link) != sys.executable:
        link.unlink(missing_ok=True)
        link.symlink_to(sys.executable)
    home = sysconfig.get_config_var("BINDIR") or str(Path(sys.executable).parent)
    _write_if_changed(root / "pyvenv.cfg", f"home = {home}\ninclude-system-site-packages = false\n")
    site_dir = root / "lib" / f"python{py}" / "site-packages"
    site_dir.mkdir(parents=True, exist_ok=True)
    import site

    dirs = [d for d in site.getsitepackages() if Path(d).is_dir()]
    # one line: site.py executes .pth lines that start with "import"; addsitedir also runs the
    # .pth files found there (this virtualenv's editable installs)
    # (no comprehension: site.py exec()s the line, a comprehension's scope would not see ``site``)
    pth = f"import sys, site; sys.dont_write_bytecode = True; list(map(site.addsitedir, {dirs!r}))\n"
    _write_if_changed(site_dir / "detserve-stub.pth", pth)
    return root


def _write_if_changed(path: Path, text: str) -> None:
    if not path.is_file() or path.read_text() != text:
        path.write_text(text)


def server_environment(embedded: bool = True) -> dict[str, str]:
    """tritonserver's environment; ``embedded``: the nvidia-pytriton binary and its stub set-up (module docstring).

    Either binary gets the malloc settings and loses the admin-key variables (the stubs run user
    model code: the key stays in this process).
    """
    env = dict(os.environ)
    if embedded:
        paths = [str(stub_prefix() / "bin"), str(Path(sys.executable).parent), env.get("PATH", "")]
        env["PATH"] = os.pathsep.join(paths)
        libs = [sysconfig.get_config_var("LIBDIR") or "", str(pytriton_root().parent.parent / "nvidia_pytriton.libs")]
        env["LD_LIBRARY_PATH"] = os.pathsep.join([p for p in libs if p] + [env.get("LD_LIBRARY_PATH", "")])
        env.pop("PYTHONPATH", None)
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # for any non-isolated Python Triton starts; the stubs: stub_prefix
    # glibc malloc in tritonserver (and the stubs, which inherit this): a large request arrives as
    # many gRPC slices below the dynamic mmap threshold, and their freed chunks stayed in the heap
    # (tritonserver +250 MiB after 4 concurrent 100 MB requests, released only by malloc_trim).
    # A fixed 64 KiB threshold maps those slices and returns them on free; the small trim threshold
    # gives back the heap's free top. An operator's own values win.
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    env.setdefault("MALLOC_TRIM_THRESHOLD_", "65536")
    # torch's OpenMP workers in the python stubs busy-wait after every parallel region by default;
    # the stubs run side by side on few cores, so that spinning took the CPU the other stages needed
    # (pre-processing with its 2 torch threads: 45 CPU ms per image instead of 6 on 2 cores, issue 16,
    # docs/performance.md). Passive waiting sleeps at once. An operator's own value wins.
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # onnxruntime's telemetry (device id + event database in $HOME, events queued for Microsoft's
    # collector) off in the core stubs too; detserve/__init__.py says why. An operator's value wins.
    env.setdefault("ORT_DISABLE_TELEMETRY", "1")
    for var in SECRET_VARIABLES:
        env.pop(var, None)
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
    """One tritonserver: its repository, the public address of its gate, its limits and admin key.

    tritonserver itself listens on Unix sockets in a private runtime directory (detserve/ops/gate.py);
    ``host``/``grpc_port``/``http_port`` are the gate's (nginx) public address; metrics (read-only)
    are served by Triton on ``host:metrics_port``. Model control is always explicit (all models
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
    public: bool = True  # False: no gate of its own (a replica behind a shared gate)
    tritonserver: Path | None = None  # default: the binary inside nvidia-pytriton
    backend_directory: Path | None = None  # default: the python backend of nvidia-pytriton

    def __post_init__(self) -> None:
        for arg in self.extra_args:
            if arg.split("=", 1)[0] in _OWNED_FLAGS:
                raise ServerError(f"{arg.split('=', 1)[0]} is set by detserve and cannot be passed as an extra flag")

    def command(self, runtime: Path) -> list[str]:
        binary = self.tritonserver or (pytriton_root() / "bin" / "tritonserver")
        backends = self.backend_directory or backend_directory()
        return [
            str(binary),
            f"--model-repository={self.repository.resolve()}",
            f"--backend-directory={backends}",
            *triton_listen_args(runtime),
            f"--metrics-address={self.host}",
            f"--metrics-port={self.metrics_port}",
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
            *self.extra_args,
        ]

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"


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


@dataclass
class DrainReport:
    """What ``TritonServer.drain`` did: the ensembles it unloaded, how long it waited, what failed."""

    unloaded: list[str] = field(default_factory=list)
    seconds: float = 0.0
    error: str | None = None


def _ensemble_levels(admin: Any) -> list[list[str]]:
    """The loaded ensembles in unload order: those no other ensemble uses first, then the next level."""
    names = {e.name for e in admin.get_model_repository_index() if e.state == "READY"}
    steps: dict[str, set[str]] = {}
    for name in sorted(names):
        config = admin.model_config(name)
        if config.get("platform") == "ensemble":
            steps[name] = {s["model_name"] for s in config.get("ensemble_scheduling", {}).get("step", [])}
    levels: list[list[str]] = []
    while steps:
        used = set().union(*steps.values())
        level = sorted(n for n in steps if n not in used) or sorted(steps)  # a cycle cannot load; be safe
        levels.append(level)
        for n in level:
            del steps[n]
    return levels


def _wait_unloaded(admin: Any, names: list[str], deadline: float) -> None:
    """Until no version of ``names`` is READY or UNLOADING (its in-flight requests are done)."""
    while True:
        busy = {e.name for e in admin.get_model_repository_index() if e.name in names and e.state in ("READY", "UNLOADING")}
        if not busy:
            return
        if time.monotonic() > deadline:
            raise ServerError(f"drain timed out: {', '.join(sorted(busy))} still busy")
        time.sleep(0.1)


@dataclass
class StubRestart:
    """One reload of a model whose python stub(s) died: what died, how long the reload took, its error."""

    model: str
    instances: list[str]
    at: float  # monotonic seconds, when the watchdog saw the stubs dead
    seconds: float = 0.0
    error: str | None = None


def _children(pid: int) -> dict[int, tuple[str, list[str]]]:
    """``pid``'s child processes: {pid: (state letter, argv)} (argv is empty for a zombie)."""
    out: dict[int, tuple[str, list[str]]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            if int(fields[1]) != pid:
                continue
            args = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
        out[int(entry)] = (fields[0], [a.decode(errors="replace") for a in args if a])
    return out


def stub_identity(args: list[str]) -> tuple[str, str] | None:
    """(model, instance) of a model-instance stub's argv, else None.

    argv: stub, <repository>/<model>/<version>/model.py, shm region, shm sizes (2), parent pid,
    backend dir, ipc handle, instance name, runtime model dir (stub_launcher.cc, r24.10).
    """
    if len(args) < 9 or not args[0].endswith(STUB_BINARY):
        return None
    model = Path(args[1]).parents[1].name
    instance = args[8]
    return (model, instance) if instance != model else None  # the auto-complete stub is named after the model


class StubWatchdog:
    """Reloads a model when one of its python stubs dies (module docstring).

    A stub is dead when tritonserver's child that ran it is a zombie in two checks in a row
    (Triton waits for the stubs it stops itself, so their zombies last microseconds).
    """

    def __init__(
        self,
        server_pid: int,
        url: str,
        interval_s: float = STUB_CHECK_S,
        on_failing: Callable[[dict[str, str]], None] | None = None,
    ) -> None:
        self.server_pid, self.url, self.interval_s = server_pid, url, interval_s
        self.restarts: list[StubRestart] = []
        # models that cannot serve now (stub dead, reload pending or failed) -> why; readiness reads it
        self.failing: dict[str, str] = {}
        self.on_failing = on_failing
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="detserve-stub-watchdog", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=60)

    def _run(self) -> None:
        stubs: dict[int, tuple[str, str]] = {}  # live stubs seen: pid -> (model, instance)
        janitor = StubJanitor()  # the replaced stubs' regions, and replaced stubs that outlive their reload
        suspects: set[int] = set()  # zombies seen once
        handled: set[int] = set()  # dead stubs whose model was reloaded (Triton may never reap them)
        while not self._stop.wait(self.interval_s):
            try:
                children = _children(self.server_pid)
            except OSError:
                continue
            dead: dict[str, list[int]] = {}
            zombies = set()
            for pid, (state, args) in children.items():
                if state == "Z":
                    zombies.add(pid)
                    if pid in stubs and pid not in handled and pid in suspects:
                        dead.setdefault(stubs[pid][0], []).append(pid)
                elif (who := stub_identity(args)) is not None:
                    stubs[pid] = who
            suspects = zombies
            stubs = {p: w for p, w in stubs.items() if p in children}
            handled &= set(children)
            janitor.observe(children, stubs)
            for model, pids in sorted(dead.items()):
                if self._stop.is_set():
                    return
                if self._reload(model, sorted(stubs[p][1] for p in pids)):
                    handled.update(pids)
                    janitor.reloaded(model)
                else:
                    self._stop.wait(5.0)  # and try again

    def _set_failing(self, model: str, reason: str | None) -> None:
        if reason is None:
            self.failing.pop(model, None)
        else:
            self.failing[model] = reason
        if self.on_failing is not None:
            try:
                self.on_failing(dict(self.failing))
            except Exception as e:  # readiness reporting must not stop the watchdog
                log.error("could not publish readiness: %s", e)

    def _reload(self, model: str, instances: list[str]) -> bool:
        from detserve.ops.admin import ModelAdmin

        restart = StubRestart(model, instances, time.monotonic())
        self.restarts.append(restart)
        log.warning("python stub(s) %s of %s died: reloading %s", ", ".join(instances), model, model)
        if model not in self.failing:  # a retry keeps the reason of the failed reload
            self._set_failing(model, f"python stub {', '.join(instances)} died; reloading")
        try:
            with ModelAdmin(self.url, None, timeout_s=300.0) as admin:
                config = admin.model_config(model)  # the served config: keeps a rollout's version policy
                config.setdefault("parameters", {})[RESTART_PARAMETER] = {"string_value": str(len(self.restarts))}
                admin.load_model(model, config=json.dumps(config))
        except Exception as e:
            restart.error = str(e)
            log.error("reloading %s after its stub died failed: %s", model, e)
        restart.seconds = time.monotonic() - restart.at
        self._set_failing(model, None if restart.error is None else f"python stub died and its reload failed: {restart.error}")
        return restart.error is None


class TritonServer:
    """A tritonserver process behind its gate, in its own process group so nothing outlives ``stop()``."""

    def __init__(self, options: ServerOptions) -> None:
        self.options = options
        self.process: subprocess.Popen[bytes] | None = None
        self.gate: Gate | None = None
        self.runtime: Path | None = None
        self.last_drain: DrainReport | None = None
        self.watchdog: StubWatchdog | None = None
        self.shm: ServerShm | None = None  # what this start owns in /dev/shm, and its record
        self.log_path = options.log_file or Path(tempfile.mkstemp(prefix="tritonserver-", suffix=".log")[1])

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
        ports = [("metrics", opts.metrics_port)] + ([("grpc", opts.grpc_port), ("http", opts.http_port)] if opts.public else [])
        for what, port in ports:
            _check_port(opts.host, port, what)
        self.runtime = private_directory()
        env = server_environment(embedded=opts.tritonserver is None)
        self.shm = prepare_shm(opts.extra_args, opts.shm_prefix)  # and clean up after dead servers
        out = open(self.log_path, "wb")  # noqa: SIM115 - handed to the child process
        self.process = subprocess.Popen(
            opts.command(self.runtime), stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        out.close()
        self.shm.record(self.process.pid)
        if opts.public:
            self.gate = Gate(
                GateConfig(
                    self.runtime,
                    opts.host,
                    opts.grpc_port,
                    opts.http_port,
                    (upstream_in(self.runtime),),
                    opts.admin_key,
                    opts.max_request_bytes,
                )
            )
            self.gate.start()
        gate = self.gate
        self.watchdog = StubWatchdog(self.process.pid, self.internal_url, on_failing=gate.set_unready if gate else None)
        self.watchdog.start()

    @property
    def stub_restarts(self) -> list[StubRestart]:
        return list(self.watchdog.restarts) if self.watchdog else []

    @property
    def failing(self) -> dict[str, str]:
        """Models that cannot serve now, with the reason (readiness is false while this is not empty)."""
        return dict(self.watchdog.failing) if self.watchdog else {}

    def wait_ready(self, timeout_s: float = 300.0) -> None:
        import tritonclient.grpc as grpcclient

        deadline = time.monotonic() + timeout_s
        client = grpcclient.InferenceServerClient(self.internal_url)
        try:
            while time.monotonic() < deadline:
                if self.process is None or self.process.poll() is not None:
                    raise ServerError("tritonserver exited during start-up: " + self.errors(), hint=f"full log: {self.log_path}")
                if self.gate is not None and not self.gate.alive:
                    raise ServerError("the gate (nginx) exited during start-up: " + self.gate.errors())
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

    def stop(self, timeout_s: float = EXIT_TIMEOUT_S + 10) -> DrainReport | None:
        """Drain (see ``drain``), stop the gate, SIGTERM, then SIGKILL the whole group if it has not exited."""
        proc = self.process
        if proc is None:
            return None
        if self.watchdog is not None:
            self.watchdog.stop()  # no reload while the server goes down
        report = None
        if proc.poll() is None:
            report = self.drain()
        if self.gate is not None:
            self.gate.stop()
            self.gate = None
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

    def drain(self) -> DrainReport:
        """Unload the ensembles, outermost first, and wait until Triton has unloaded them.

        Triton refuses new requests for an ensemble as soon as its unload starts ("unknown model"
        / "not found": fast and clear) and destroys it only when its in-flight requests are done;
        their composing models stay loaded meanwhile. A drain that fails or times out is logged in
        the report, and SIGTERM follows anyway.
        """
        from detserve.ops.admin import ModelAdmin

        report = DrainReport()
        t0 = time.monotonic()
        deadline = t0 + self.options.drain_timeout_s
        try:
            with ModelAdmin(self.internal_url, None, timeout_s=self.options.drain_timeout_s) as admin:
                for level in _ensemble_levels(admin):
                    for name in level:
                        admin.unload_model(name)
                    report.unloaded += level
                    _wait_unloaded(admin, level, deadline)
        except Exception as e:  # the drain is best effort: SIGTERM still stops the server
            report.error = str(e)
        report.seconds = time.monotonic() - t0
        return report

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
