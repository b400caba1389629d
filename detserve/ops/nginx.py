"""The gate's nginx process: started from a ``GateConfig`` (``gate.py``), reloaded on a change, stopped."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path

from detserve.errors import ServerError
from detserve.ops.gate import GateConfig, render_config


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


class Gate:
    """An nginx process generated from a ``GateConfig``; ``update`` rewrites the config and reloads."""

    def __init__(self, config: GateConfig) -> None:
        self.config = config
        self.process: subprocess.Popen[bytes] | None = None
        self.conf_path = config.workdir / "nginx.conf"

    def _write(self) -> None:
        tmp = self.conf_path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(render_config(self.config))
        os.replace(tmp, self.conf_path)

    def start(self, timeout_s: float = 15.0) -> None:
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
                self.stop()
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
        from dataclasses import replace

        self.config = replace(self.config, **changes)  # type: ignore[arg-type]
        self._write()
        if self.alive and self.process is not None:
            os.kill(self.process.pid, signal.SIGHUP)  # graceful: old workers finish their requests

    def stop(self, timeout_s: float = 10.0) -> None:
        proc = self.process
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGQUIT)  # graceful: in-flight requests finish
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.process = None
