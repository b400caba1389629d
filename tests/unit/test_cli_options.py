"""Build options that only `detserve build --help` shows, typed as a user types them: each refusal is one
clear message (no traceback) before anything is exported or written. The options that need a build or a
server are typed in tests/integration/test_cli_options.py (slow)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BUILD = ["build", "ssdlite320_mobilenet_v3_large", "--random-weights", "--num-classes", "3"]


def _build(repo: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "detserve.app.cli", *BUILD, "--repository", str(repo), *args],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def _cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--device", "gpu"], "--device gpu needs --target python-torch, not python-onnxruntime"),
        (["--device", "gpu", "--target", "tensorrt"], "--device gpu needs --target python-torch, not tensorrt"),
        (["--device", "tpu", "--target", "python-torch"], "device must be one of cpu, gpu, got 'tpu'"),
        (["--target", "python-tensorflow"], "unknown target 'python-tensorflow'"),
        (["--postprocess-on-gpu"], "post-processing on the GPU needs --target tensorrt"),
        (["--precision", "fp16"], "--precision/--calibration-images apply to --target tensorrt, not python-onnxruntime"),
        (["--calibration-images", "."], "--precision/--calibration-images apply to --target tensorrt"),
        (["--target", "python-torch", "--fused-out", "fused"], "the fused CPU layout runs the cores in onnxruntime"),
        (["--max-batch-size", "0"], "max_batch_size must be >= 1, got 0"),
    ],
)
def test_build_refuses_options_of_another_target_before_writing(tmp_path: Path, args: list[str], message: str) -> None:
    repo = tmp_path / "repo"
    proc = _build(repo, *args)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"error: {message}" in proc.stderr and "Traceback" not in proc.stderr
    assert not repo.exists(), sorted(p.name for p in repo.iterdir())


@pytest.mark.skipif(_cuda(), reason="this machine has a CUDA GPU: --device gpu builds (tests/integration)")
def test_build_device_gpu_without_a_gpu_is_refused_naming_why(tmp_path: Path) -> None:
    """Before: the build wrote KIND_GPU configs (9 s) that this machine's server then refused to load
    ("kind KIND_GPU but no GPUs are available"), its artifact never run on a GPU."""
    repo = tmp_path / "repo"
    proc = _build(repo, "--target", "python-torch", "--device", "gpu")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "error: --device gpu: torch sees no CUDA GPU on this machine" in proc.stderr
    assert "hint:" in proc.stderr and "Traceback" not in proc.stderr
    assert not repo.exists()
