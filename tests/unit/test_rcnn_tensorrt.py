"""The TensorRT target of multi-step (two-stage R-CNN) cores, on a CPU: per-input profiles, the engine
build through the TensorRT stand-ins (tests/fake_tensorrt.py: parser, profiles, builder), and the
per-output Polygraphy verification of a RoIAlign core with ONNX Runtime running the "engine" -- a
faithful one passes, one that samples RoIs with the other pixel convention is refused.

Real engines (kernels, the ROIAlign_TRT plugin's numerics) are built and verified by
scripts/gpu_check.sh (scripts/gpu_check.py: rcnn_engines) on a GPU.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import tests.fake_tensorrt as fake
from converters.tensorrt_env import EngineEnvironment, GpuInfo
from detserve.errors import SpecError, VerificationError
from detserve.families.base import StepDecl, TensorDecl
from detserve.specs import PreprocessSpec

PRE = PreprocessSpec(min_size=64, max_size=96)  # padded 32..96 per side
STEP = StepDecl(
    "mask_core",
    "core",
    (TensorDecl("feat_0", (4, -1, -1)), TensorDecl("det_boxes", (-1, 4)), TensorDecl("det_labels", (-1,), "INT32")),
    (TensorDecl("mask_probs", (-1, 4, 4)),),
)


class _MaskToy(torch.nn.Module):
    """The mask core's shape at toy size: RoIAlign (aligned=False, sampling 2, stride 4) on padded
    boxes [N, D, 4], a 1x1 conv head, the label's channel, sigmoid."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.head = torch.nn.Conv2d(4, 3, 1)
        for p in self.parameters():
            p.data.copy_(torch.randn(p.shape, generator=gen))

    def forward(self, feat_0: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        from torchvision.ops import roi_align

        n, d = boxes.shape[0], boxes.shape[1]
        ids = torch.zeros_like(boxes[..., :1]) + torch.arange(n, dtype=boxes.dtype).view(-1, 1, 1)
        pooled = roi_align(feat_0, torch.cat([ids, boxes], dim=2).reshape(-1, 5), (4, 4), 0.25, 2)
        logits = self.head(pooled)
        index = labels.reshape(-1).long()[:, None, None, None].expand(-1, 1, 4, 4)
        return logits.gather(1, index).sigmoid().reshape(n, d, 4, 4)


def _inputs(n: int, rows: int, hw: tuple[int, int], seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    feat = torch.randn((n, 4, hw[0] // 4, hw[1] // 4), generator=gen)
    xy = torch.rand((n, rows, 2), generator=gen) * torch.tensor([hw[1] * 0.6, hw[0] * 0.6])
    wh = 4 + torch.rand((n, rows, 2), generator=gen) * 20
    labels = torch.randint(0, 3, (n, rows), generator=gen, dtype=torch.int32)
    return [feat, torch.cat([xy, xy + wh], dim=2), labels]


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from converters.multistep import export_step

    d = tmp_path_factory.mktemp("rcnn_trt")
    module = _MaskToy().eval()
    samples = [_inputs(1, 3, (64, 96), 1), _inputs(2, 5, (64, 96), 2), _inputs(1, 2, (96, 64), 3)]
    with torch.no_grad():  # eager first (as the chain does): torchvision checks its ops outside the tracer
        module(*samples[0])
    onnx_path = export_step(module, STEP, samples[1], d / "mask_core" / "model.onnx")
    images = [torch.zeros((1, 3, 64, 96)), torch.zeros((2, 3, 64, 96)), torch.zeros((1, 3, 96, 64))]
    return {"dir": d, "onnx": onnx_path, "samples": samples, "images": images}


@pytest.fixture
def stand_in(monkeypatch: pytest.MonkeyPatch) -> Any:
    """The TensorRT stand-ins in place of ``tensorrt`` and a GPU; the registered plugins reset."""
    import converters.tensorrt_build as tb
    import converters.tensorrt_env as te

    def gpu(device: int = 0) -> GpuInfo:
        return GpuInfo("stand-in GPU", "9.0", "13.0")

    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(te, "require_cuda_gpu", gpu)
    monkeypatch.setattr(tb, "require_cuda_gpu", gpu)  # the build imported the function by name
    monkeypatch.setattr(te, "current_environment", lambda: EngineEnvironment("fake", "stand-in GPU", "9.0"))
    monkeypatch.setattr(fake, "registered_plugins", [])
    return fake


def _ort_runner(path: Path) -> Any:
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx

    return OnnxrtRunner(SessionFromOnnx(str(path), providers=["cpu"]), name="engine stand-in")


def test_export_emits_roi_align_with_the_poolers_pixel_convention(toy: dict[str, Any]) -> None:
    from converters.tensorrt_multistep import roi_align_nodes

    nodes = roi_align_nodes(toy["onnx"])
    assert len(nodes) == 1
    assert nodes[0]["coordinate_transformation_mode"] == "output_half_pixel"  # torchvision aligned=False
    assert nodes[0]["sampling_ratio"] == 2 and nodes[0]["spatial_scale"] == 0.25 and nodes[0].get("mode", "avg") == "avg"


def test_profiles_of_every_rcnn_core_step() -> None:
    """Faster/Mask R-CNN at torchvision's defaults: images as the single-core profile, FPN maps at
    padded size / stride rounded up, proposals fixed, final detections 1..max rows."""
    from converters.tensorrt_multistep import step_profiles
    from converters.tensorrt_profile import derive_profile
    from detserve.families.rcnn import RcnnDecodeSpec, steps

    spec = RcnnDecodeSpec(
        num_classes=91, masks=True, num_levels=5, anchor_sizes=((32,), (64,), (128,), (256,), (512,)),
        aspect_ratios=((0.5, 1.0, 2.0),) * 5, feature_names=("0", "1", "2", "3"), feature_channels=256,
        rpn_pre_nms_top_n=1000, rpn_post_nms_top_n=1000, rpn_nms_thresh=0.7, rpn_score_thresh=0.0,
        box_coder_weights=(10.0, 10.0, 5.0, 5.0),
    )  # fmt: skip
    pre = PreprocessSpec(min_size=800, max_size=1333)
    strides = {f"feat_{n}": s for n, s in zip(spec.feature_names, (4, 8, 16, 32), strict=True)}
    by_role = {s.role: s for s in steps(spec)}
    image = derive_profile(pre, 8)
    assert step_profiles(by_role["core"], pre, {}, 8, 1000, 100) == {"images": image}
    roi = step_profiles(by_role["roi_core"], pre, strides, 8, 1000, 100)
    assert image.max == (8, 3, 1344, 1344) and image.min == (1, 3, 32, 32)
    assert roi["feat_0"].min == (1, 256, 8, 8) and roi["feat_0"].max == (8, 256, 336, 336)
    assert roi["feat_3"].min == (1, 256, 1, 1) and roi["feat_3"].max == (8, 256, 42, 42)
    assert roi["feat_3"].opt == (8, 256, *(-(-s // 32) for s in image.opt[2:]))
    assert roi["proposals"].min == (1, 1000, 4) and roi["proposals"].max == (8, 1000, 4)
    mask = step_profiles(by_role["mask_core"], pre, strides, 8, 1000, 100)
    assert mask["det_boxes"].min == (1, 1, 4) and mask["det_boxes"].opt == (8, 100, 4) and mask["det_boxes"].max == (8, 1000, 4)
    assert mask["det_labels"].min == (1, 1) and mask["det_labels"].max == (8, 1000)
    with pytest.raises(SpecError, match="no stride"):
        step_profiles(by_role["roi_core"], pre, {}, 8, 1000, 100)


def test_a_multi_input_core_builds_with_a_profile_per_input_and_the_plugins(
    toy: dict[str, Any], stand_in: Any, tmp_path: Path
) -> None:
    from converters.tensorrt_build import BuildOptions, EngineBuildError, build_engine
    from converters.tensorrt_env import read_plan_metadata
    from converters.tensorrt_multistep import step_profiles
    from converters.tensorrt_parse import UnsupportedOpError

    profiles = step_profiles(STEP, PRE, {"feat_0": 4}, 4, 20, 5)
    plan = tmp_path / "model.plan"
    with pytest.raises(UnsupportedOpError, match="RoiAlign"):  # parsed before the plugins are registered
        build_engine(toy["onnx"], plan, PRE, 4, BuildOptions(profiles=profiles))
    meta = build_engine(
        toy["onnx"], plan, PRE, 4, BuildOptions(profiles=profiles, load_plugins=True, timing_cache=tmp_path / "c")
    )
    assert stand_in.registered_plugins == [""] and not stand_in.Builder.refusals
    got = stand_in.Builder.last_config.profiles[0].shapes
    assert got["feat_0"] == ((1, 4, 8, 8), (4, 4, 16, 24), (4, 4, 24, 24))  # padded 32..96 (opt 64x96), stride 4
    assert got["det_boxes"] == ((1, 1, 4), (4, 5, 4), (4, 20, 4)) and got["det_labels"] == ((1, 1), (4, 5), (4, 20))
    assert read_plan_metadata(plan).profiles == meta.profiles == {n: r.to_dict() for n, r in profiles.items()}
    missing = {k: v for k, v in profiles.items() if k != "det_labels"}
    with pytest.raises(EngineBuildError):
        build_engine(toy["onnx"], plan, PRE, 4, BuildOptions(profiles=missing, load_plugins=True))
    assert stand_in.Builder.refusals == ["det_labels: no profile for a dynamic input"]
    with pytest.raises(SpecError, match="int8"):
        build_engine(toy["onnx"], plan, PRE, 4, BuildOptions(precision="int8", calibration_images=tmp_path, profiles=profiles))


def test_step_engines_are_built_and_verified_per_output(toy: dict[str, Any], stand_in: Any) -> None:
    """build_step_engines end to end on the stand-ins: strides measured, real inputs inside the
    profiles, RoiAlign's attributes in the metadata, every output checked on every sample batch
    plus one at the largest batch size."""
    from types import SimpleNamespace

    from converters.tensorrt_multistep import build_step_engines

    cores = {"core": {"samples": [[i] for i in toy["images"]]}, "mask_core": {"onnx": toy["onnx"], "samples": toy["samples"]}}
    spec = SimpleNamespace(detections_per_img=5, rpn_post_nms_top_n=20)
    out = build_step_engines([STEP], cores, PRE, spec, 4, "fp32", None, True, candidate=_ort_runner)
    engine, verification = out["mask_core"]["engine"], out["mask_core"]["verification"]
    assert engine["extra"]["strides"] == {"feat_0": 4} and engine["extra"]["step"] == "mask_core"
    assert engine["extra"]["roi_align"][0]["coordinate_transformation_mode"] == "output_half_pixel"
    assert verification["ok"] and [o["name"] for o in verification["outputs"]] == ["mask_probs"]
    assert verification["input_shapes"] == [(1, 4, 16, 24), (2, 4, 16, 24), (1, 4, 24, 16), (4, 4, 16, 24)]
    assert "polygraphy: passed" in verification["backend"]


def test_an_engine_with_a_shifted_roi_align_is_refused(toy: dict[str, Any], stand_in: Any) -> None:
    from converters.onnx_export import require_ok
    from converters.tensorrt_build import BuildOptions, build_engine
    from converters.tensorrt_multistep import feeds_of, step_profiles, verify_step_engine

    d = toy["dir"] / "shifted"
    d.mkdir(exist_ok=True)
    plan = d / "model.plan"
    build_engine(
        toy["onnx"], plan, PRE, 4, BuildOptions(profiles=step_profiles(STEP, PRE, {"feat_0": 4}, 4, 20, 5), load_plugins=True)
    )
    wrong = fake.miscompiled_roi_align(toy["onnx"], d / "wrong_engine.onnx")
    feeds = feeds_of(STEP, toy["samples"], 4)
    assert [f["det_labels"].dtype for f in feeds] == [np.dtype(np.int32)] * 4
    result = verify_step_engine(STEP, toy["onnx"], plan, feeds, "fp32", _ort_runner(wrong))
    assert not result.ok and "polygraphy: FAILED" in result.backend
    assert result.outputs[0].max_abs > 1e-3
    with pytest.raises(VerificationError, match="mask_probs"):
        require_ok(result)
    assert verify_step_engine(STEP, toy["onnx"], plan, feeds, "fp32", _ort_runner(toy["onnx"])).ok


def test_a_profile_that_misses_a_real_input_is_refused_before_the_build() -> None:
    from converters.tensorrt_multistep import check_within, step_profiles

    profiles = step_profiles(STEP, PRE, {"feat_0": 8}, 4, 20, 5)  # a wrong stride: maps up to 12 cells
    with pytest.raises(SpecError, match="outside its profile"):
        check_within(STEP, profiles, _inputs(1, 3, (64, 96), 0))
    check_within(STEP, step_profiles(STEP, PRE, {"feat_0": 4}, 4, 20, 5), _inputs(1, 3, (64, 96), 0))


def test_tensorrt_step_configs_run_plans_on_the_gpu() -> None:
    from detserve.families.rcnn import RcnnDecodeSpec, steps
    from detserve.tritonconfig import ServingOptions, render, step_config

    spec = RcnnDecodeSpec(
        num_classes=5, masks=True, num_levels=2, anchor_sizes=((32,), (64,)), aspect_ratios=((1.0,),) * 2,
        feature_names=("0",), feature_channels=8, rpn_pre_nms_top_n=10, rpn_post_nms_top_n=10, rpn_nms_thresh=0.7,
        rpn_score_thresh=0.0, box_coder_weights=(10.0, 10.0, 5.0, 5.0),
    )  # fmt: skip
    decls = steps(spec)
    for i, d in enumerate(decls):
        text = render(step_config("m", d, "tensorrt", spec, ServingOptions(), last=i == len(decls) - 1))
        if d.kind == "core":
            assert 'platform: "tensorrt_plan"' in text and 'default_model_filename: "model.plan"' in text and "KIND_GPU" in text
        else:
            assert 'backend: "python"' in text and "tensorrt_plan" not in text


@pytest.mark.slow
def test_build_repository_tensorrt_for_a_two_stage_model_on_the_stand_ins(
    stand_in: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """detserve build fasterrcnn_mobilenet_v3_large_320_fpn --target tensorrt, engines by the stand-ins."""
    import json

    import converters.tensorrt_multistep as tm
    from converters.repository import BuildRequest, build_repository

    monkeypatch.setattr(tm, "_trt_runner", _ort_runner)
    req = BuildRequest("fasterrcnn_mobilenet_v3_large_320_fpn", tmp_path / "repo", name="frcnn", num_classes=5,
                       target="tensorrt", spread_init_seed=0)  # fmt: skip
    result = build_repository(req)
    checks = result.record["verification"]
    assert checks["ok"] and checks["tensorrt_core"]["ok"] and checks["tensorrt_roi_core"]["ok"]
    assert set(result.record["tensorrt"]) == {"core", "roi_core"}
    roi = result.record["tensorrt"]["roi_core"]
    assert roi["profiles"]["proposals"]["min"][1:] == [roi["profiles"]["proposals"]["max"][1], 4]
    for role in ("core", "roi_core"):
        version = tmp_path / "repo" / f"frcnn_{role}" / "1"
        assert (version / "model.plan").is_file() and (version / "model.plan.json").is_file()
        assert 'platform: "tensorrt_plan"' in (version.parent / "config.pbtxt").read_text()
        assert json.loads((version / "build.json").read_text())["target"] == "tensorrt"
