"""No silent random weights (issue 24, part 6): ``detserve build`` without ``--checkpoint`` is refused
unless ``--random-weights`` says the untrained weights are meant (the build itself: tests/integration/test_labels_health.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def _build(*args: str, repo: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "detserve.app.cli", "build", "ssdlite320_mobilenet_v3_large", "--repository", str(repo), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_build_without_weights_is_refused_with_the_way_out(tmp_path: Path) -> None:
    proc = _build("--num-classes", "3", repo=tmp_path / "repo")
    assert proc.returncode == 1, proc.stderr
    assert "error: no --checkpoint: the detector would be built with untrained random weights" in proc.stderr
    assert "--random-weights" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "repo").exists()  # refused before anything is written


def test_random_weights_and_a_checkpoint_contradict(tmp_path: Path) -> None:
    ckpt = tmp_path / "w.pt"
    ckpt.write_bytes(b"")
    proc = _build("--checkpoint", str(ckpt), "--random-weights", repo=tmp_path / "repo")
    assert proc.returncode == 1 and "contradict" in proc.stderr, proc.stderr
