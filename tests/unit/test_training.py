"""The demo detector's training script runs end to end: a two-step run on tiny batches, in a subprocess.

Nothing else runs training, and an evaluation that called a removed function once sat in it unnoticed
(the demo detector's training would have crashed at its first validation). This runs every part the
real command runs: the training steps, a validation inside the loop, the fp16 save, the final metrics
on the stored weights and the provenance record, on two images each (--eval-images), about 10 s.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

from detserve.hashing import file_sha256

ROOT = Path(__file__).resolve().parents[2]


def test_training_runs_end_to_end_and_records_the_weights_it_wrote(tmp_path: Path) -> None:
    out = tmp_path / "w.pt"
    # batch 2: SSDlite's BatchNorm layers in training mode need more than one value per channel
    args = ["--out", str(out), "--iterations", "2", "--batch-size", "2", "--threads", "1"]
    args += ["--val-every", "1", "--val-images", "1", "--eval-images", "2"]  # a validation inside the loop, at step 1
    proc = subprocess.run([sys.executable, "-m", "training.train", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["weights"] == {"file": "w.pt", "sha256": file_sha256(out), "dtype": "float16"}
    assert [c["step"] for c in record["loss_curve"]] == [0, 1]
    assert all(math.isfinite(c["loss"]) for c in record["loss_curve"])
    assert [c["step"] for c in record["val_curve"]] == [1]
    assert set(record["metrics"]) == {"val", "test_max_det_100", "test_max_det_500"}
    assert all(v == -1.0 or 0.0 <= v <= 1.0 for m in record["metrics"].values() for v in m.values())  # -1: no such objects
    assert record["settings"]["eval_images"] == 2 and record["train_images_seen"] == 4
