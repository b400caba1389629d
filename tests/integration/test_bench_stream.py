"""`detserve bench-stream` end to end with tiny durations (slow): one and two live streams on the demo detector,
the single-image capacity and the single-image p99 at each N's load beside them, every column of the table filled
(issue 25 part 8)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.documents("detserve bench-stream --repository R --streams 1 2 --seconds S --out O")
def test_bench_stream_measures_each_stream_count(demo_copy: Callable[[str], Path], tmp_path: Path) -> None:
    repo, out = demo_copy("bench_stream"), tmp_path / "bench"
    cmd = [sys.executable, "-m", "detserve.app.cli", "bench-stream", "--repository", str(repo), "--streams", "1", "2"]
    done = subprocess.run([*cmd, "--seconds", "4", "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((out / "bench_stream.json").read_text())
    assert results["capacity"]["images_per_s"] > 0
    assert [r["streams"] for r in results["rows"]] == [1, 2]
    for row in results["rows"]:
        assert len(row["per_stream_fps"]) == row["streams"] and min(row["per_stream_fps"]) > 0
        assert row["total_fps"] > 0 and row["avg_batch"] >= 1.0 and row["failed"] == 0
        assert row["latency_p99_ms"] >= row["latency_p50_ms"] > 0
        # the p99 target's reference: single images with as many users as streams, in the same run
        assert row["single"]["users"] == row["streams"] and row["single"]["latency_p99_ms"] > 0
    assert "H.264 CRF 23" in results["source"] and "--live" in results["source"]
    assert "| 2 |" in (out / "bench_stream.md").read_text()
