"""The vectorised post-processing against the eager torchvision detectors, on real photos (CPU).

Every model is a randomly initialised detector given a score spread by ``spread_head_init``; the
raw head outputs come from running the eager model's own transform, backbone, head and anchor
generator, so ``postprocess_batch`` sees exactly what the eager ``postprocess_detections`` sees.
"""

from __future__ import annotations

import dataclasses
import types
from collections import OrderedDict
from typing import Any

import numpy as np
import pytest
import torch
from skimage import data
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.retinanet import RetinaNet
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from detserve.errors import SpecError
from detserve.families import outputs_of
from detserve.families.torchvision.decode import anchors_for, postprocess_batch
from detserve.families.torchvision.from_model import postprocess_spec_from_model, preprocess_spec_from_model
from detserve.families.torchvision.models import build_detector, family_of, spread_head_init
from detserve.families.torchvision.spec import AnchorSpec, PostprocessSpec
from detserve.runtime.outputs import pad_detections
from detserve.specs import PreprocessSpec, RequestControls

FPN_KWARGS = {"min_size": 256, "max_size": 320}
ALL_IMAGES = ("astronaut", "chelsea", "coffee", "camera", "rocket")
# name -> (model kwargs, torch seed for the random backbone, fraction_above for spread_head_init,
# batches of images that share a padded size). The spread is measured on noise; the random VGG of
# ssd300 reacts to photos much more strongly, hence its own seed and a far smaller fraction.
MODELS: dict[str, tuple[dict[str, Any], int, float, tuple[tuple[str, ...], ...]]] = {
    "ssdlite320_mobilenet_v3_large": ({}, 0, 0.002, (ALL_IMAGES,)),
    "ssd300_vgg16": ({}, 2, 0.0001, (("astronaut", "coffee", "camera"),)),
    "retinanet_resnet50_fpn_v2": (FPN_KWARGS, 0, 0.002, (ALL_IMAGES, ("chelsea", "coffee", "rocket"))),
    "fcos_resnet50_fpn": (FPN_KWARGS, 0, 0.005, (ALL_IMAGES, ("chelsea", "coffee", "rocket"))),
}


def photo(name: str) -> torch.Tensor:
    """A skimage sample photo as the float [3, H, W] 0..1 tensor torchvision detectors take."""
    pixels = torch.from_numpy(getattr(data, name)())
    if pixels.ndim == 2:  # grey (camera): three equal channels
        pixels = pixels[:, :, None].expand(-1, -1, 3)
    return pixels.permute(2, 0, 1).float() / 255


@dataclasses.dataclass
class Batch:
    padded_hw: tuple[int, int]
    resized: list[tuple[int, int]]
    original: list[tuple[int, int]]
    head: dict[str, torch.Tensor]
    anchors: list[torch.Tensor]
    per_level: list[int]

    def run(self, spec: PostprocessSpec, controls: list[RequestControls]) -> list[dict[str, torch.Tensor]]:
        return postprocess_batch(
            spec, self.head, self.padded_hw, torch.tensor(self.resized), torch.tensor(self.original), controls
        )


@dataclasses.dataclass
class Case:
    name: str
    family: str
    model: torch.nn.Module
    spec: PostprocessSpec
    batches: list[Batch]

    def defaults(self, n: int) -> list[RequestControls]:
        return [RequestControls(self.spec.score_thresh, self.spec.nms_thresh, self.spec.detections_per_img)] * n

    def eager(self, batch: Batch, **settings: Any) -> list[dict[str, torch.Tensor]]:
        """The eager model's own postprocess_detections + transform.postprocess, with thresholds set."""
        saved = {k: getattr(self.model, k) for k in settings}
        try:
            for k, v in settings.items():
                setattr(self.model, k, v)
            if self.family == "ssd":
                dets = self.model.postprocess_detections(batch.head, batch.anchors, batch.resized)
            else:
                head = {k: list(v.split(batch.per_level, dim=1)) for k, v in batch.head.items()}
                anchors = [list(a.split(batch.per_level)) for a in batch.anchors]
                dets = self.model.postprocess_detections(head, anchors, batch.resized)
            return self.model.transform.postprocess(dets, batch.resized, batch.original)
        finally:
            for k, v in saved.items():
                setattr(self.model, k, v)


def raw_batch(model: torch.nn.Module, names: tuple[str, ...]) -> Batch:
    """Run the eager model's transform, backbone, head and anchor generator, as its forward does."""
    images = [photo(n) for n in names]
    with torch.no_grad():
        image_list, _ = model.transform(images)
        features = model.backbone(image_list.tensors)
        features = [features] if isinstance(features, torch.Tensor) else list(features.values())
        head = model.head(features)
        anchors = model.anchor_generator(image_list, features)
    per_location = model.anchor_generator.num_anchors_per_location()
    return Batch(
        padded_hw=(int(image_list.tensors.shape[-2]), int(image_list.tensors.shape[-1])),
        resized=[(int(h), int(w)) for h, w in image_list.image_sizes],
        original=[(int(i.shape[-2]), int(i.shape[-1])) for i in images],
        head=head,
        anchors=anchors,
        per_level=[a * f.shape[-2] * f.shape[-1] for a, f in zip(per_location, features, strict=True)],
    )


@pytest.fixture(scope="module", params=list(MODELS))
def case(request: pytest.FixtureRequest) -> Case:
    name = request.param
    kwargs, seed, fraction, batches = MODELS[name]
    torch.manual_seed(seed)  # the backbone's random init
    model = spread_head_init(build_detector(name, 5, **kwargs), seed=0, fraction_above=fraction)
    spec = postprocess_spec_from_model(model, family_of(name))
    return Case(name, family_of(name), model, spec, [raw_batch(model, names) for names in batches])


def sorted_numpy(det: dict[str, torch.Tensor]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Detections in a canonical order (score desc, then label, then box), for an order-free compare."""
    boxes, scores, labels = (det[k].detach().cpu().numpy() for k in ("boxes", "scores", "labels"))
    order = np.lexsort((boxes[:, 3], boxes[:, 2], boxes[:, 1], boxes[:, 0], labels, -scores))
    return boxes[order], scores[order], labels[order]


def assert_same(ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    assert ours["boxes"].dtype == torch.float32 and ours["scores"].dtype == torch.float32
    assert ours["labels"].dtype == torch.int64
    assert ours["boxes"].shape == ref["boxes"].shape, f"{len(ours['scores'])} detections vs eager {len(ref['scores'])}"
    assert torch.all(ours["scores"][:-1] >= ours["scores"][1:]), "not sorted by score"
    (ob, os_, ol), (rb, rs, rl) = sorted_numpy(ours), sorted_numpy(ref)
    np.testing.assert_array_equal(ol, rl)
    np.testing.assert_allclose(os_, rs, rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(ob, rb, rtol=1e-6, atol=1e-5)


# (a) anchors


def test_anchors_equal_the_models_own(case: Case) -> None:
    for batch in case.batches:
        anchors, per_level = anchors_for(case.spec, batch.padded_hw)
        assert torch.equal(anchors, batch.anchors[0])
        assert per_level == batch.per_level
        again, _ = anchors_for(case.spec, list(batch.padded_hw))
        assert again is anchors  # cached per padded size


def test_fixed_size_models_refuse_other_sizes(case: Case) -> None:
    if case.spec.anchors.fixed_input_hw is None:
        pytest.skip("dynamic input size")
    with pytest.raises(SpecError, match="only accepts inputs"):
        anchors_for(case.spec, (256, 256))


# (b) a batch equals the eager model, image by image


def test_batch_equals_eager(case: Case) -> None:
    for batch in case.batches:
        n = len(batch.resized)
        ours = batch.run(case.spec, case.defaults(n))
        ref = case.eager(batch)
        assert len(ours) == n
        for o, r in zip(ours, ref, strict=True):
            assert_same(o, r)
        assert sum(len(r["scores"]) for r in ref) > 0, "the fixture gives no detections at all"
        # the spread keeps the scores that matter (>= 0.05) under the cap, so NMS, not the cut, decides
        assert all(int((r["scores"] >= 0.05).sum()) < case.spec.detections_per_img for r in ref)


def test_batch_result_does_not_depend_on_the_other_images(case: Case) -> None:
    batch = case.batches[0]
    together = batch.run(case.spec, case.defaults(len(batch.resized)))
    for i in (0, len(batch.resized) - 1):
        alone = dataclasses.replace(
            batch,
            resized=batch.resized[i : i + 1],
            original=batch.original[i : i + 1],
            head={k: v[i : i + 1] for k, v in batch.head.items()},
        )
        assert_same(alone.run(case.spec, case.defaults(1))[0], together[i])


# (c) per-request controls


def test_per_request_controls_change_only_their_image(case: Case) -> None:
    batch = case.batches[0]
    n = len(batch.resized)
    spec = case.spec
    default = batch.run(spec, case.defaults(n))
    scores1 = default[1]["scores"]
    higher = float(scores1[len(scores1) // 2]) if len(scores1) else 0.5
    controls = case.defaults(n)
    controls[1] = RequestControls(higher, spec.nms_thresh, spec.detections_per_img)
    controls[2] = RequestControls(spec.score_thresh, 0.3, 3)
    ours = batch.run(spec, controls)
    for i in [0, *range(3, n)]:
        assert_same(ours[i], default[i])
    assert len(ours[1]["scores"]) < len(scores1) or not len(scores1)
    assert len(ours[2]["scores"]) == min(3, len(default[2]["scores"]))
    assert_same(ours[1], case.eager(batch, score_thresh=higher)[1])
    assert_same(ours[2], case.eager(batch, nms_thresh=0.3, detections_per_img=3)[2])


def test_threshold_one_gives_no_detections(case: Case) -> None:
    batch = case.batches[0]
    n = len(batch.resized)
    ours = batch.run(case.spec, [RequestControls(1.0, 0.5, 10)] * n)
    assert all(d["boxes"].shape == (0, 4) and d["labels"].dtype == torch.int64 for d in ours)


def near_threshold_outputs(n: int, rows: int) -> tuple[PostprocessSpec, torch.Tensor, dict[str, torch.Tensor]]:
    """91 classes (large float32 NMS offsets), neighbouring boxes of one class overlapping at IoU 0.6 +- 1e-3."""
    anchors_spec = AnchorSpec(kind="grid", sizes=((32,),), aspect_ratios=((1.0,),), strides=(8,))
    spec = PostprocessSpec(
        family="retinanet",
        num_classes=91,
        anchors=anchors_spec,
        score_thresh=0.05,
        nms_thresh=0.6,
        detections_per_img=1000,
        topk_candidates=1000,
    )
    anchors, _ = anchors_for(spec, (256, 256))
    m = anchors.shape[0]
    g = torch.Generator().manual_seed(0)
    position = torch.arange(m)
    label = 60 + ((position % 32) // 4 + (position // 32) * 7) % 31  # runs of 4 neighbours share a class
    logits = torch.full((n, m, 91), -10.0)
    logits[:, position, label] = torch.where(position < rows * 32, torch.randn(n, m, generator=g), -10.0)
    regression = torch.zeros(n, m, 4)
    regression[..., 0::2] = (torch.rand(n, m, 1, generator=g) - 0.5) * 2e-3  # jitter x and width
    return spec, anchors, {"cls_logits": logits, "bbox_regression": regression}


# top-k keeps <= 1000 candidates per image, so eager NMS takes its single float32-offset call per image;
# ours runs one float32 NMS per image when the batch has > 1000 boxes (n=4), else one float64 call (n=1, 2)
@pytest.mark.parametrize(("n", "rows"), [(4, 32), (1, 32), (2, 12)])
def test_nms_keeps_eagers_float32_decisions_near_the_threshold(n: int, rows: int) -> None:
    spec, anchors, outputs = near_threshold_outputs(n, rows)
    settings = {k: getattr(spec, k) for k in ("score_thresh", "nms_thresh", "detections_per_img", "topk_candidates")}
    eager_self = types.SimpleNamespace(**settings, box_coder=BoxCoder((1.0, 1.0, 1.0, 1.0)))
    sizes = [(256, 256)] * n
    head = {k: [v] for k, v in outputs.items()}
    ref = RetinaNet.postprocess_detections(eager_self, head, [[anchors]] * n, sizes)
    controls = [RequestControls(spec.score_thresh, spec.nms_thresh, spec.detections_per_img)] * n
    ours = postprocess_batch(spec, outputs, (256, 256), torch.tensor(sizes), torch.tensor(sizes), controls)
    for o, r in zip(ours, ref, strict=True):
        assert 200 < len(r["scores"]) < 1000
        assert_same(o, r)


# (d) fixed-shape outputs


def test_pad_detections_shapes_and_zero_padding(case: Case) -> None:
    batch = case.batches[0]
    det = max(batch.run(case.spec, case.defaults(len(batch.resized))), key=lambda d: len(d["scores"]))
    k = len(det["scores"])
    for max_det in (k + 7, max(1, k // 2)):
        out = pad_detections(det, max_det)
        kept = min(k, max_det)
        assert out["num_detections"].dtype == np.int32 and out["num_detections"].tolist() == [kept]
        assert out["boxes"].shape == (max_det, 4) and out["boxes"].dtype == np.float32
        assert out["scores"].shape == (max_det,) and out["scores"].dtype == np.float32
        assert out["labels"].shape == (max_det,) and out["labels"].dtype == np.int32
        np.testing.assert_array_equal(out["boxes"][:kept], det["boxes"][:kept].numpy())
        np.testing.assert_array_equal(out["labels"][:kept], det["labels"][:kept].numpy())
        assert not out["boxes"][kept:].any() and not out["scores"][kept:].any() and not out["labels"][kept:].any()
    empty = {"boxes": torch.zeros((0, 4)), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)}
    out = pad_detections(empty, 4)
    assert out["num_detections"].tolist() == [0] and not out["boxes"].any()


# (e) specs read from the model


def test_specs_from_model(case: Case) -> None:
    pre = preprocess_spec_from_model(case.model)
    assert PreprocessSpec.from_json(pre.to_json()) == pre
    assert pre.pad_value == 0.0 and pre.image_mean == tuple(case.model.transform.image_mean)
    spec = case.spec
    assert spec.num_classes == 5 and spec.family == case.family
    assert {o.name for o in outputs_of(spec)} == set(case.batches[0].head)
    if case.family == "ssd":
        assert pre.resize_mode == "fixed" and pre.fixed_input_hw == case.batches[0].padded_hw
        assert spec.anchors.kind == "default_boxes" and spec.box_coder_weights == (10.0, 10.0, 5.0, 5.0)
    else:
        assert pre.resize_mode == "torchvision" and (pre.min_size, pre.max_size, pre.size_divisible) == (256, 320, 32)
        assert spec.anchors.kind == "grid" and spec.anchors.strides == (8, 16, 32, 64, 128)
    back = PostprocessSpec.from_json(spec.to_json())
    assert back == spec and back.to_json() == spec.to_json()
    for batch in case.batches:
        assert torch.equal(anchors_for(back, batch.padded_hw)[0], batch.anchors[0])


def test_fixed_size_is_width_height_in_torchvision() -> None:
    model = torch.nn.Module()
    model.transform = GeneralizedRCNNTransform(300, 400, [0.5] * 3, [0.25] * 3, size_divisible=1, fixed_size=(400, 300))
    pre = preprocess_spec_from_model(model)
    resized, _ = model.transform([torch.rand(3, 123, 77)])
    assert pre.resize_mode == "fixed" and pre.fixed_size == tuple(resized.tensors.shape[-2:]) == (300, 400)
    assert pre.image_mean == (0.5, 0.5, 0.5) and pre.image_std == (0.25, 0.25, 0.25)


class FloorBackbone(torch.nn.Module):
    """Feature maps of floor(H / stride), which the ceil rule of AnchorSpec.strides cannot describe."""

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        h, w = x.shape[-2:]
        return OrderedDict((str(s), torch.zeros((1, 1, h // s, w // s))) for s in (8, 16, 32, 64, 128))


def test_spec_errors(case: Case, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SpecError, match="unknown detector family"):
        postprocess_spec_from_model(case.model, "yolo")
    with pytest.raises(SpecError, match="is not a torchvision"):
        postprocess_spec_from_model(case.model, "fcos" if case.family != "fcos" else "retinanet")
    with pytest.raises(SpecError, match="GeneralizedRCNNTransform"):
        preprocess_spec_from_model(torch.nn.Linear(2, 2))
    wrong = dataclasses.replace(case.spec, num_classes=7)
    batch = case.batches[0]
    with pytest.raises(SpecError, match="cls_logits has shape"):
        batch.run(wrong, case.defaults(len(batch.resized)))
    if case.family == "ssd":
        return
    monkeypatch.setattr(case.model, "backbone", FloorBackbone())
    with pytest.raises(SpecError, match="ceil"):
        postprocess_spec_from_model(case.model, case.family)
    monkeypatch.setattr(case.model, "anchor_generator", torch.nn.Identity())
    with pytest.raises(SpecError, match="unsupported anchor generator"):
        postprocess_spec_from_model(case.model, case.family)


def test_anchor_spec_round_trips_through_json() -> None:
    spec = AnchorSpec(kind="grid", sizes=((8,), (16,)), aspect_ratios=((1.0,), (1.0,)), strides=(8, 16))
    assert AnchorSpec.from_json(spec.to_json()) == spec
    anchors, per_level = anchors_for(spec, (64, 96))
    assert per_level == [8 * 12, 4 * 6] and anchors.shape == (sum(per_level), 4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_outputs_give_the_eager_detections(case: Case) -> None:
    batch = case.batches[0]
    on_gpu = dataclasses.replace(batch, head={k: v.cuda() for k, v in batch.head.items()})
    ours = on_gpu.run(case.spec, case.defaults(len(batch.resized)))
    assert ours[0]["boxes"].is_cuda and anchors_for(case.spec, batch.padded_hw, device="cuda")[0].is_cuda
    for o, r in zip(ours, case.eager(batch), strict=True):
        assert_same({k: v.cpu() for k, v in o.items()}, r)
