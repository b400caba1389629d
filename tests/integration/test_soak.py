"""A short soak (detserve/app/soak.py) on the real ``detserve serve``: faults under load, nothing lost outside
their windows, nothing leaked, nothing left after the stop."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from detserve.app.soak import run_soak
from detserve.app.soak_faults import FAULTS

SECONDS = 110.0  # the cheap faults and one stub kill (windows of 6-10 s, an 8 s gap before each, 30 s kept quiet at the end)


@pytest.mark.slow
def test_short_soak_loses_nothing_outside_the_fault_windows_and_leaves_nothing(tmp_path: Path) -> None:
    md, problems = run_soak(tmp_path / "work", tmp_path / "out", SECONDS, users=2)
    data = json.loads((tmp_path / "out" / "soak-report.json").read_text())
    assert problems == data["problems"]
    assert not problems, "\n".join(problems)
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
