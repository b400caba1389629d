"""`detserve build mmdet --config CONFIG.py --checkpoint model.pth` as a user types it: built, served, compared.

The config is a user's file on top of mmdet's own CenterNet or CornerNet config (the CornerNet one
shrunk as a user would: one small hourglass); the checkpoint an mmdet-style ``{"meta": ...,
"state_dict": ...}`` file (loaded ``weights_only``). Served through the unchanged client contract
and compared with mmdet's own ``inference_detector`` by ``detserve compare``.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from detserve.ops.server import running_server

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("mmdet") is None, reason="the mmdet family needs its extra (setup.sh)"),
]


def _detserve(*args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "detserve.app.cli", *args], capture_output=True, text=True, timeout=timeout)


# (named test configuration whose seeded weights make the checkpoint, mmdet's config, the user's overrides,
#  the first raw output the build verifies)
CASES = {
    "centernet": ("centernet_r18", "centernet/centernet_r18_8xb16-crop512-140e_coco.py", {}, "center_heatmap"),
    "cornernet": (
        "cornernet_tiny",
        "cornernet/cornernet_hourglass104_8xb6-210e-mstest_coco.py",
        {"backbone": {"downsample_times": 2, "num_stacks": 1, "stage_channels": [32, 32, 48], "stage_blocks": [1, 1, 1],
                      "feat_channel": 32},
         "bbox_head": {"in_channels": 32, "num_feat_levels": 1}},
        "tl_heat",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.documents("detserve build mmdet --config CONFIG.py --checkpoint model.pth --repository R --name N")
def test_build_mmdet_from_a_config_and_checkpoint_serves_and_compares(
    case: str, tmp_path: Path, samples: dict[str, bytes]
) -> None:
    import mmdet
    import torch

    from detserve.families import family

    detector, base_config, overrides, first_output = CASES[case]
    base = Path(mmdet.__file__).parent / ".mim" / "configs" / base_config
    config = tmp_path / f"my_{case}.py"
    model_cfg = {**overrides, "bbox_head": {**overrides.get("bbox_head", {}), "num_classes": 3}}
    config.write_text(f"_base_ = [{str(base)!r}]\nmodel = {model_cfg!r}\n")
    model = family("mmdet").build(detector, 3, None, {}, 0)  # seeded: scores spread over 0..1
    ckpt = tmp_path / "model.pth"
    torch.save({"meta": {"dataset_meta": {"classes": ("cat", "dog", "cup")}}, "state_dict": model.state_dict()}, ckpt)

    repo = tmp_path / "repo"
    proc = _detserve(
        "build", "mmdet", "--config", str(config), "--checkpoint", str(ckpt), "--repository", str(repo), "--name", "mycn"
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"verified {first_output}" in proc.stdout
    images = tmp_path / "images"
    images.mkdir()
    for name in ("astronaut.jpg", "camera.png", "coffee.jpg"):
        (images / name).write_bytes(samples[name])
    with running_server(repo) as server:
        url = server.options.grpc_url
        proc = _detserve("detect", *map(str, sorted(images.iterdir())), "--model", "mycn", "--url", url, "--json")
        assert proc.returncode == 0, proc.stderr
        assert len(json.loads(proc.stdout)) == 3
        out = tmp_path / "compare"
        proc = _detserve(
            "compare", "--model", "mycn", "--repository", str(repo), "--url", url, str(images), "--out", str(out),
            "--score-threshold", "0.05",
        )  # fmt: skip
        assert proc.returncode == 0, proc.stdout + proc.stderr
        report = json.loads((out / "compare.json").read_text())
        assert report["ok"] and len(report["images"]) == 3
        sides = {s["side"]: s for s in report["sides"]}
        assert {"onnxruntime", "server"} <= set(sides), sides.keys()
        assert all(b["matched"] == b["reference"] for s in sides.values() for b in s["bands"] if b["band"] != "<0.05")
