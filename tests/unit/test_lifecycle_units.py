"""Issue 20's small lifecycle findings without a server: exit messages, backoff, IPv6 port checks,
metrics on loopback, the key file's mode, the private base directory."""

from __future__ import annotations

import os
import pwd
import socket
from pathlib import Path

import pytest

from detserve.errors import ServerError
from detserve.ops.admin import AdminKeyError, admin_key
from detserve.ops.restarts import Backoff, describe_exit
from detserve.ops.rundir import check_private
from detserve.ops.server import ServerOptions, TritonServer
from detserve.ops.server_options import check_port
from tests.host_checks import needs_ipv6

KEY = "unit-lifecycle-key-0123456789"


def test_exit_names_the_signal() -> None:
    assert describe_exit("tritonserver", -11) == "tritonserver killed by SIGSEGV"
    assert describe_exit("tritonserver", -9) == "tritonserver killed by SIGKILL"
    assert describe_exit("nginx", 1) == "nginx exited with code 1"


def test_errors_leave_out_cpu_only_start_up_noise(tmp_path: Path) -> None:
    log = tmp_path / "triton.log"
    log.write_text(
        'E1207 04:19:28.791067 1 server.cc:241] "CudaDriverHelper has not been initialized."\n'
        "Error: Failed to initialize NVML\n"
        'E1207 04:19:29.000000 1 model_lifecycle.cc:1] "failed to load demo_core"\n'
    )
    errors = TritonServer(ServerOptions(tmp_path, log_file=log)).errors()
    assert "demo_core" in errors and "Cuda" not in errors and "NVML" not in errors


def test_backoff_doubles_to_a_cap_and_resets_after_a_stable_run() -> None:
    b = Backoff(first_s=1.0, max_s=5.0, stable_s=60.0)
    assert [b.next_delay(0.0) for _ in range(5)] == [1.0, 2.0, 4.0, 5.0, 5.0]
    b.up(100.0)
    assert b.next_delay(130.0) == 5.0  # up 30 s: still a crash loop
    b.up(200.0)
    assert b.next_delay(300.0) == 1.0  # up 100 s: healthy, start again from the first delay


@needs_ipv6
def test_port_check_on_ipv6() -> None:
    with socket.socket(socket.AF_INET6) as s:
        s.bind(("::1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(ServerError, match=f"grpc port {port} on ::1 is already in use"):
            check_port("::1", port, "grpc")
    check_port("::1", port, "grpc")  # free now: no false "in use" (the check was AF_INET only)


def test_metrics_on_loopback_unless_asked(tmp_path: Path) -> None:
    runtime = tmp_path / "run"
    assert "--metrics-address=127.0.0.1" in ServerOptions(tmp_path, host="0.0.0.0").command(runtime)
    assert "--metrics-address=127.0.0.1" in ServerOptions(tmp_path, host="::1").command(runtime)
    asked = ServerOptions(tmp_path, host="0.0.0.0", metrics_host="0.0.0.0")
    assert "--metrics-address=0.0.0.0" in asked.command(runtime)
    assert ServerOptions(tmp_path, host="::1", grpc_port=9001).grpc_url == "[::1]:9001"


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_key_file_others_can_read_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, mode: int) -> None:
    path = tmp_path / "admin.key"
    path.write_text(KEY + "\n")
    path.chmod(mode)
    monkeypatch.delenv("DETSERVE_ADMIN_KEY", raising=False)
    monkeypatch.setenv("DETSERVE_ADMIN_KEY_FILE", str(path))
    with pytest.raises(AdminKeyError) as e:
        admin_key()
    assert str(path) in e.value.message and f"{mode:04o}" in e.value.message
    assert e.value.hint == f"chmod 600 {path}"
    path.chmod(0o600)
    assert admin_key() == KEY
    path.chmod(0o400)
    assert admin_key() == KEY


def test_private_base_refuses_what_another_user_or_everyone_can_use(tmp_path: Path) -> None:
    mine = tmp_path / "mine"
    mine.mkdir(mode=0o700)
    check_private(mine)
    mine.chmod(0o777)
    with pytest.raises(ServerError, match="not a private directory"):
        check_private(mine)
    if os.geteuid() == 0:  # a directory pre-created by another user (issue 20, 7a)
        theirs = tmp_path / "theirs"
        theirs.mkdir(mode=0o700)
        os.chown(theirs, pwd.getpwnam("nobody").pw_uid, -1)
        with pytest.raises(ServerError, match="owner uid"):
            check_private(theirs)
