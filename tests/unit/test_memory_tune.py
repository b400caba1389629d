"""The memory table's arithmetic and repository surgery (loadtest/memory.py), and tune's profile and
capacity figures (loadtest/tune.py, loadtest/stats.busy_share), on hand-made configs and rows."""

from __future__ import annotations

from pathlib import Path

from tritonclient.grpc import model_config_pb2 as mc

from detserve.tritonconfig import read_config, render
from loadtest.memory import SHARED, MemoryRow, per_additional_mb, render_memory, share_preprocessing, subset_repository
from loadtest.stats import PhaseSplit, busy_share
from loadtest.tune import capacity_ratio, leftover_ratio, only, render_profile, render_tuning, set_instances, variant_named


def _ensemble(repo: Path, model: str, spec: str) -> None:
    """An ensemble of three python steps as detserve lays them out; the pre-processing carries ``spec``."""
    ensemble = mc.ModelConfig(name=model, platform="ensemble", max_batch_size=8)
    for role in ("preprocess", "core", "postprocess"):
        step = mc.ModelConfig(name=f"{model}_{role}", backend="python", max_batch_size=8)
        step.instance_group.add(kind=mc.ModelInstanceGroup.KIND_CPU, count=2 if role == "postprocess" else 1)
        if role == "preprocess":
            step.parameters["preprocess_spec"].string_value = spec
        (repo / step.name / "1").mkdir(parents=True)
        (repo / step.name / "config.pbtxt").write_text(render(step))
        ensemble.ensemble_scheduling.step.add(model_name=step.name, model_version=-1)
    (repo / model / "1").mkdir(parents=True)
    (repo / model / "config.pbtxt").write_text(render(ensemble))


def test_shared_preprocessing_rewrites_the_copy_never_the_source(tmp_path: Path) -> None:
    src = tmp_path / "src"
    for model, spec in (("a", "320"), ("b", "320"), ("c", "256")):
        _ensemble(src, model, spec)
    before = (src / "b" / "config.pbtxt").read_text()
    repo = subset_repository(src, tmp_path / "subset", ["a", "b", "c"])
    # hard links: the subset costs no copy of the model files
    assert (repo / "b" / "config.pbtxt").stat().st_ino == (src / "b" / "config.pbtxt").stat().st_ino
    assert share_preprocessing(repo, ["a", "b", "c"]) == {"b_preprocess": "a_preprocess"}
    assert read_config(repo / "b").ensemble_scheduling.step[0].model_name == "a_preprocess"
    assert not (repo / "b_preprocess").exists() and (repo / "c_preprocess").is_dir()
    assert (src / "b" / "config.pbtxt").read_text() == before and (src / "b_preprocess").is_dir()


def test_a_variant_edits_the_roles_it_names() -> None:
    config = mc.ModelConfig(name="m_postprocess")
    config.instance_group.add(count=2)
    only(("core",), set_instances({"postprocess": 1}))("postprocess", config)
    assert config.instance_group[0].count == 2
    variant_named("core x2 + post x1").mutate("postprocess", config)
    assert config.instance_group[0].count == 1
    pre = mc.ModelConfig(name="m_preprocess")
    pre.dynamic_batching.max_queue_delay_microseconds = 2000
    variant_named("preprocess unbatched + core x2 + post x1").mutate("preprocess", pre)
    assert not pre.HasField("dynamic_batching")


def _row(layout: str, n: int, rest: float, load: float) -> MemoryRow:
    roles = {"tritonserver": {"processes": 1, "uss_mb": 20.0}, "stub m": {"processes": 3 * n, "uss_mb": rest - 20.0}}
    loaded = {"tritonserver": {"processes": 1, "uss_mb": 20.0}, "stub m": {"processes": 3 * n, "uss_mb": load - 20.0}}
    return MemoryRow(layout, tuple(f"m{i}" for i in range(n)), roles, loaded, {"m0": 10.0})


def test_per_additional_model_is_the_slope_between_counts() -> None:
    rows = [_row("ensemble", 1, 1000, 1400), _row("ensemble", 2, 1900, 2500), _row("ensemble", 4, 3700, 4700)]
    assert per_additional_mb(rows, "ensemble", "rest") == 900.0
    assert per_additional_mb(rows, "ensemble", "load") == 1100.0
    assert per_additional_mb(rows, SHARED, "load") is None
    text = render_memory(rows)
    assert "| ensemble | 4 | 12 | 3700 | 4700 | 20 |" in text
    assert "each additional model 900 MB USS at rest, 1100 MB under load" in text


def test_busy_share_counts_executions_not_requests() -> None:
    # 100 requests in 25 batches of 4, each batch 40 ms: the instance computed 1 s of a 2 s window
    split = PhaseSplit("m_core", 100, 0, 100, 25, 4.0, 50.0, 5.0, 0.0, 40.0, 0.0)
    assert busy_share(split, 2.0, 1) == 0.5
    assert busy_share(split, 2.0, 2) == 0.25
    assert busy_share(split, 0.0, 1) == 0.0


def test_capacity_ratio_and_tables_show_the_load_generators_leftover() -> None:
    row = {"variant": "as built", "throughput_rps": 40.0, "failures": 0, "per_cpu_rps": 20.0, "locust_share": 0.2}
    limit = {"images_per_s": 100.0, "images_per_cpu_s": 50.0}
    assert capacity_ratio(row, limit) == 0.5
    # 2 cores, Locust 20 %, others 30 %: 1 CPU-second per second left, 50 images in process
    assert leftover_ratio({**row, "others_share": 0.3}, limit, cores=2) == 0.8
    assert "| 0.50 | 0.50 |" in render_tuning([row], 16, limit)
    profile = [
        {
            "users": 4,
            "throughput_rps": 40.0,
            "idle_share": 0.3,
            "locust_share": 0.2,
            "others_share": 0.0,
            "steps": {"core": {"queue_ms": 12.0, "compute_ms": 30.0, "batch": 3.5, "busy": 0.9}},
        }
    ]
    text = render_profile(profile, limit)
    assert "| 4 | 40.0 | 0.50 | 0.50 | 30 | 20 | 0 | 12.0 / 30.0, 3.5, 90 |" in text
