"""The device script's arithmetic on fabricated figures (scripts/gpu_serve_check.py): the targets of issue 28
and the server-side split from two statistics snapshots. The script itself runs in
tests/integration/test_gpu_serve_check.py (dry run, slow)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from detserve.ops.tritonstats import ModelStats, Phase

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu_serve_check.py"


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_serve_check", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("gpu_serve_check", module)
    spec.loader.exec_module(module)
    return module


def _stats(name: str, n: int, batches: int, queue_ms: float, infer_ms: float) -> ModelStats:
    ms = 1_000_000
    return ModelStats(
        name, "1", n, batches, Phase(n, 0), Phase(), Phase(n, int(queue_ms * n * ms)), Phase(n, 0),
        Phase(n, int(infer_ms * n * ms)), Phase(n, 0),
    )  # fmt: skip


def test_targets_and_split() -> None:
    g = _script()
    row = {"p50_ms": 10.0, "p99_ms": 25.0, "images_per_s": 600.0, "users": 32}
    served = [{**row, "users": 1, "images_per_s": 100.0}, row, {**row, "users": 64}]
    eager = [{**row, "images_per_s": 100.0}] * 3
    t = g.targets({"served": served, "eager": eager})
    assert t["throughput_ratio"] == 6.0 and t["throughput_target_met"]
    assert t["p99_users"] == 32 and t["p99_over_unloaded_p50"] == 2.5 and t["latency_target_met"]
    before = {"demo_core": _stats("demo_core", 10, 10, 1.0, 5.0), "demo": _stats("demo", 10, 10, 0, 0)}
    after = {"demo_core": _stats("demo_core", 50, 20, 2.0, 4.0), "demo": _stats("demo", 50, 50, 0, 0)}
    split = g._split(before, after)
    # 40 requests in 10 executions; queue (100 - 10) ms / 40, infer (200 - 50) ms / 40; the ensemble is left out
    assert split == {
        "demo_core": {"queue": 2.25, "compute_input": 0.0, "compute_infer": 3.75, "compute_output": 0.0, "mean_batch": 4.0}
    }
    assert all("tensorrt" not in f for f in g.gpu_test_files()) and "tests/unit/test_gpu_preprocess.py" in g.gpu_test_files()
