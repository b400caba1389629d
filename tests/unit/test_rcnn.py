"""The R-CNN family without a server: spec, declared steps, generated configs, the in-process chain
against eager torchvision, padded proposals, per-request controls, and the mask paste helper."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from detserve.errors import SpecError
from detserve.families import family, family_for_detector
from detserve.families.rcnn import RcnnDecodeSpec, steps
from detserve.specs import RequestControls

DETECTOR = "fasterrcnn_mobilenet_v3_large_320_fpn"


@pytest.fixture(scope="module")
def frcnn() -> tuple[Any, Any, Any]:
    fam = family_for_detector(DETECTOR)
    model = fam.build(DETECTOR, 5, None, {}, 0)
    pre = fam.preprocess_spec(model)
    return fam, model, fam.decode_spec(model, pre)


@pytest.fixture(scope="module")
def chain(frcnn: tuple[Any, Any, Any]) -> tuple[dict[str, Any], Any, np.ndarray]:
    """The served steps in-process on one sample photo, and the photo."""
    from converters.multistep import run_chain
    from detserve.runtime.preprocess import preprocess
    from detserve.runtime.samples import sample_images

    fam, model, spec = frcnn
    rgb = sample_images()[1]
    p = preprocess(rgb, fam.preprocess_spec(model))
    info = torch.from_numpy(p.info()[None])
    tensors, _ = run_chain(fam, model, spec, p.tensor[None], info, [RequestControls(0.05, 0.5, 1000)])
    return tensors, info, rgb


def test_every_listed_detector_is_the_rcnn_family() -> None:
    fam = family("rcnn")
    for name in (
        "fasterrcnn_mobilenet_v3_large_320_fpn", "fasterrcnn_mobilenet_v3_large_fpn", "fasterrcnn_resnet50_fpn",
        "fasterrcnn_resnet50_fpn_v2", "maskrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn_v2",
    ):  # fmt: skip
        assert family_for_detector(name) is fam


def test_spec_round_trips_and_rejects_unknown_keys(frcnn: tuple[Any, Any, Any]) -> None:
    from detserve.families import decode_spec_from_json

    _, _, spec = frcnn
    assert decode_spec_from_json(spec.to_json()) == spec
    assert spec.rpn_post_nms_top_n == 150 and spec.feature_names == ("0", "1") and not spec.masks
    with pytest.raises(SpecError, match="valid keys"):
        RcnnDecodeSpec.from_dict({**spec.to_dict(), "rpn_nms": 0.7})


def test_bad_model_keyword_is_named() -> None:
    with pytest.raises(SpecError, match="rpn_post_nms_top_n_tst"):
        family("rcnn").build(DETECTOR, 5, None, {"rpn_post_nms_top_n_tst": 10}, None)


def test_in_process_chain_equals_eager_model(frcnn: tuple[Any, Any, Any], chain: tuple[dict[str, Any], Any, np.ndarray]) -> None:
    """The split (cores as torch modules + the torch steps) gives exactly the eager model's detections."""
    fam, model, _ = frcnn
    tensors, _, rgb = chain
    ref = fam.reference(model, rgb, 0.05, None, 1000)
    k = int(tensors["num_detections"][0, 0])
    assert k == len(ref["scores"]) > 20
    np.testing.assert_array_equal(tensors["scores"][0, :k].numpy(), ref["scores"])
    np.testing.assert_array_equal(tensors["boxes"][0, :k].numpy(), ref["boxes"])
    np.testing.assert_array_equal(tensors["labels"][0, :k].numpy(), ref["labels"])
    assert float(ref["scores"].max()) - float(ref["scores"].min()) > 0.25, "the fixture needs a score spread"


def test_padded_proposals_do_not_change_results(
    frcnn: tuple[Any, Any, Any], chain: tuple[dict[str, Any], Any, np.ndarray]
) -> None:
    """Rows past num_proposals may hold anything: the box head treats RoIs alone, detections drop them."""
    from detserve.families.rcnn.decode import run_step

    fam, model, spec = frcnn
    tensors, info, _ = chain
    k = int(tensors["num_proposals"][0, 0])
    assert 0 < k <= spec.rpn_post_nms_top_n
    proposals = tensors["proposals"].clone()
    proposals[0, k:] = torch.tensor([3.0, 5.0, 90.0, 70.0])  # junk instead of the zero padding
    feats = [tensors[f"feat_{n}"] for n in spec.feature_names]
    with torch.no_grad():
        logits, boxes = fam.step_module(model, spec, "roi_core")(*feats, proposals)
    torch.testing.assert_close(logits[0, :k], tensors["class_logits"][0, :k], rtol=1e-5, atol=1e-5)
    raw = {"class_logits": logits, "box_regression": boxes, "proposals": proposals, "num_proposals": tensors["num_proposals"]}
    again = run_step(spec, "postprocess", raw, info, [RequestControls(0.05, 0.5, 1000)])[0]
    n = int(again["num_detections"][0])
    assert n == int(tensors["num_detections"][0, 0])
    np.testing.assert_allclose(again["boxes"][:n], tensors["boxes"][0, :n].numpy(), atol=1e-3)


def test_controls_are_per_image(frcnn: tuple[Any, Any, Any], chain: tuple[dict[str, Any], Any, np.ndarray]) -> None:
    from detserve.families.rcnn.decode import run_step

    _, _, spec = frcnn
    tensors, info, _ = chain
    raw = {n: torch.cat([tensors[n]] * 2) for n in ("class_logits", "box_regression", "proposals", "num_proposals")}
    strict, loose = RequestControls(0.2, 0.3, 4), RequestControls(0.0, 0.9, 500)
    a, b = run_step(spec, "postprocess", raw, torch.cat([info] * 2), [strict, loose])
    assert a["boxes"].shape == (4, 4) and 0 < int(a["num_detections"][0]) <= 4
    assert (a["scores"][: int(a["num_detections"][0])] > 0.2).all()
    assert int(b["num_detections"][0]) > int(tensors["num_detections"][0, 0])


def test_steps_and_ensemble_config() -> None:
    from converters.repository import BuildRequest  # noqa: F401 - the builder imports
    from detserve.tritonconfig import ServingOptions, ensemble_config, preprocess_config, step_config

    spec = RcnnDecodeSpec(
        num_classes=3, masks=True, num_levels=2, anchor_sizes=((32,), (64,)), aspect_ratios=((1.0,), (1.0,)),
        feature_names=("0",), feature_channels=8, rpn_pre_nms_top_n=50, rpn_post_nms_top_n=20, rpn_nms_thresh=0.7,
        rpn_score_thresh=0.0, box_coder_weights=(10.0, 10.0, 5.0, 5.0),
    )  # fmt: skip
    decls = steps(spec)
    assert [(d.role, d.kind) for d in decls] == [
        ("core", "core"), ("proposals", "python"), ("roi_core", "core"), ("detections", "python"),
        ("mask_core", "core"), ("postprocess", "python"),
    ]  # fmt: skip
    from detserve.specs import PreprocessSpec

    opts = ServingOptions()
    pre = PreprocessSpec(min_size=64, max_size=96)
    configs = [preprocess_config("m", pre, opts)]
    configs += [step_config("m", d, "python-onnxruntime", spec, opts, last=i == len(decls) - 1) for i, d in enumerate(decls)]
    ensemble = ensemble_config("m", configs, opts)
    assert [o.name for o in ensemble.output] == ["num_detections", "boxes", "scores", "labels", "masks"]
    mask_step = next(s for s in ensemble.ensemble_scheduling.step if s.model_name == "m_mask_core")
    assert dict(mask_step.input_map) == {"feat_0": "_feat_0", "det_boxes": "_det_boxes", "det_labels": "_det_labels"}
    by_name = {c.name: c for c in configs}
    assert by_name["m_roi_core"].parameters["onnx_file"].string_value == "model.onnx"
    assert by_name["m_proposals"].parameters["step"].string_value == "proposals"
    assert by_name["m_postprocess"].instance_group[0].count == opts.postprocess_instances
    assert by_name["m_proposals"].instance_group[0].count == 1


def test_paste_masks_equals_torchvision() -> None:
    from torchvision.models.detection.roi_heads import paste_masks_in_image

    from clients.masks import mask_iou, paste_masks

    rng = np.random.default_rng(0)
    for _ in range(20):
        k = 6
        h, w = (int(v) for v in rng.integers(5, 300, 2))
        x1, y1 = rng.uniform(0, w, k), rng.uniform(0, h, k)
        boxes = np.stack([x1, y1, x1 + rng.uniform(0, 200, k), y1 + rng.uniform(0, 200, k)], 1).astype(np.float32)
        masks = rng.random((k, 28, 28)).astype(np.float32)
        ref = paste_masks_in_image(torch.from_numpy(masks)[:, None], torch.from_numpy(boxes), (h, w))[:, 0].numpy()
        got = paste_masks(masks, boxes, (h, w))
        np.testing.assert_allclose(got, ref, atol=2e-6)
        binary = paste_masks(masks, boxes, (h, w), threshold=0.5)
        for a, b in zip(binary, ref > 0.5, strict=True):
            assert mask_iou(a, b) >= 0.999
    assert paste_masks(np.zeros((0, 28, 28)), np.zeros((0, 4)), (4, 5)).shape == (0, 4, 5)


def test_rollout_plan_covers_every_step_of_a_multi_step_ensemble(tmp_path: Any) -> None:
    """promote/rollback load every composing model the ensemble lists, not a fixed three."""
    from detserve.ops.versions import composing, plan
    from detserve.specs import PreprocessSpec
    from detserve.tritonconfig import ServingOptions, ensemble_config, preprocess_config, render, step_config

    spec = RcnnDecodeSpec(
        num_classes=3, masks=False, num_levels=1, anchor_sizes=((32,),), aspect_ratios=((1.0,),), feature_names=("0",),
        feature_channels=8, rpn_pre_nms_top_n=50, rpn_post_nms_top_n=20, rpn_nms_thresh=0.7, rpn_score_thresh=0.0,
        box_coder_weights=(10.0, 10.0, 5.0, 5.0),
    )  # fmt: skip
    opts = ServingOptions()
    decls = steps(spec)
    configs = [preprocess_config("m", PreprocessSpec(min_size=64, max_size=96), opts)]
    configs += [step_config("m", d, "python-onnxruntime", spec, opts, last=i == len(decls) - 1) for i, d in enumerate(decls)]
    for config in [*configs, ensemble_config("m", configs, opts)]:
        (tmp_path / config.name / "1").mkdir(parents=True)
        (tmp_path / config.name / "2").mkdir()
        (tmp_path / config.name / "config.pbtxt").write_text(render(config))
    models = ["m_preprocess", "m_core", "m_proposals", "m_roi_core", "m_postprocess"]
    assert composing("m", tmp_path) == models
    assert composing("m") == ["m_preprocess", "m_core", "m_postprocess"]  # no repository: the default three
    loads = [d.name for d, _ in plan(tmp_path, "m", 1, 2)]
    assert loads == ["m", *models, "m", *models]


def test_shapes_dataset_masks_are_exact_and_segm_map_reads_them() -> None:
    """The generated dataset's instance masks are the visible pixels its boxes and areas are measured
    on; segm mAP of those masks as detections is 1, and a shifted mask scores lower."""
    from detserve.verification.evaluation import ImageDetections, coco_metrics, has_segmentation, mask_rles
    from training.synthetic import SPLITS, coco_dict, render

    samples = [(f"{i}.png", render(SPLITS["val"], i)) for i in range(3)]
    annotations = coco_dict(SPLITS["val"], samples)
    assert has_segmentation(annotations)
    dets, shifted = {}, {}
    from pycocotools import mask as mask_utils

    for image_id, (_, s) in enumerate(samples, start=1):
        assert s.masks is not None and len(s.masks) == len(s.labels)
        binary = np.stack([mask_utils.decode({**r, "counts": r["counts"].encode()}) for r in s.masks]).astype(bool)
        assert binary.shape[1:] == s.image.shape[:2]
        for box, area, mask in zip(s.boxes, s.areas, binary, strict=True):
            ys, xs = np.nonzero(mask)
            assert mask.sum() == area and [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] == box.tolist()
        scores = np.linspace(0.9, 0.5, len(s.labels))
        dets[image_id] = ImageDetections(s.boxes.astype(np.float64), scores, s.labels, mask_rles(binary))
        moved = np.roll(binary, 6, axis=2)
        shifted[image_id] = ImageDetections(s.boxes.astype(np.float64), scores, s.labels, mask_rles(moved))
    assert coco_metrics(annotations, dets, iou_type="segm")["mAP"] == pytest.approx(1.0)
    assert coco_metrics(annotations, shifted, iou_type="segm")["mAP"] < 0.9
    assert coco_metrics(annotations, dets)["mAP"] == pytest.approx(1.0)  # box mAP unchanged by the masks


def test_draw_tints_each_pasted_mask(tmp_path: Any) -> None:
    import io

    from PIL import Image

    from clients.draw import draw_detections
    from clients.grpc_client import Detections

    buf = io.BytesIO()
    Image.fromarray(np.full((60, 80, 3), 128, np.uint8)).save(buf, format="PNG")
    mask = np.zeros((1, 28, 28), np.float16)
    mask[0, 5:23, 5:23] = 0.9
    box = np.array([[20.0, 10.0, 60.0, 50.0]], np.float32)
    dets = Detections(box, np.array([0.8], np.float32), np.array([1], np.int32), mask)
    out = np.asarray(Image.open(draw_detections(buf.getvalue(), dets, tmp_path / "d.png")).convert("RGB")).astype(int)
    from clients.masks import paste_masks

    inside = paste_masks(mask, box, (60, 80), threshold=0.5)[0]
    assert inside.sum() > 300
    assert (np.abs(out[inside] - 128).sum(-1) > 0).all()  # tinted
    assert (out[~inside][:, 0] == 128).mean() > 0.9  # elsewhere the grey stays (but for the box outline and label)


def test_a_checkpoint_builds_the_same_model(frcnn: tuple[Any, Any, Any], tmp_path: Any) -> None:
    from detserve.errors import CheckpointError

    fam, model, _ = frcnn
    path = tmp_path / "frcnn.pt"
    torch.save(model.state_dict(), path)
    again = fam.build(DETECTOR, 5, path, {}, None)
    for (k, a), b in zip(model.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    with pytest.raises(CheckpointError, match="does not fit"):
        fam.build(DETECTOR, 7, path, {}, None)  # another class count
    with pytest.raises(SpecError, match="checkpoint"):
        fam.build(DETECTOR, 5, path, {}, 0)  # a seed replaces weights: not with a checkpoint


def test_rows_of_different_lengths_are_zero_padded_per_request() -> None:
    from detserve.runtime.outputs import stack_rows

    a, b = np.ones((3, 4), np.float32), np.ones((1, 4), np.float32)
    out = stack_rows([a, b])
    assert out.shape == (2, 3, 4) and out[1, 1:].sum() == 0 and out[1, 0].sum() == 4
    assert stack_rows([np.array([2], np.int32), np.array([5], np.int32)]).tolist() == [[2], [5]]
