"""TensorRT engines checked against the server's TensorRT before Triton loads them (detserve/ops/plans.py),
with fabricated records: no TensorRT and no GPU needed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from detserve.errors import ServerError
from detserve.ops.plans import check_plans, same_release, serving_tensorrt


def _repository(root: Path, record: dict[str, object] | None, build_tools: dict[str, str] | None = None) -> Path:
    """demo (python models) + demo_core version 1 with a fake engine and the records given."""
    repo = root / "repo"
    (repo / "demo" / "1").mkdir(parents=True)
    version = repo / "demo_core" / "1"
    version.mkdir(parents=True)
    (version / "model.plan").write_bytes(b"not an engine")
    if record is not None:
        (version / "model.plan.json").write_text(json.dumps(record))
    if build_tools is not None:
        (version / "build.json").write_text(json.dumps({"tools": build_tools}))
    return repo


def _triton(root: Path, *libraries: str) -> tuple[Path, Path]:
    """An external Triton's backends folder and a library folder holding ``libraries`` (empty files)."""
    (root / "backends" / "tensorrt").mkdir(parents=True)
    lib = root / "lib"
    lib.mkdir()
    for name in libraries:
        (lib / name).touch()
    return root / "backends", lib


def test_ngc_24_10_refuses_an_engine_of_the_tensorrt_extra(tmp_path: Path) -> None:
    """The case of issue 28: NGC 24.10 ships TensorRT 10.5; the builder's extra installs >= 10.13.2."""
    repo = _repository(tmp_path, {"tensorrt_version": "10.13.2.6", "gpu_name": "NVIDIA H100 80GB HBM3"})
    backends, lib = _triton(tmp_path, "libnvinfer.so.10", "libnvinfer.so.10.5.0", "libnvinfer_plugin.so.10.5.0")
    serving = serving_tensorrt(backends, (lib,))
    assert serving is not None and serving.version == "10.5.0" and serving.library == lib / "libnvinfer.so.10.5.0"
    with pytest.raises(
        ServerError, match=r"demo_core version 1: .*TensorRT 10\.13\.2\.6, but this server's TensorRT is 10\.5\.0"
    ) as e:
        check_plans(repo, serving)
    assert "engine-builder" in (e.value.hint or "")


def test_the_same_release_passes_and_build_json_is_the_fallback_record(tmp_path: Path) -> None:
    backends, lib = _triton(tmp_path, "libnvinfer.so.10.13.2")
    serving = serving_tensorrt(backends, (lib,))
    assert serving is not None
    repo = _repository(tmp_path / "a", {"tensorrt_version": "10.13.2.6"})
    assert [p.model for p in check_plans(repo, serving)] == ["demo_core"]
    older = _repository(tmp_path / "b", None, {"torch": "2.14.1", "tensorrt-cu13": "10.16.0.72"})
    with pytest.raises(ServerError, match=r"built with TensorRT 10\.16\.0\.72, but this server's TensorRT is 10\.13\.2"):
        check_plans(older, serving)
    unrecorded = _repository(tmp_path / "c", None)
    with pytest.raises(ServerError, match="no record of the TensorRT version"):
        check_plans(unrecorded, serving)
    assert same_release("10.5.0.18", "10.5.0") and not same_release("10.5.0", "10.5") and not same_release("10.5.1.2", "10.5.0")


def test_serve_refuses_before_starting_anything(tmp_path: Path) -> None:
    """Through TritonServer.start: the embedded server (no tensorrt backend), then an external one whose
    TensorRT differs; nothing is spawned either time."""
    from detserve.ops.server import ServerOptions, TritonServer

    repo = _repository(tmp_path, {"tensorrt_version": "10.13.2.6"})
    embedded = TritonServer(ServerOptions(repository=repo))
    with pytest.raises(ServerError, match=r"TensorRT engines \(demo_core version 1\).*embedded tritonserver"):
        embedded.start()
    assert embedded.process is None and not embedded.log_path.exists()  # a failed start leaves no log behind
    backends, _ = _triton(tmp_path, "libnvinfer.so.10.5.0")
    (backends / "tensorrt" / "libnvinfer.so.10.5.0").touch()  # as a self-contained backend folder carries it
    # an external server that passes the path checks (an executable binary, a python backend): refused for its engines
    (backends / "python").mkdir()
    (backends / "python" / "libtriton_python.so").touch()
    (tmp_path / "tritonserver").write_text("#!/bin/sh\nexit 1\n")
    (tmp_path / "tritonserver").chmod(0o755)
    external = TritonServer(ServerOptions(repository=repo, tritonserver=tmp_path / "tritonserver", backend_directory=backends))
    with pytest.raises(ServerError, match=r"TensorRT 10\.13\.2\.6, but this server's TensorRT is 10\.5\.0"):
        external.start()
    assert external.process is None
    assert check_plans(tmp_path / "backends", None) == []  # no engines: nothing to check, whatever the server
