"""``detserve serve`` as an operator runs it (the real CLI in a subprocess, an admin key file), faults injected.

- tritonserver SIGKILLed: readiness false naming the signal, then it comes back by itself and serves
  (issue 20 part 1); with ``--replicas 2`` a steady client loses no request meanwhile (slow);
- the gate's nginx master SIGKILLed: its orphaned worker goes, a gate with detserve's configuration
  serves the same ports within seconds, the admin key still enforced (part 4);
- after SIGTERM nothing of it listens and no nginx or tritonserver process of it remains (part 4);
- ``nobody`` pre-creating the old state directory ``<tmp>/detserve-<uid>`` does not stop root's
  server (7a); ``--host ::1`` serves end to end (7g).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from clients.grpc_client import Detections, DetectorClient
from detserve.errors import ClientError
from detserve.ops.server import free_port
from tests.host_checks import needs_ipv6, needs_nginx
from tests.unprivileged import run_as_nobody

KEY = "lifecycle-test-key-0123456789abcdef"
MODEL = "demo"
BUDGET = 2_000_000  # `serve --max-request-pixels` of the shared server: above every sample photo
READY_S = 240.0  # a start on the busy 2-core CI machine took 26 s; a restart waits its backoff too


pytestmark = needs_nginx


@pytest.fixture(scope="module")
def demo_repo(demo_copy: Callable[[str], Path]) -> Path:
    return demo_copy("lifecycle_repo")


def _proc_stat(pid: int) -> tuple[str, int, int, str] | None:
    """(comm, ppid, pgid, state) of a process, None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return stat[stat.index("(") + 1 : stat.rindex(")")], int(fields[1]), int(fields[2]), fields[0]


def _processes() -> dict[int, tuple[str, int, int, str]]:
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (st := _proc_stat(int(entry))) is not None and st[3] != "Z":
            out[int(entry)] = st
    return out


def _listening(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.settimeout(1.0)
        return s.connect_ex((host, port)) == 0


@dataclass
class Serve:
    """A ``detserve serve`` subprocess and what it started."""

    proc: subprocess.Popen[str]
    host: str
    grpc_port: int
    http_port: int
    metrics_port: int
    out_path: Path
    seen: set[int] = field(default_factory=set)  # every tritonserver / nginx / stub pid it had

    @property
    def http(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"[{self.host}]:{self.grpc_port}" if ":" in self.host else f"{self.host}:{self.grpc_port}"

    def output(self) -> str:
        return self.out_path.read_text(errors="replace")

    def children(self, comm: str) -> list[int]:
        """Live processes named ``comm`` that the serve process started (its direct children)."""
        pids = sorted(p for p, (c, ppid, _, _) in _processes().items() if ppid == self.proc.pid and c == comm)
        self.seen.update(pids)
        return pids

    def group(self, pgid: int) -> list[int]:
        return sorted(p for p, (_, _, g, _) in _processes().items() if g == pgid)

    def ready(self) -> tuple[int, str]:
        """(status, body) of the gate's HTTP readiness; (0, why) when it does not answer."""
        try:
            with urllib.request.urlopen(self.http + "/v2/health/ready", timeout=5) as r:
                return r.status, r.read().decode(errors="replace")
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode(errors="replace")
        except OSError as e:
            return 0, str(e)

    def wait_ready(self, timeout_s: float = READY_S) -> float:
        """Until the gate answers ready and the serve loop runs (it prints its address once started)."""
        t0 = time.monotonic()
        while self.ready()[0] != 200 or "ready: gRPC" not in self.output():
            assert self.proc.poll() is None, f"detserve serve exited ({self.proc.returncode}):\n{self.output()}"
            assert time.monotonic() - t0 < timeout_s, f"not ready after {timeout_s:.0f} s:\n{self.output()}"
            time.sleep(0.25)
        return time.monotonic() - t0

    def admin_index(self, key: str | None) -> int:
        headers = {"admin-key": key} if key else {}
        req = urllib.request.Request(self.http + "/v2/repository/index", data=b"{}", headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code

    def detect(self, image: bytes) -> Detections:
        with DetectorClient(self.grpc_url, MODEL, timeout_s=60.0, retries=5, backoff_s=0.5) as client:
            return client.detect(image, score_threshold=0.0)

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 90.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def kill_leftovers(self) -> None:
        """Whatever a failed test left running: only processes this serve started."""
        for pid in self.seen:
            st = _proc_stat(pid)
            if st is not None and st[0] in ("tritonserver", "nginx", "triton_python_b"):
                with_suppress_kill(pid)


def with_suppress_kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _key_file(directory: Path, mode: int = 0o600) -> Path:
    path = directory / "admin.key"
    path.write_text(KEY + "\n")
    path.chmod(mode)
    return path


def start_serve(
    repo: Path, workdir: Path, *args: str, host: str = "127.0.0.1", env: dict[str, str] | None = None, key_mode: int = 0o600
) -> Serve:
    ports = [free_port(host), free_port(host), free_port()]  # metrics: IPv4 loopback
    out = workdir / f"serve-{ports[0]}.out"
    base_env = {k: v for k, v in os.environ.items() if k not in ("DETSERVE_ADMIN_KEY", "XDG_RUNTIME_DIR")}
    base_env |= {"DETSERVE_ADMIN_KEY_FILE": str(_key_file(workdir, key_mode)), "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "detserve.app.cli", "serve", "--repository", str(repo), "--host", host]
    command += ["--grpc-port", str(ports[0]), "--http-port", str(ports[1]), "--metrics-port", str(ports[2]), *args]
    with open(out, "w") as f:
        proc = subprocess.Popen(command, stdout=f, stderr=subprocess.STDOUT, text=True, env=base_env | (env or {}))
    return Serve(proc, host, ports[0], ports[1], ports[2], out)


@pytest.fixture(scope="module")
def nobody_tmp() -> Iterator[Path]:
    """A world-writable temporary directory (as /tmp) in which nobody pre-created root's old state directory."""
    tmp = Path(tempfile.mkdtemp(prefix="detserve-sharedtmp-"))  # pytest's own tmp is 0700: nobody cannot enter
    tmp.chmod(0o1777)
    squatted = tmp / f"detserve-{os.getuid()}"
    code = "import os\nos.mkdir(ARGS['path'], 0o755)\nprint(json.dumps(os.stat(ARGS['path']).st_uid))"
    assert run_as_nobody(code, path=str(squatted)) != os.getuid()
    yield tmp
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def serve(demo_repo: Path, nobody_tmp: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serve]:
    """One ``detserve serve`` for the fast tests, started with the old state directory squatted by nobody."""
    workdir = tmp_path_factory.mktemp("serve")
    s = start_serve(demo_repo, workdir, "--max-request-pixels", str(BUDGET), env={"TMPDIR": str(nobody_tmp)})
    try:
        s.wait_ready()
        s.children("tritonserver"), s.children("nginx")
        yield s
    finally:
        s.stop()
        s.kill_leftovers()


@pytest.mark.documents(
    "detserve serve --repository R --host H --grpc-port P --http-port P --metrics-port P --max-request-pixels N"
)
def test_state_directory_squatted_by_nobody_does_not_stop_the_server(
    serve: Serve, nobody_tmp: Path, samples: dict[str, bytes]
) -> None:
    assert serve.proc.poll() is None and serve.ready()[0] == 200
    assert len(serve.detect(samples["chelsea.png"])) > 0
    squatted = nobody_tmp / f"detserve-{os.getuid()}"
    assert list(squatted.iterdir()) == []  # nothing of root's went into nobody's directory


def test_serve_max_request_pixels_reaches_the_models(serve: Serve, samples: dict[str, bytes]) -> None:
    """`detserve serve --max-request-pixels N` as typed: a request declaring more is refused, naming the budget."""
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.zeros((1200, 2000, 3), np.uint8)).save(buf, format="PNG")  # 2.4 M pixels, 7 KB
    with pytest.raises(ClientError) as e:
        serve.detect(buf.getvalue())
    assert f"over the per-request budget of {BUDGET} pixels" in e.value.message, e.value.message
    assert len(serve.detect(samples["chelsea.png"])) > 0


def test_nginx_master_killed_gate_comes_back_on_the_same_ports(serve: Serve, samples: dict[str, bytes]) -> None:
    [master] = serve.children("nginx")
    workers = [p for p in serve.group(master) if p != master]
    assert workers, "nginx runs its workers in the master's process group"
    os.kill(master, signal.SIGKILL)
    t0 = time.monotonic()
    while True:  # a new master, a new group: the old workers gone
        new = [p for p in serve.children("nginx") if p != master]
        if new and not any(_proc_stat(w) for w in workers) and serve.ready()[0] == 200:
            break
        assert time.monotonic() - t0 < 30, f"no fresh gate 30 s after the kill:\n{serve.output()}"
        time.sleep(0.2)
    back_s = time.monotonic() - t0
    assert back_s < 30
    assert serve.admin_index(None) == 403 and serve.admin_index("wrong-" + KEY) == 403
    assert serve.admin_index(KEY) == 200
    assert len(serve.detect(samples["chelsea.png"])) > 0
    assert "killed by SIGKILL" in serve.output()
    print(f"gate back after {back_s:.1f} s")


def test_tritonserver_killed_comes_back_by_itself(serve: Serve, samples: dict[str, bytes]) -> None:
    [triton] = serve.children("tritonserver")
    stubs = [p for p in serve.group(triton) if p != triton]
    serve.seen.update(stubs)
    os.kill(triton, signal.SIGKILL)
    t0 = time.monotonic()
    status, body = serve.ready()
    while status != 503:  # 502 for the moment before the serve loop looks (every 0.5 s)
        assert status != 200 or time.monotonic() - t0 < 5, "readiness still true 5 s after tritonserver was killed"
        assert time.monotonic() - t0 < 30, f"readiness {status} {body}, not 503, 30 s after tritonserver was killed"
        time.sleep(0.1)
        status, body = serve.ready()
    assert "tritonserver killed by SIGKILL" in body, body  # the gate answers, naming why
    unready_s = time.monotonic() - t0
    back_s = serve.wait_ready()
    [new] = serve.children("tritonserver")
    assert new != triton
    assert len(serve.detect(samples["chelsea.png"])) > 0
    assert not [p for p in stubs if _proc_stat(p)], "the dead server's python stubs were not released"
    out = serve.output()
    assert "tritonserver killed by SIGKILL" in out and "restart 1" in out, out
    print(f"readiness 503 after {unready_s:.1f} s, ready again {back_s:.1f} s later")


def test_sigterm_leaves_nothing_running_or_listening(serve: Serve) -> None:
    pids = serve.children("tritonserver") + serve.children("nginx")
    groups = {pid: _proc_stat(pid) for pid in pids}
    members = {m for pid, st in groups.items() if st for m in serve.group(st[2])}
    assert serve.stop() == 0, serve.output()
    alive = [p for p in members | serve.seen if _proc_stat(p)]
    assert alive == [], f"still running after detserve serve stopped: {alive}"
    ports = (serve.grpc_port, serve.http_port, serve.metrics_port)
    assert [p for p in ports if _listening(serve.host, p)] == []


def test_admin_key_file_readable_by_others_is_refused(demo_repo: Path, tmp_path: Path) -> None:
    s = start_serve(demo_repo, tmp_path, key_mode=0o644)
    try:
        rc = s.proc.wait(timeout=60)
    finally:
        s.stop()
    out = s.output()
    assert rc == 1, out
    assert "admin.key" in out and "0644" in out and "chmod 600" in out, out
    assert "Traceback" not in out


@needs_ipv6
def test_serve_on_ipv6_loopback(demo_repo: Path, tmp_path: Path, samples: dict[str, bytes]) -> None:
    s = start_serve(demo_repo, tmp_path, host="::1")
    try:
        s.wait_ready()
        assert len(s.detect(samples["chelsea.png"])) > 0
        assert s.admin_index(None) == 403 and s.admin_index(KEY) == 200
        # metrics stay on IPv4 loopback (Triton 2.51 does not answer on [::1]; detserve/ops/server.py)
        with urllib.request.urlopen(f"http://127.0.0.1:{s.metrics_port}/metrics", timeout=10) as r:
            assert r.status == 200
    finally:
        s.children("tritonserver"), s.children("nginx")
        s.stop()
        s.kill_leftovers()


@pytest.mark.slow
@pytest.mark.documents("detserve serve --repository R --host H --grpc-port P --http-port P --metrics-port P --replicas 2")
def test_replica_tritonserver_killed_loses_no_request(demo_repo: Path, tmp_path: Path, samples: dict[str, bytes]) -> None:
    """With --replicas 2 the gate sends to the other replica while the killed one restarts."""
    s = start_serve(demo_repo, tmp_path, "--replicas", "2")
    results: list[Detections | ClientError] = []
    stop = threading.Event()

    def steady() -> None:
        with DetectorClient(s.grpc_url, MODEL, timeout_s=60.0, retries=8, backoff_s=0.25) as client:
            while not stop.is_set():
                try:
                    results.append(client.detect(samples["chelsea.png"], score_threshold=0.0))
                except ClientError as e:
                    results.append(e)

    worker = threading.Thread(target=steady)
    try:
        s.wait_ready()
        worker.start()
        time.sleep(3.0)
        victim = s.children("tritonserver")[0]
        s.seen.update(s.group(victim))
        os.kill(victim, signal.SIGKILL)
        t0 = time.monotonic()
        while s.ready()[0] == 200 and time.monotonic() - t0 < 30:
            time.sleep(0.1)
        s.wait_ready()  # the killed replica is back
        time.sleep(3.0)
        stop.set()
        worker.join(timeout=120)
        assert len(s.children("tritonserver")) == 2
    finally:
        stop.set()
        s.children("tritonserver"), s.children("nginx")
        s.stop()
        s.kill_leftovers()
    failed = [r for r in results if isinstance(r, ClientError)]
    report = {"requests": len(results), "failed": len(failed), "errors": sorted({str(e) for e in failed})[:5]}
    print(json.dumps(report))
    assert results and not failed, report
    assert "tritonserver killed by SIGKILL" in s.output()
