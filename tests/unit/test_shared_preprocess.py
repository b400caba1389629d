"""``build --share-preprocessing``'s rules on hand-made repositories (no export, no server): what a build
shares and records, what it refuses, and what promote/rollback, tune and the memory table do with an
ensemble whose first step is another ensemble's pre-processing model. The served end-to-end proof is
tests/integration/test_shared_preprocess.py (slow)."""

from __future__ import annotations

from pathlib import Path

import pytest
from tritonclient.grpc import model_config_pb2 as mc

from converters.repository import keep_serving_state
from converters.shared_preprocess import share
from detserve.errors import SpecError
from detserve.ops.rollout import plan
from detserve.ops.versions import VersionError, check_version, models_of, serving_version
from detserve.specs import PreprocessSpec
from detserve.tritonconfig import ServingOptions, preprocess_config, read_config, render


def _build(repo: Path, name: str, min_size: int = 320, version: int = 1, enabled: bool = True, **opts: int) -> dict | None:
    """What build_repository does with the configs (share, keep the serving state, write), minus the export."""
    pre = preprocess_config(name, PreprocessSpec(min_size=min_size, max_size=min_size), ServingOptions(**opts))
    steps = [pre, *(mc.ModelConfig(name=f"{name}_{role}", backend="python") for role in ("core", "postprocess"))]
    ensemble = mc.ModelConfig(name=name, platform="ensemble", max_batch_size=8)
    for step in steps:
        ensemble.ensemble_scheduling.step.add(model_name=step.name, model_version=-1)
    configs = {c.name: c for c in [*steps, ensemble]}
    shared = share(repo, configs, name, enabled)
    for model, config in configs.items():
        config = keep_serving_state(repo / model, config, version)
        (repo / model / str(version)).mkdir(parents=True, exist_ok=True)
        (repo / model / str(version) / "build.json").write_text('{"verification": {"ok": true}}')
        (repo / model / "config.pbtxt").write_text(render(config))
    return shared


def _pin(repo: Path, name: str, version: int) -> None:
    """As a promote leaves the files: the ensemble's own steps pinned, its composing models narrowed."""
    for load in plan(models_of(repo, name), version, version, pinned=False):
        if load.phase > 1:
            (load.model_dir / "config.pbtxt").write_text(render(load.config))


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """a (versions 1 and 2, serving 1) owns a_preprocess; b (versions 1 and 2, serving 1) shares it, pinned to 1."""
    for version in (1, 2):
        _build(tmp_path, "a", version=version)
    _pin(tmp_path, "a", 1)
    assert _build(tmp_path, "b") == {"model": "a_preprocess", "version": 1}
    _build(tmp_path, "b", version=2)
    _pin(tmp_path, "b", 1)
    return tmp_path


def _steps(config: mc.ModelConfig) -> list[tuple[str, int]]:
    return [(s.model_name, s.model_version) for s in config.ensemble_scheduling.step]


def test_a_same_spec_build_shares_the_served_version_and_writes_no_preprocess_of_its_own(repo: Path) -> None:
    assert _steps(read_config(repo / "b"))[0] == ("a_preprocess", 1)
    assert not (repo / "b_preprocess").exists()
    assert _build(repo, "c", min_size=256) is None and (repo / "c_preprocess").is_dir()  # another spec: its own
    assert _build(repo, "d", max_batch_size=4) is None  # other limits: its own
    assert _build(repo, "e", enabled=False) is None and (repo / "e_preprocess").is_dir()  # the default: its own
    assert _build(repo, "c2", min_size=256) == {"model": "c_preprocess", "version": 1}  # c became shareable


def test_a_build_that_would_change_a_shared_preprocessing_is_refused(repo: Path) -> None:
    with pytest.raises(SpecError) as e:
        _build(repo, "a", min_size=512)  # the owner rebuilt in place with another spec
    assert "a_preprocess is shared by b (pins version 1)" in e.value.message and "--name" in (e.value.hint or "")
    with pytest.raises(SpecError, match="shared by b"):
        _build(repo, "a", max_batch_size=2)  # or other options
    _build(repo, "a")  # the same config: fine, and the owner keeps its own
    assert _steps(read_config(repo / "a"))[0][0] == "a_preprocess"


def test_fused_out_with_a_shared_preprocessing_is_refused(repo: Path) -> None:
    pre = preprocess_config("f", PreprocessSpec(min_size=320, max_size=320), ServingOptions())
    ensemble = mc.ModelConfig(name="f", platform="ensemble")
    ensemble.ensemble_scheduling.step.add(model_name=pre.name, model_version=-1)
    with pytest.raises(SpecError, match="--fused-out"):
        share(repo, {pre.name: pre, "f": ensemble}, "f", True, fused=True)


def test_promoting_the_sharer_never_loads_the_shared_step_nor_moves_its_pin(repo: Path) -> None:
    models = models_of(repo, "b")
    assert models.fixed == {"a_preprocess"} and [d.name for d, _ in models.steps] == ["b_core", "b_postprocess"]
    loads = plan(models, 1, 2)
    assert all(x.model_dir.name != "a_preprocess" for x in loads)
    for load in loads:
        if load.model_dir.name == "b":
            assert _steps(load.config)[0] == ("a_preprocess", 1)  # step 0 keeps the owner's version
    assert serving_version(repo, "b") == 1
    check_version(repo, "b", 2, force=False)  # a_preprocess has no "version 2 of b" to look for


def test_promoting_the_owner_keeps_the_version_the_sharer_pins(repo: Path) -> None:
    forward = [(x.model_dir.name, list(x.config.version_policy.specific.versions)) for x in plan(models_of(repo, "a"), 1, 2)]
    assert ("a_preprocess", [1, 2]) in forward and forward[-3] == ("a_preprocess", [1, 2])  # narrowed, 1 kept
    assert ("a_core", [2]) in forward  # its own steps narrow as before
    # a canary counts failures from its first step's requests: not from a_preprocess, which b's requests reach too
    assert models_of(repo, "a").entry == "a_core" and models_of(repo, "b").entry == "b_core"
    _pin(repo, "a", 2)
    back = [(x.model_dir.name, list(x.config.version_policy.specific.versions)) for x in plan(models_of(repo, "a"), 2, 1)]
    assert back[-3] == ("a_preprocess", [1])


def test_a_sharer_pinned_to_a_version_that_is_gone_cannot_be_promoted(repo: Path) -> None:
    config = read_config(repo / "b")
    config.ensemble_scheduling.step[0].model_version = 7
    (repo / "b" / "config.pbtxt").write_text(render(config))
    with pytest.raises(VersionError, match="shares a_preprocess pinned to version 7"):
        check_version(repo, "b", 2, force=False)


def test_tune_and_the_memory_table_read_the_roles_from_the_ensemble(repo: Path, tmp_path: Path) -> None:
    from loadtest.memory import edit_composing
    from loadtest.tune import set_instances, step_roles, variant_repository

    assert step_roles("b", repo) == {"a_preprocess": "preprocess", "b_core": "core", "b_postprocess": "postprocess"}
    copy = variant_repository(repo, tmp_path / "variant", "b", set_instances({"preprocess": 3}))
    assert read_config(copy / "a_preprocess").instance_group[0].count == 3
    edit_composing(repo, ["b"], set_instances({"preprocess": 2}))
    assert read_config(repo / "a_preprocess").instance_group[0].count == 2


def test_a_version_built_with_no_verify_is_not_promoted_without_force(repo: Path) -> None:
    """Before: ``--no-verify`` recorded ``verification.ok: true`` (nothing was checked, so nothing failed) and
    promote took the version as verified. Now such a record says ``ok: null`` and promote asks for --force."""
    for model in ("b_core", "b_postprocess"):
        (repo / model / "2" / "build.json").write_text('{"verification": {"core": null, "ok": null}}')
    with pytest.raises(VersionError, match="built with --no-verify"):
        check_version(repo, "b", 2, force=False)
    check_version(repo, "b", 2, force=True)
    (repo / "b_core" / "2" / "build.json").write_text("{}")  # a record from before the field: not refused
    (repo / "b_postprocess" / "2" / "build.json").write_text("{}")
    check_version(repo, "b", 2, force=False)
