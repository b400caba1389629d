"""The CLI as a user runs it: `detserve detect` against the live server, JSON and drawings."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from detserve.ops.server import TritonServer


def _detserve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "detserve.app.cli", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.documents("detserve detect P --model M --url U --score-threshold 0.3 --max-det 20 --json --draw D")
def test_detect_prints_json_and_draws(server: TritonServer, samples: dict[str, bytes], tmp_path: Path) -> None:
    paths = []
    for name in ("astronaut.jpg", "camera.png"):
        (tmp_path / name).write_bytes(samples[name])
        paths.append(str(tmp_path / name))
    drawn = tmp_path / "drawn"
    proc = _detserve(
        "detect", *paths, "--model", "ssdlite", "--url", server.options.grpc_url,
        "--score-threshold", "0.3", "--max-det", "20", "--json", "--draw", str(drawn),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert [r["image"] for r in report] == paths
    for item in report:
        assert 0 < item["num_detections"] <= 20
        assert all(s >= 0.3 for s in item["scores"])
    assert sorted(p.name for p in drawn.iterdir()) == ["astronaut.png", "camera.png"]


def test_detect_reports_a_bad_file_and_exits_1(server: TritonServer, samples: dict[str, bytes], tmp_path: Path) -> None:
    good, bad = tmp_path / "good.jpg", tmp_path / "bad.jpg"
    good.write_bytes(samples["astronaut.jpg"])
    bad.write_bytes(b"garbage")
    proc = _detserve("detect", str(good), str(bad), "--model", "ssdlite", "--url", server.options.grpc_url)
    assert proc.returncode == 1
    assert "good.jpg:" in proc.stdout and "detections" in proc.stdout
    assert "bad.jpg: error:" in proc.stderr and "not a decodable image" in proc.stderr


def test_unknown_model_and_no_server_are_clear_errors(server: TritonServer, samples: dict[str, bytes], tmp_path: Path) -> None:
    img = tmp_path / "a.jpg"
    img.write_bytes(samples["astronaut.jpg"])
    proc = _detserve("detect", str(img), "--model", "nope", "--url", server.options.grpc_url)
    assert proc.returncode == 1 and "model 'nope' is not ready" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = _detserve("detect", str(img), "--model", "ssdlite", "--url", "127.0.0.1:1")
    assert proc.returncode == 1 and "no Triton server answers" in proc.stderr
