"""The gate's nginx process: started from a ``GateConfig`` (``gate.py``), reloaded on a change, stopped.

nginx runs in a process group of its own (master and workers). Found in an attack test: a SIGKILLed
master left its worker serving the ports with the old configuration (readiness no longer updated),
every restart failed "Address already in use", and the worker outlived ``detserve serve``. So the
whole group goes together -- on stop, and whenever the master is found dead -- and a restart waits
until the group is empty and the ports are free before it binds them again.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Mapping
from pathlib import Path

from detserve.errors import ServerError
from detserve.ops.gate import GateConfig, render_config
from detserve.ops.restarts import Backoff, Restart, describe_exit

GONE_TIMEOUT_S = 10.0  # a SIGKILLed group is gone in milliseconds; waiting longer means another owner


def nginx_binary() -> str:
    path = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if path is None:
        raise ServerError(
            "nginx is not installed: detserve's gate (the public address in front of tritonserver) needs it",
            hint="apt-get install nginx-light (scripts/setup.sh does this as root)",
        )
    return path


def _port_open(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def _port_free(host: str, port: int) -> bool:
    """Whether nginx could bind ``port`` now (it sets SO_REUSEADDR too, so TIME_WAIT does not count)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes in process group ``pgid``."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            out.append(int(entry))
    return out


def kill_group(pgid: int, timeout_s: float = GONE_TIMEOUT_S) -> bool:
    """SIGKILL every process of group ``pgid`` until none is left; False if some outlived ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while members := group_members(pgid):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
        if time.monotonic() > deadline:
            return not members
        time.sleep(0.02)
    return True


class Gate:
    """An nginx process generated from a ``GateConfig``; ``update`` rewrites the config and reloads."""

    def __init__(self, config: GateConfig) -> None:
        self.config = config
        self.process: subprocess.Popen[bytes] | None = None
        self.conf_path = config.workdir / "nginx.conf"
        self.restarts: list[Restart] = []
        self._backoff = Backoff(first_s=0.5, max_s=10.0)
        self._retry_at: float | None = None
        # the watchdog thread reloads readiness while the serve loop may restart nginx
        self._lock = threading.RLock()

    def _write(self) -> None:
        tmp = self.conf_path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(render_config(self.config))
        os.replace(tmp, self.conf_path)

    def start(self, timeout_s: float = 15.0) -> None:
        with self._lock:
            self._end_group()
            self._wait_ports_free(timeout_s)
            self._start(timeout_s)

    def _wait_ports_free(self, timeout_s: float) -> None:
        cfg = self.config
        deadline = time.monotonic() + timeout_s
        while busy := [p for p in (cfg.grpc_port, cfg.http_port) if not _port_free(cfg.host, p)]:
            if time.monotonic() > deadline:
                raise ServerError(
                    f"the gate's port(s) {', '.join(map(str, busy))} on {cfg.host} are held by another process",
                    hint="stop what listens there (ss -ltnp), or serve on other ports",
                )
            time.sleep(0.1)

    def _start(self, timeout_s: float) -> None:
        for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (self.config.workdir / sub).mkdir(mode=0o700, exist_ok=True)
        self._write()
        log = open(self.config.workdir / "nginx-stderr.log", "wb")  # noqa: SIM115 - handed to the child
        self.process = subprocess.Popen(
            [nginx_binary(), "-p", str(self.config.workdir), "-c", str(self.conf_path), "-g", "daemon off;"],
            stdout=subprocess.DEVNULL,
            stderr=log,
            start_new_session=True,
            env={"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin")},
        )
        log.close()
        deadline = time.monotonic() + timeout_s
        while not (_port_open(self.config.host, self.config.grpc_port) and _port_open(self.config.host, self.config.http_port)):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self._end_group()
                raise ServerError(f"the gate (nginx) did not start on {self.config.host}: {self.errors()}")
            time.sleep(0.05)

    def errors(self) -> str:
        texts = []
        for name in ("nginx-stderr.log", "nginx-error.log"):
            with contextlib.suppress(OSError):
                texts.append((self.config.workdir / name).read_text(errors="replace").strip())
        return "\n".join(t for t in texts if t)[-2000:] or "(no nginx log)"

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def set_unready(self, reasons: Mapping[str, str]) -> None:
        """Readiness false while ``reasons`` (model -> why) is not empty; reloads nginx on a change."""
        unready = tuple(sorted(reasons.items()))
        if unready == self.config.unready:
            return
        self.update(unready=unready)

    def update(self, **changes: object) -> None:
        """Rewrite the config; a live master reloads it, a dead one's restart (``supervise``) starts from it."""
        from dataclasses import replace

        with self._lock:
            self.config = replace(self.config, **changes)  # type: ignore[arg-type]
            self._write()
            if self.alive and self.process is not None:
                os.kill(self.process.pid, signal.SIGHUP)  # graceful: old workers finish their requests

    def supervise(self) -> str | None:
        """One step of keeping the gate up (the serve loop calls it): a dead master's group is killed at
        once (no orphaned worker serves a stale config), then nginx starts again on the same ports,
        with backoff while that fails. Returns a line for the operator when something happened."""
        with self._lock:
            proc = self.process
            now = time.monotonic()
            if proc is None or (proc.poll() is None and self._retry_at is None):
                return None
            if self._retry_at is None:  # just found dead
                why = describe_exit("the gate (nginx master)", proc.returncode)
                self._end_group()
                self.restarts.append(Restart(why, now))
                self._retry_at = now
            if now < self._retry_at:
                return None
            try:
                self._wait_ports_free(GONE_TIMEOUT_S)
                self._start(15.0)
            except ServerError as e:
                self.restarts[-1].error = e.message
                self._retry_at = now + self._backoff.next_delay(now)
                self.process = proc  # still dead: the next look retries
                return f"{self.restarts[-1].reason}; restart {len(self.restarts)} failed, retrying: {e.message}"
            self._retry_at = None
            self._backoff.up(now)
            restart = self.restarts[-1]
            restart.seconds = time.monotonic() - restart.at
            return f"{restart.reason}: its process group was killed, gate serving again in {restart.seconds:.1f} s"

    def _end_group(self) -> None:
        """Kill what is left of the current nginx process group (master, workers) and reap the master."""
        proc = self.process
        if proc is None:
            return
        if not kill_group(proc.pid):
            raise ServerError(f"nginx processes of group {proc.pid} survived SIGKILL: {group_members(proc.pid)}")
        with contextlib.suppress(ProcessLookupError):
            proc.kill()  # a master outside its group (cannot happen with start_new_session; cheap to be sure)
        proc.wait()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Graceful (SIGQUIT: in-flight requests finish), then whatever is left of the group is killed."""
        with self._lock:
            proc = self.process
            if proc is None:
                return
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGQUIT)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=timeout_s)
            self._end_group()
            self.process = None
            self._retry_at = None
