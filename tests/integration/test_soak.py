"""A short soak (loadtest/soak.py) on the real ``detserve serve``: faults under load, nothing lost outside
their windows, nothing leaked, nothing left after the stop."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from loadtest.soak_faults import FAULTS

SECONDS = 110.0  # the cheap faults and one stub kill (windows of 6-10 s, an 8 s gap before each, 30 s kept quiet at the end)


@pytest.mark.slow
def test_short_soak_loses_nothing_outside_the_fault_windows_and_leaves_nothing(tmp_path: Path) -> None:
    # the command as documented (docs/ops-report.md), through the CLI
    command = [sys.executable, "-m", "detserve.app.cli", "ops-report", "--soak", f"{SECONDS:.0f}s", "--users", "2"]
    command += ["--work", str(tmp_path / "work"), "--out", str(tmp_path / "out")]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=SECONDS + 600)
    data = json.loads((tmp_path / "out" / "soak-report.json").read_text())
    assert proc.returncode == 0 and not data["problems"], proc.stdout[-3000:] + proc.stderr[-3000:]
    md = tmp_path / "out" / "soak-report.md"
    faults = [w["fault"] for w in data["windows"]]
    assert faults == [name for name, _ in FAULTS][: len(faults)] and len(faults) >= 4, faults
    assert data["outside_windows"]["sent"] > 0 and data["outside_windows"]["failed"] == 0
    assert all(w["recovered"] and w["own_requests"]["wrong_outcome"] == 0 for w in data["windows"])
    roles = set(data["roles"]["start"])
    assert {"supervisor", "tritonserver", "nginx master", "nginx worker"} <= roles
    assert any(r.startswith("stub ") for r in roles)
    assert data["shm"]["start"]["regions"] > 0 and data["shm"]["after_stop"]["regions"] == 0
    assert data["left_after_stop"] == []
    assert "failed outside the fault windows: 0" in md.read_text()
