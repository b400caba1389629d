"""A peer server as a subprocess on loopback, ready once it answers a detection, stopped with all it started.

Each peer runs as ``python -m loadtest.peers.<peer>_peer`` in its own session, with its settings in
``DETSERVE_PEER_CONFIG`` and every side effect kept inside a private temporary folder that is removed
afterwards: Ray's session files and sockets, BentoML's home. Nothing reaches the network: Ray's usage
statistics and BentoML's usage tracking are switched off, and every listening socket is on 127.0.0.1.
Ray's cluster (GCS, raylet) would otherwise run arbitrary code for any local user that connects to it:
it runs with token authentication, the token in a 0600 file of that folder, never on a command line.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

from detserve.errors import ServerError
from loadtest.peers.common import CONFIG_ENV, PeerConfig

ROOT = Path(__file__).resolve().parent.parent.parent
MODULES = {"ray": "loadtest.peers.ray_peer", "litserve": "loadtest.peers.lit_peer", "bentoml": "loadtest.peers.bento_peer"}


def peer_environment(cfg: PeerConfig, workdir: Path) -> dict[str, str]:
    """The peer's environment: its settings, no telemetry, no files outside ``workdir``."""
    token = workdir / "ray-auth-token"
    token.touch(mode=0o600)
    token.write_text(secrets.token_hex(32))
    pythonpath = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {
        **os.environ,
        "PYTHONPATH": pythonpath,
        CONFIG_ENV: cfg.to_json(),
        "DETSERVE_PEER_WORKDIR": str(workdir),
        # the servers' OpenMP setting (detserve/ops/embedded.py): idle threads sleep instead of spinning
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
        "RAY_USAGE_STATS_ENABLED": "0",  # Ray's usage-statistics report (a network call at start)
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token),  # not ~/.ray/auth_token: nothing left in the home folder
        "BENTOML_HOME": str(workdir / "bentoml"),  # not ~/bentoml
        "BENTOML_DO_NOT_TRACK": "True",  # BentoML's usage tracking
    }


class PeerService:
    """Start a peer, wait until ``POST /detect`` answers 200, stop it and every process below it."""

    def __init__(self, cfg: PeerConfig, probe: bytes, startup_timeout_s: float = 300.0, log_path: Path | None = None) -> None:
        self.cfg = cfg
        self.probe = probe  # an image the readiness check sends
        self.startup_timeout_s = startup_timeout_s
        self.log_path = log_path
        self.workdir: Path | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self.started_s = 0.0  # seconds from start to the first answered detection

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.cfg.port}"

    def __enter__(self) -> PeerService:
        # short and private: Ray puts unix sockets in it (a socket path is at most 107 bytes)
        self.workdir = Path(tempfile.mkdtemp(prefix="dsp-", dir="/tmp"))
        log_path = self.log_path or self.workdir / "peer.log"
        command = [sys.executable, "-m", MODULES[self.cfg.peer]]
        t0 = time.monotonic()
        with open(log_path, "wb") as log:  # a file, not a pipe: a full pipe would stall the server
            self.process = subprocess.Popen(
                command, cwd=ROOT, env=peer_environment(self.cfg, self.workdir), stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        try:
            self._wait_ready(log_path)
        except BaseException:
            self.stop()
            raise
        self.started_s = time.monotonic() - t0
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def detect(self, blob: bytes, timeout_s: float = 30.0) -> tuple[int, bytes]:
        """One ``POST /detect``: (HTTP status, body)."""
        request = urllib.request.Request(
            f"{self.url}/detect", data=blob, headers={"Content-Type": "application/octet-stream"}, method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as response:
                return int(response.status), response.read()
        except urllib.error.HTTPError as e:
            return int(e.code), e.read()

    def _wait_ready(self, log_path: Path) -> None:
        assert self.process is not None
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(
                    f"{self.cfg.peer} exited with code {self.process.returncode} while starting:\n{_tail(log_path)}"
                )
            try:
                if self.detect(self.probe, timeout_s=10.0)[0] == 200:
                    return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.5)
        raise ServerError(f"{self.cfg.peer} did not answer a detection within {self.startup_timeout_s:.0f} s:\n{_tail(log_path)}")

    def stop(self, grace_s: float = 20.0) -> None:
        """SIGTERM to the launcher (each shuts its server down), then SIGKILL to whatever of its tree is left."""
        from loadtest.procstats import descendants

        if self.process is not None:
            tree = [(p.pid, _started(p.pid)) for p in descendants(self.process.pid)]
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(timeout=grace_s)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()
            for pid, started in tree:  # daemons the launcher started (Ray's GCS, raylet, workers) that outlived it
                if started is None or _started(pid) != started:  # gone, or the number now names another process
                    continue
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            self.process = None
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None


def _started(pid: int) -> int | None:
    """A process's start time (clock ticks since boot, /proc/PID/stat field 22): with the pid, who it is."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(raw[raw.rfind(")") + 2 :].split()[19])


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
