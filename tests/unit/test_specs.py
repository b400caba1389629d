from __future__ import annotations

import pytest

from detserve.errors import RequestError, SpecError
from detserve.families import ModelSpec
from detserve.families.torchvision.spec import AnchorSpec, PostprocessSpec
from detserve.specs import PreprocessSpec, RequestControls


def _post(**kw: object) -> PostprocessSpec:
    base: dict[str, object] = dict(
        family="retinanet",
        num_classes=5,
        anchors=AnchorSpec(kind="grid", sizes=((32,),), aspect_ratios=((0.5, 1.0, 2.0),), strides=(8,)),
        score_thresh=0.05,
        nms_thresh=0.5,
        detections_per_img=300,
        topk_candidates=1000,
    )
    base.update(kw)
    return PostprocessSpec(**base)  # type: ignore[arg-type]


def test_preprocess_round_trip() -> None:
    spec = PreprocessSpec(resize_mode="fixed", fixed_size=(320, 320), size_divisible=1)
    assert PreprocessSpec.from_json(spec.to_json()) == spec
    assert spec.fixed_input_hw == (320, 320)


def test_unknown_key_is_rejected_and_valid_keys_listed() -> None:
    with pytest.raises(SpecError) as e:
        PreprocessSpec.from_dict({"min_sise": 3})
    assert "min_sise" in e.value.message and e.value.hint and "min_size" in e.value.hint


@pytest.mark.parametrize(
    "kw, fragment",
    [
        (dict(resize_mode="crop"), "resize_mode"),
        (dict(min_size=900, max_size=800), "min_size"),
        (dict(resize_mode="fixed"), "fixed_size"),
        (dict(image_std=(0.1, 0.0, 0.1)), "image_std"),
        (dict(color_order="RBG"), "color_order"),
    ],
)
def test_invalid_preprocess_spec(kw: dict[str, object], fragment: str) -> None:
    with pytest.raises(SpecError, match=fragment):
        PreprocessSpec(**kw)  # type: ignore[arg-type]


def test_postprocess_round_trip_with_nested_anchors() -> None:
    spec = _post()
    again = PostprocessSpec.from_json(spec.to_json())
    assert again == spec and isinstance(again.anchors, AnchorSpec)
    model = ModelSpec("retinanet_resnet50_fpn_v2", 5, PreprocessSpec(), spec)
    assert ModelSpec.from_json(model.to_json()) == model


def test_grid_sizes_from_strides_and_fixed() -> None:
    a = AnchorSpec(kind="grid", sizes=((32,), (64,)), aspect_ratios=((1.0,), (1.0,)), strides=(8, 16))
    assert a.grid_sizes((256, 192)) == [(32, 24), (16, 12)]
    f = AnchorSpec(kind="default_boxes", aspect_ratios=((2.0,),), fixed_input_hw=(320, 320), fixed_grid_sizes=((20, 20),))
    assert f.grid_sizes((320, 320)) == [(20, 20)]
    with pytest.raises(SpecError, match="only accepts"):
        f.grid_sizes((640, 640))


def test_fcos_has_three_raw_outputs() -> None:
    from detserve.families import output_names

    assert output_names(_post(family="fcos")) == ("cls_logits", "bbox_regression", "bbox_ctrness")
    with pytest.raises(SpecError, match="family"):
        _post(family="yolo")  # another family's spec is not a torchvision PostprocessSpec


def test_request_controls_defaults_and_overrides() -> None:
    spec = _post()
    c = RequestControls.from_parameters({}, spec)
    assert (c.score_threshold, c.iou_threshold, c.max_det) == (0.05, 0.5, 300)
    c = RequestControls.from_parameters({"score_threshold": 0.3, "max_det": 5000, "iou_threshold": "0.6"}, spec)
    assert (c.score_threshold, c.iou_threshold, c.max_det) == (0.3, 0.6, 5000)


@pytest.mark.parametrize(
    "params, fragment",
    [
        ({"score_threshold": 1.5}, "score_threshold"),
        ({"score_threshold": "high"}, "score_threshold"),
        ({"iou_threshold": 0}, "iou_threshold"),
        ({"max_det": 0}, "max_det"),
        ({"max_det": 2.5}, "max_det"),
        ({"max_det": 10**9}, "max_det"),
        ({"max_det": True}, "max_det"),
    ],
)
def test_request_controls_out_of_range(params: dict[str, object], fragment: str) -> None:
    with pytest.raises(RequestError, match=fragment):
        RequestControls.from_parameters(params, _post())


@pytest.mark.parametrize("params", [{"score_thresh": 0.3}, {"conf": 0.3}, {"max_det": 5, "maxdet": 5}, {"detserve-foo": "1"}])
def test_unknown_request_parameters_are_refused_by_name(params: dict[str, object]) -> None:
    """A misspelt control used to be ignored silently (all 78 detections came back): it is the request's error."""
    with pytest.raises(RequestError, match="unknown request parameter") as e:
        RequestControls.from_parameters(params, _post())
    bad = next(k for k in params if k not in ("max_det",))
    assert repr(bad) in e.value.message
    assert "score_threshold, iou_threshold, max_det" in e.value.message and "detserve_deadline" in e.value.message


def test_deadline_and_protocol_parameters_are_accepted() -> None:
    params = {"detserve_deadline": 1.0, "detserve-arrival": "1.0", "detserve-timeout": "10S", "binary_data_output": True}
    assert RequestControls.from_parameters(params, _post()).max_det == 300


@pytest.mark.parametrize(
    "value, expected",
    [
        (7, 7),
        ("7", 7),
        (7.0, 7),
        ("7.0", 7),
        ("3.5", None),
        (3.5, None),
        ("seven", None),
        (True, None),
        ("inf", None),
        ([7], None),
    ],
)
def test_max_det_must_be_an_integer(value: object, expected: int | None) -> None:
    """HTTP carries parameters as int, bool or string, gRPC as int64, double, bool or string: every whole number is
    read; anything else says it must be an integer (not "a number")."""
    if expected is None:
        with pytest.raises(RequestError, match="max_det must be an integer"):
            RequestControls.from_parameters({"max_det": value}, _post())
    else:
        assert RequestControls.from_parameters({"max_det": value}, _post()).max_det == expected


def test_anchor_level_counts_must_agree() -> None:
    with pytest.raises(SpecError, match="strides needs one entry per level"):
        AnchorSpec(kind="grid", sizes=((32,), (64,)), aspect_ratios=((1.0,), (1.0,)), strides=(8,))
    with pytest.raises(SpecError, match="scales"):
        AnchorSpec(
            kind="default_boxes", aspect_ratios=((2.0,),), scales=(0.1,), fixed_input_hw=(8, 8), fixed_grid_sizes=((1, 1),)
        )
