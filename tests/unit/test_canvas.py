"""runtime/canvas.py and its wiring: per-image shapes packed and cropped back, companions declared
where a python-onnxruntime core's outputs follow the image, one canvas per request elsewhere."""

from __future__ import annotations

import sys
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from detserve.errors import DetserveError, RequestError
from detserve.runtime.canvas import CANVAS_PARAMETER, PER_IMAGE, crop_to_canvases, pack, shape_name, unpack
from detserve.specs import PreprocessSpec
from tests.bad_images import png_bytes


def test_pack_and_unpack_round_trip_per_image_shapes() -> None:
    rows = [np.ones((4, 3, 5), np.float32), np.full((4, 2, 7), 2, np.float32), np.full((4, 1, 1), 3, np.float32)]
    batch, shapes = pack(rows)
    assert batch.shape == (3, 4, 3, 7) and shapes.tolist() == [[4, 3, 5], [4, 2, 7], [4, 1, 1]]
    assert batch[0, :, :, 5:].sum() == 0  # zero filler beyond an image's own shape
    for got, want in zip(unpack(batch, shapes), rows, strict=True):
        assert np.array_equal(got, want)
    single, one = pack(rows[:1])
    assert single.base is not None and one.tolist() == [[4, 3, 5]]  # one image: a view, no copy
    assert [r.shape for r in unpack(batch, None)] == [(4, 3, 7)] * 3
    with pytest.raises(DetserveError, match="does not describe"):
        unpack(batch, np.array([[4, 3, 9]] * 3, np.int32), "feat")


def test_crop_to_canvases_reads_image_info() -> None:
    images = np.zeros((2, 3, 64, 96), np.float32)
    info = np.array([[10, 10, 60, 90, 64, 96], [10, 10, 30, 30, 32, 32]], np.int32)
    assert [c.shape for c in crop_to_canvases(images, info)] == [(3, 64, 96), (3, 32, 32)]
    with pytest.raises(DetserveError, match="outside"):
        crop_to_canvases(images, np.array([[1, 1, 1, 1, 128, 32]] * 2, np.int32))


def _mask_rcnn_steps(target: str) -> list[Any]:
    from detserve.families.rcnn import RcnnDecodeSpec, steps
    from detserve.tritonconfig import ServingOptions, own_canvases, preprocess_config, step_config

    spec = RcnnDecodeSpec(
        num_classes=3, masks=True, num_levels=2, anchor_sizes=((32,), (64,)), aspect_ratios=((1.0,), (1.0,)),
        feature_names=("0",), feature_channels=8, rpn_pre_nms_top_n=50, rpn_post_nms_top_n=20, rpn_nms_thresh=0.7,
        rpn_score_thresh=0.0, box_coder_weights=(10.0, 10.0, 5.0, 5.0),
    )  # fmt: skip
    opts = ServingOptions()
    decls = steps(spec)
    configs = [preprocess_config("m", PreprocessSpec(min_size=64, max_size=96), opts)]
    configs += [step_config("m", d, target, spec, opts, last=i == len(decls) - 1) for i, d in enumerate(decls)]
    own_canvases(configs, target)
    return configs


def test_companions_follow_the_image_sized_core_outputs_to_every_reader() -> None:
    from detserve.tritonconfig import ServingOptions, ensemble_config

    configs = {c.name: c for c in _mask_rcnn_steps("python-onnxruntime")}
    assert configs["m_preprocess"].parameters[CANVAS_PARAMETER].string_value == PER_IMAGE
    names = {n: ([t.name for t in c.input], [t.name for t in c.output]) for n, c in configs.items()}
    assert "image_info" in names["m_core"][0]  # the first core crops each image to its canvas
    assert shape_name("feat_0") in names["m_core"][1] and shape_name("objectness_0") in names["m_core"][1]
    assert shape_name("objectness_1") in names["m_proposals"][0]
    assert shape_name("feat_0") in names["m_roi_core"][0] and shape_name("feat_0") in names["m_mask_core"][0]
    # fixed-size outputs (one row per proposal) need none
    assert not any(n.endswith("__shape") for n in names["m_roi_core"][1])
    ensemble_config("m", list(configs.values()), ServingOptions())  # every companion is produced before it is read


def test_native_cores_keep_one_canvas_per_request() -> None:
    configs = _mask_rcnn_steps("onnxruntime")
    assert CANVAS_PARAMETER not in configs[0].parameters
    assert not any(t.name.endswith("__shape") or t.name == "image_info" for c in configs[1:2] for t in c.input)


def test_one_canvas_per_request_refuses_images_that_need_two(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", SimpleNamespace())
    from detserve.runtime.backend.preprocess_model import preprocess_images

    spec = PreprocessSpec(min_size=32, max_size=64)
    same, info = preprocess_images([png_bytes(64, 48), png_bytes(64, 48)], spec)
    assert same.shape[0] == 2 and info[:, 4:].tolist() == [[32, 64], [32, 64]]
    with pytest.raises(RequestError, match=r"images 1 and 2 .* different canvases \(32x64, 32x32\)"):
        preprocess_images([png_bytes(64, 48), png_bytes(32, 32)], spec)


def test_run_per_image_groups_images_across_requests_and_fails_a_batch_alone() -> None:
    from detserve.runtime.backend.common import run_per_image

    class Err:
        def __init__(self, error: Any) -> None:
            self.error = error

    pb = SimpleNamespace(
        InferenceResponse=Err, TritonError=lambda msg, code=None: msg
    )  # only error responses are built by run_per_image itself
    pb.TritonError.CANCELLED = pb.TritonError.INVALID_ARG = 0  # type: ignore[attr-defined]
    requests = {
        0: SimpleNamespace(n=2, keys=["a", "b"]),
        1: SimpleNamespace(n=1, keys=["a"]),
        3: SimpleNamespace(n=1, keys=["bad"]),
    }
    batches: list[list[tuple[int, int]]] = []

    def run(members: list[tuple[Any, int]]) -> list[str]:
        batches.append([(id(r), j) for r, j in members])
        if members[0][0].keys[members[0][1]] == "bad":
            raise DetserveError("broken")
        return [f"{r.keys[j]}{j}" for r, j in members]

    responses: list[Any] = [None] * 4
    run_per_image(pb, requests, lambda r, j: r.keys[j], run, lambda r, rows: rows, responses)
    assert [len(b) for b in batches] == [2, 1, 1]  # "a" of requests 0 and 1 together
    assert responses[0] == ["a0", "b1"] and responses[1] == ["a0"] and responses[2] is None
    assert isinstance(responses[3], Err) and "broken" in responses[3].error
