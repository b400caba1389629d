"""The launcher: readiness, clear start-up errors, clean stop with no stub left behind."""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

import pytest

from detserve.errors import ServerError
from detserve.ops import stubshm
from detserve.ops.server import ServerOptions, TritonServer, free_port, running_server


def _stub_pids(prefix: str) -> set[int]:
    """Running stubs of one server, told apart by its /dev/shm prefix: other servers may run beside the suite."""
    return {pid for pid, state in stubshm.stub_processes(prefix).items() if state not in ("Z", "X")}


def _copy_model(repository: Path, dest: Path, name: str) -> None:
    for suffix in ("", "_preprocess", "_core", "_postprocess"):
        shutil.copytree(repository / f"{name}{suffix}", dest / f"{name}{suffix}")


def test_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        opts = ServerOptions(tmp_path, grpc_port=port, http_port=free_port(), metrics_port=free_port())
        with pytest.raises(ServerError, match=f"grpc port {port} on 127.0.0.1 is already in use"):
            TritonServer(opts).start()


def test_missing_repository(tmp_path: Path) -> None:
    with pytest.raises(ServerError, match="model repository not found"):
        TritonServer(ServerOptions(tmp_path / "nope")).start()


def test_model_that_fails_to_load_reports_tritons_message(repository: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    _copy_model(repository, repo, "ssdlite")
    (repo / "ssdlite_core" / "1" / "model.onnx").write_bytes(b"not an onnx file")
    with pytest.raises(ServerError) as e, running_server(repo):
        pass
    assert "ssdlite_core" in e.value.message
    assert "tritonserver exited with code 1 during start-up" in e.value.message, e.value.message


def test_stop_leaves_no_stub_processes(repository: Path, tmp_path: Path, samples: dict[str, bytes]) -> None:
    from clients.grpc_client import DetectorClient

    repo = tmp_path / "repo"
    _copy_model(repository, repo, "ssdlite")
    with running_server(repo) as server:
        prefix = server.options.shm_prefix
        with DetectorClient(server.options.grpc_url, "ssdlite") as client:
            assert len(client.detect(samples["chelsea.png"], score_threshold=0.0)) > 0
        assert len(_stub_pids(prefix)) >= 3  # preprocess, core, postprocess
    assert _stub_pids(prefix) == set()
