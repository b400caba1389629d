"""`detserve build hf --checkpoint DIR` as a user types it: a save_pretrained folder built, served and compared.

The build record used to open the folder as a file (IsADirectoryError) and the eager reference
refused a checkpoint that is not a file, so the documented command never completed (issue 21).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from detserve.hashing import folder_sha256
from detserve.ops.server import running_server

# slow (CI budget: 36 s): the DETR family's served parity stays in the fast set (tests/integration/parity_table.py)
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="the DETR family needs the 'transformers' extra"),
]


def _detserve(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "detserve.app.cli", *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.documents("detserve build hf --checkpoint DIR --repository R --name N")
def test_build_hf_from_a_save_pretrained_folder_serves_and_compares(tmp_path: Path, samples: dict[str, bytes]) -> None:
    from detserve.families import family

    model = family("detr").build("detr_tiny", 5, None, {}, seed=3)  # seeded: scores spread over 0..1
    ckpt = tmp_path / "my-detr"
    model.save_pretrained(ckpt)
    model.detserve_processor.save_pretrained(ckpt)
    repo = tmp_path / "repo"
    proc = _detserve("build", "hf", "--checkpoint", str(ckpt), "--repository", str(repo), "--name", "hfdetr")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    record = json.loads(next(repo.glob("hfdetr*/1/build.json")).read_text())
    assert record["checkpoint_kind"] == "folder" and record["checkpoint_sha256"] == folder_sha256(ckpt)

    images = tmp_path / "images"
    images.mkdir()
    for name in ("astronaut.jpg", "camera.png", "coffee.jpg"):
        (images / name).write_bytes(samples[name])
    with running_server(repo) as server:
        url = server.options.grpc_url
        proc = _detserve("detect", *map(str, sorted(images.iterdir())), "--model", "hfdetr", "--url", url, "--json")
        assert proc.returncode == 0, proc.stderr
        assert len(json.loads(proc.stdout)) == 3
        out = tmp_path / "compare"
        proc = _detserve(
            "compare", "--model", "hfdetr", "--repository", str(repo), "--url", url, str(images), "--out", str(out),
            "--score-threshold", "0.01",
        )  # fmt: skip
        assert proc.returncode == 0, proc.stdout + proc.stderr
        report = json.loads((out / "compare.json").read_text())
        assert report["ok"] and len(report["images"]) == 3
        sides = {s["side"]: s for s in report["sides"]}
        assert {"onnxruntime", "server"} <= set(sides), sides.keys()
        assert all(b["matched"] == b["reference"] for s in sides.values() for b in s["bands"] if b["band"] != "<0.05")
