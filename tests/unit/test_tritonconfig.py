"""Generated config.pbtxt files against golden files.

Regenerate after an intended change with DETSERVE_UPDATE_GOLDEN=1 and review the diff.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from detserve.errors import SpecError
from detserve.families.base import TensorDecl, single_stage_steps
from detserve.families.torchvision.spec import AnchorSpec, PostprocessSpec
from detserve.specs import PreprocessSpec
from detserve.tritonconfig import ServingOptions, ensemble_config, parse, preprocess_config, render, step_config

GOLDEN = Path(__file__).parent.parent / "golden"

SSD_PRE = PreprocessSpec(
    resize_mode="fixed", fixed_size=(320, 320), size_divisible=1, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5)
)
SSD_POST = PostprocessSpec(
    family="ssd",
    num_classes=5,
    anchors=AnchorSpec(
        kind="default_boxes", aspect_ratios=((2.0, 3.0),), fixed_input_hw=(320, 320), fixed_grid_sizes=((20, 20),)
    ),
    score_thresh=0.001,
    nms_thresh=0.55,
    detections_per_img=300,
    topk_candidates=300,
    box_coder_weights=(10.0, 10.0, 5.0, 5.0),
)
FCOS_PRE = PreprocessSpec(min_size=256, max_size=320)
FCOS_POST = PostprocessSpec(
    family="fcos",
    num_classes=5,
    anchors=AnchorSpec(kind="grid", sizes=((8,), (16,)), aspect_ratios=((1.0,), (1.0,)), strides=(8, 16)),
    score_thresh=0.2,
    nms_thresh=0.6,
    detections_per_img=100,
    topk_candidates=1000,
)
OPTS = ServingOptions()
# the core's outputs as the torchvision family declares them (SSDlite320's 3234 anchors; FCOS dynamic)
SSD_OUT = [TensorDecl("cls_logits", (3234, 5)), TensorDecl("bbox_regression", (3234, 4))]
FCOS_OUT = [TensorDecl("cls_logits", (-1, 5)), TensorDecl("bbox_regression", (-1, 4)), TensorDecl("bbox_ctrness", (-1, 1))]


def core_config(name: str, target: str, pre: PreprocessSpec, outputs: list[TensorDecl], opts: ServingOptions) -> Any:
    """The core step of a single-stage family, as the build writes it (one writer for every step)."""
    return step_config(name, single_stage_steps(outputs)[0], target, None, opts, last=False, pre=pre)


def postprocess_config(name: str, post: PostprocessSpec, outputs: list[TensorDecl], opts: ServingOptions) -> Any:
    return step_config(name, single_stage_steps(outputs)[1], "python-onnxruntime", post, opts, last=True)


def _ensemble(name: str, pre: PreprocessSpec, post: PostprocessSpec, outputs: list[TensorDecl]) -> str:
    steps = [
        preprocess_config(name, pre, OPTS),
        core_config(name, "python-onnxruntime", pre, outputs, OPTS),
        postprocess_config(name, post, outputs, OPTS),
    ]
    return render(ensemble_config(name, steps, OPTS))


def _configs() -> dict[str, str]:
    return {
        "ssd_preprocess": render(preprocess_config("ssd", SSD_PRE, OPTS)),
        "ssd_core_python": render(core_config("ssd", "python-onnxruntime", SSD_PRE, SSD_OUT, OPTS)),
        "ssd_core_onnxruntime": render(core_config("ssd", "onnxruntime", SSD_PRE, SSD_OUT, OPTS)),
        "ssd_core_tensorrt": render(core_config("ssd", "tensorrt", SSD_PRE, SSD_OUT, OPTS)),
        "ssd_postprocess_gpu": render(postprocess_config("ssd", SSD_POST, SSD_OUT, ServingOptions(postprocess_on_gpu=True))),
        "ssd_postprocess": render(postprocess_config("ssd", SSD_POST, SSD_OUT, OPTS)),
        "ssd_ensemble": _ensemble("ssd", SSD_PRE, SSD_POST, SSD_OUT),
        "fcos_core_python": render(core_config("fcos", "python-onnxruntime", FCOS_PRE, FCOS_OUT, OPTS)),
        "fcos_ensemble": _ensemble("fcos", FCOS_PRE, FCOS_POST, FCOS_OUT),
    }


@pytest.mark.parametrize("name", sorted(_configs()))
def test_matches_golden(name: str) -> None:
    text = _configs()[name]
    path = GOLDEN / f"{name}.pbtxt"
    if os.environ.get("DETSERVE_UPDATE_GOLDEN") == "1":
        path.write_text(text)
    assert path.is_file(), f"missing golden file {path}; run with DETSERVE_UPDATE_GOLDEN=1"
    assert text == path.read_text()


@pytest.mark.parametrize("name", sorted(_configs()))
def test_round_trips_through_the_parser(name: str) -> None:
    text = _configs()[name]
    assert render(parse(text)) == text


def test_the_torchvision_family_declares_these_outputs() -> None:
    from detserve.families import outputs_of

    assert [(o.name, o.dims) for o in outputs_of(FCOS_POST)] == [(o.name, o.dims) for o in FCOS_OUT]
    assert [o.name for o in outputs_of(SSD_POST)] == ["cls_logits", "bbox_regression"]
    assert all(o.tolerance("fp32") < o.tolerance("fp16") < o.tolerance("int8") for o in outputs_of(FCOS_POST))


def test_ensemble_pins_every_step_and_wires_all_raw_outputs() -> None:
    config = parse(_ensemble("fcos", FCOS_PRE, FCOS_POST, FCOS_OUT))
    steps = config.ensemble_scheduling.step
    assert [s.model_name for s in steps] == ["fcos_preprocess", "fcos_core", "fcos_postprocess"]
    assert all(s.model_version == -1 for s in steps)
    assert set(steps[1].output_map) == {"cls_logits", "bbox_regression", "bbox_ctrness"}
    assert set(steps[2].input_map) == {"cls_logits", "bbox_regression", "bbox_ctrness", "image_info"}


def test_dynamic_core_has_dynamic_spatial_dims() -> None:
    config = core_config("fcos", "python-onnxruntime", FCOS_PRE, FCOS_OUT, OPTS)
    assert list(config.input[0].dims) == [3, -1, -1]
    assert list(config.output[0].dims) == [-1, 5]


def test_invalid_inputs() -> None:
    with pytest.raises(SpecError, match="target"):
        core_config("x", "tensorrt-lite", SSD_PRE, SSD_OUT, OPTS)
    with pytest.raises(SpecError, match="max_batch_size"):
        ServingOptions(max_batch_size=0)
    with pytest.raises(SpecError, match="postprocess_instances"):
        ServingOptions(postprocess_instances=0)
    with pytest.raises(SpecError, match="invalid config"):
        parse("name: ")
    pre = preprocess_config("x", SSD_PRE, OPTS)
    with pytest.raises(SpecError, match="no earlier step gives"):
        ensemble_config("x", [postprocess_config("x", SSD_POST, SSD_OUT, OPTS)], OPTS)
    with pytest.raises(SpecError, match="must give num_detections"):
        ensemble_config("x", [pre], OPTS)


def test_every_family_declares_its_steps_single_stage_from_one_helper() -> None:
    """A single-stage family's steps are [core, postprocess] from its declared outputs and the detection contract."""
    from detserve.families import family, outputs_of
    from detserve.families.base import is_single_stage
    from detserve.tritonconfig import OUTPUTS

    for post in (SSD_POST, FCOS_POST):
        steps = family(post.family).steps(post)
        assert is_single_stage(steps)
        assert steps[0].outputs == tuple(outputs_of(post)) and [t.name for t in steps[0].inputs] == ["images"]
        assert [t.name for t in steps[1].inputs] == [*(o.name for o in outputs_of(post)), "image_info"]
        assert [t.name for t in steps[1].outputs] == list(OUTPUTS) and steps[1].gpu_inputs
    with pytest.raises(SpecError, match="one core"):
        family("ssd").step_module(None, SSD_POST, "roi_core")
