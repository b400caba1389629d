"""The prepared GPU script's CPU half (issue 28, part 4): ``scripts/gpu_serve_check.sh --dry-run`` runs every
step of the device run on the CPU with tiny loads (GPU tests collected, pre-processing bound, the demo build,
the embedded server without a gate, parity vs eager, a 1-2 user sweep with the server-side split, the
Markdown + JSON), so that on the GPU machine only the device part can fail. ~2-3 min: slow."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_serve_check_dry_run(tmp_path: Path) -> None:
    out = tmp_path / "out"
    run = subprocess.run(
        ["bash", "scripts/gpu_serve_check.sh", "--dry-run", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    data = json.loads((out / "gpu_serve_check.json").read_text())
    failed = {name: s.get("error") for name, s in data["steps"].items() if not s["ok"]}
    assert run.returncode == 0 and not failed, f"{failed}\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    steps = data["steps"]
    assert set(steps) >= {"environment", "pytest_gpu", "preprocess", "build", "parity", "load", "targets", "serve"}
    # on a CPU device the pre-processing function is the CPU one, bit for bit
    assert all(r["max_abs_delta"] == 0.0 for r in steps["preprocess"]["modes"].values())
    assert all(not r["failures"] for r in steps["parity"]["images"])
    assert sum(r["matched"] for r in steps["parity"]["images"]) > 0  # the trained demo finds shapes
    served = steps["load"]["served"]
    assert [r["users"] for r in served] == [1, 2] and all(r["requests"] > 0 and not r["errors"] for r in served)
    assert "demo_preprocess" in served[-1]["server_split_ms"]
    md = (out / "gpu_serve_check.md").read_text()
    assert "## Parity" in md and "## Load" in md and "Server-side split" in md
