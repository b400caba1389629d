"""The R-CNN family's zoo half: eager models, the score-spread fixture, the cores, the reference.

Nothing here downloads weights (``weights=None, weights_backbone=None``); a checkpoint is a state
dict loaded with ``weights_only=True`` (torchvision.models.load_checkpoint).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from detserve.errors import SpecError
from detserve.families.rcnn.spec import DETECTORS, RcnnDecodeSpec
from detserve.specs import PreprocessSpec

if TYPE_CHECKING:
    import torch


def _model_keywords(detector: str) -> list[str]:
    from torchvision.models import detection
    from torchvision.models.detection.faster_rcnn import FasterRCNN
    from torchvision.models.detection.mask_rcnn import MaskRCNN

    cls = MaskRCNN if detector.startswith("mask") else FasterRCNN
    skip = {"self", "backbone", "num_classes", "kwargs", "weights", "weights_backbone", "rpn_anchor_generator", "rpn_head"}
    skip |= {"box_roi_pool", "box_head", "box_predictor", "mask_roi_pool", "mask_head", "mask_predictor", "progress"}
    params = set(inspect.signature(cls.__init__).parameters) | set(inspect.signature(getattr(detection, detector)).parameters)
    return sorted(params - skip)


def build(detector: str, num_classes: int, checkpoint: Any, model_kwargs: dict[str, Any], seed: int | None) -> Any:
    """The eager detector in eval mode; ``seed``: the spread-init test fixture (no checkpoint then)."""
    import torch
    from torchvision.models import detection

    from detserve.families.torchvision.models import load_checkpoint

    if detector not in DETECTORS:
        raise SpecError(f"unknown R-CNN detector {detector!r}", hint=f"choose one of: {', '.join(DETECTORS)}")
    if num_classes < 2:
        raise SpecError(f"num_classes must be >= 2 (torchvision counts the background), got {num_classes}")
    valid = _model_keywords(detector)
    unknown = sorted(set(model_kwargs) - set(valid))
    if unknown:  # torchvision passes unknown keywords on to the transform, which ignores them
        raise SpecError(f"bad keyword for {detector}: {', '.join(unknown)}", hint=f"model keywords: {', '.join(valid)}")
    if seed is not None and checkpoint is not None:
        raise SpecError("a spread-init seed replaces the heads' weights; it cannot be combined with a checkpoint")
    with torch.random.fork_rng():
        torch.manual_seed(0 if seed is None else seed)
        try:
            model = getattr(detection, detector)(weights=None, weights_backbone=None, num_classes=num_classes, **model_kwargs)
        except (TypeError, ValueError) as e:
            raise SpecError(f"bad keyword value for {detector}: {e}", hint=f"model keywords: {', '.join(valid)}") from e
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
    if seed is not None:
        spread_init(model, seed)
    return model.eval()


OBJECTNESS_SHIFT = -3.0  # logits ~ N(-3, 2) on the calibration photo: the best anchors are not saturated


def spread_init(model: Any, seed: int, logit_std: float = 3.0) -> Any:
    """Give an untrained R-CNN proposals and scores that mean something, deterministically (a test fixture).

    torchvision initialises the RPN head with std 0.01 (objectness ~0.5 everywhere, deltas ~0) and
    the box predictor near zero: proposals would be the anchors in arbitrary order and every class
    scores ~1/C. Re-drawn with a fixed seed and scaled on a sample photograph: objectness logits
    and class logits to ``logit_std``, RPN deltas and box deltas moderate, mask logits to ``logit_std``
    so the 28x28 probabilities spread over 0..1.
    """
    import torch

    from detserve.families.spread import captured_outputs, redraw

    gen = torch.Generator().manual_seed(seed)
    photos = _photos()
    _calibrate_batchnorm(model, photos)
    image = photos[0]
    _unit_fpn_outputs(model, model.transform([image])[0].tensors[0])
    rpn, heads = model.rpn.head, model.roi_heads
    layers = {
        "obj": rpn.cls_logits,
        "rpn_box": rpn.bbox_pred,
        "cls": heads.box_predictor.cls_score,
        "box": heads.box_predictor.bbox_pred,
    }
    if heads.mask_predictor is not None:
        layers["mask"] = heads.mask_predictor.mask_fcn_logits
    target = {"obj": 2.0, "rpn_box": 0.2, "cls": logit_std, "box": 1.0, "mask": logit_std}
    redraw(list(layers.values()), gen)
    todo = dict(layers)
    with captured_outputs(list(layers.values()), rows=_channels_last) as captured:
        for _ in range(2):  # the mask head sees RoIs only once the box layers give detections
            for rows in captured.values():
                rows.clear()
            with torch.no_grad():
                model.eval()([image])
            for k in [k for k in todo if captured[id(todo[k])] and captured[id(todo[k])][0].shape[0] > 1]:
                layer = todo.pop(k)
                _standardise(layer, torch.cat(captured[id(layer)]), target[k])
    _blank_objectness_low(model)
    with torch.no_grad():
        # objectness probabilities must not saturate: the RPN ranks and NMS-es sigmoid(logit), and
        # near 1.0 float32 rounds neighbouring logits to one probability (ties at the top-n cut)
        rpn.cls_logits.bias.add_(OBJECTNESS_SHIFT)
    return model


def _channels_last(o: torch.Tensor) -> torch.Tensor:
    """[..., C] rows: one per position / RoI (each output channel is standardised over them)."""
    return (o.movedim(1, -1) if o.dim() == 4 else o).reshape(-1, o.shape[1]).detach()


def _blank_objectness_low(model: Any) -> None:
    """Negate the objectness channels that rank a blank area (padding, flat colour) high.

    A blank area gives the same features at every position, so the same objectness at many
    anchors: exact ties. Where such a tie sits at a top-n cut of ``filter_proposals``, float noise
    (ONNX Runtime vs PyTorch, ~1e-5) picks other anchors, and with an untrained box head other
    proposals mean unrelated high-score detections. In a trained RPN blank areas score low; so here.
    """
    import torch

    conv = model.rpn.head.cls_logits
    with torch.no_grad():
        features = model.backbone(torch.zeros((1, 3, 320, 320)))
        objectness, _ = model.rpn.head(list(features.values()))
        blank = torch.stack([o[0].flatten(1).median(1).values for o in objectness]).mean(0)
        sign = torch.where(blank > 0, -1.0, 1.0)
        conv.weight.mul_(sign.view(-1, 1, 1, 1))
        conv.bias.mul_(sign)


def _calibrate_batchnorm(model: Any, photos: list[torch.Tensor]) -> None:
    """Set the backbone's BatchNorm statistics on the sample photographs (cumulative averages), as training would.

    At their init statistics (mean 0, var 1) an untrained MobileNetV3 body shrinks activations to
    ~1e-8 and its feature maps hardly depend on the image (interior positions equal to 1e-4):
    the RPN would rank near-ties. With measured statistics every layer passes on unit-size,
    image-dependent activations.
    """
    import torch

    norms = [m for m in model.backbone.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    saved = [(m, m.momentum) for m in norms]
    with torch.no_grad():
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative moving average over the calibration batches
        model.backbone.train()
        try:
            for photo in photos:
                model.backbone(model.transform([photo])[0].tensors)
        finally:
            model.backbone.eval()
            for m, momentum in saved:
                m.momentum = momentum


def _photos() -> list[torch.Tensor]:
    """The bundled sample photographs as float RGB in 0..1, the eager model's input."""
    import torch

    from detserve.samples import sample_photos

    return [torch.from_numpy(rgb).permute(2, 0, 1).float().div(255.0) for rgb in sample_photos()]


def _unit_fpn_outputs(model: Any, image: torch.Tensor) -> None:
    """Scale each FPN output conv so its maps have std 1 on ``image``.

    An untrained MobileNetV3 body (BatchNorm at its init statistics) shrinks activations to ~1e-8:
    every RoI's box-head output is then its bias alone, and class scores would come from float
    rounding. Scaling the FPN's outputs keeps the body's (real) spatial variation and gives the
    heads features of a normal size. (ResNet50 FPN maps are ~30 already: scaled alike.)
    """
    import torch

    convs = [m for block in model.backbone.fpn.layer_blocks for m in block.modules() if isinstance(m, torch.nn.Conv2d)]
    captured: list[torch.Tensor] = []
    hooks = [c.register_forward_hook(lambda m, i, o: captured.append(o.detach())) for c in convs]
    try:
        with torch.no_grad():
            model.backbone(image[None])
    finally:
        for h in hooks:
            h.remove()
    with torch.no_grad():
        for conv, out in zip(convs, captured, strict=True):
            factor = 1.0 / (float(out.std()) or 1.0)
            conv.weight.mul_(factor)
            if conv.bias is not None:
                conv.bias.mul_(factor)


def _standardise(layer: Any, rows: torch.Tensor, std_target: float) -> None:
    """Each output channel standardised over positions/RoIs (logits then differ between RoIs, not
    only between classes: random features share a large common part)."""
    import torch

    with torch.no_grad():
        factor = std_target / rows.std(0).clamp_min(1e-12)
        layer.weight.mul_(factor.view(-1, *([1] * (layer.weight.dim() - 1))))
        layer.bias.copy_(-rows.mean(0) * factor)


def preprocess_spec(model: Any) -> PreprocessSpec:
    """torchvision's ``GeneralizedRCNNTransform``, as for the single-stage torchvision detectors."""
    from detserve.families.torchvision.from_model import preprocess_spec_from_model

    return preprocess_spec_from_model(model)


def decode_spec(model: Any, pre: PreprocessSpec) -> RcnnDecodeSpec:
    return decode_spec_from_model(model)


def decode_spec_from_model(model: Any) -> RcnnDecodeSpec:
    """The spec of the live model: its RPN, anchor generator, RoI pooler and RoI heads' settings."""
    import torch

    from detserve.families.torchvision.from_model import STRIDE_PROBE_HW

    rpn, heads = model.rpn, model.roi_heads
    with torch.no_grad():
        features = model.backbone(torch.zeros((1, 3, *STRIDE_PROBE_HW)))
    pooled = [n for n in heads.box_roi_pool.featmap_names if n in features]
    gen = rpn.anchor_generator
    return RcnnDecodeSpec(
        num_classes=int(heads.box_predictor.cls_score.out_features),
        masks=heads.mask_predictor is not None,
        num_levels=len(features),
        anchor_sizes=tuple(tuple(int(s) for s in sizes) for sizes in gen.sizes),
        aspect_ratios=tuple(tuple(float(r) for r in ratios) for ratios in gen.aspect_ratios),
        feature_names=tuple(pooled),
        feature_channels=int(model.backbone.out_channels),
        rpn_pre_nms_top_n=int(rpn._pre_nms_top_n["testing"]),
        rpn_post_nms_top_n=int(rpn._post_nms_top_n["testing"]),
        rpn_nms_thresh=float(rpn.nms_thresh),
        rpn_score_thresh=float(rpn.score_thresh),
        box_coder_weights=tuple(float(w) for w in heads.box_coder.weights),  # type: ignore[arg-type]
        score_thresh=float(heads.score_thresh),
        nms_thresh=float(heads.nms_thresh),
        detections_per_img=int(heads.detections_per_img),
    )


# --------------------------------------------------------------------------- cores


def _pool_levels(pool: Any, spec: RcnnDecodeSpec, model: Any) -> tuple[list[float], Any]:
    """The pooler's scales and level mapper for the FPN's true strides (torchvision infers them per batch).

    torchvision's ``_setup_scales`` rounds feature size / largest resized image side to a power of
    two: that is the stride except for images whose resized height is below ~2x the padding
    (tens of pixels), where eager itself depends on the batch; serving uses the strides.
    """
    import torch
    from torchvision.ops.poolers import _setup_scales

    from detserve.families.torchvision.from_model import STRIDE_PROBE_HW

    with torch.no_grad():
        features = model.backbone(torch.zeros((1, 3, *STRIDE_PROBE_HW)))
    maps = [features[n] for n in spec.feature_names]
    return _setup_scales(maps, [STRIDE_PROBE_HW], pool.canonical_scale, pool.canonical_level)  # type: ignore[no-any-return]


def _roi_align(pool: Any, levels: tuple[list[float], Any], maps: Sequence[torch.Tensor], boxes: torch.Tensor) -> torch.Tensor:
    """``MultiScaleRoIAlign`` on a padded batch of boxes [N, K, 4] (torchvision's ``_multiscale_roi_align``
    with the batch index built from the fixed K, so the graph has a dynamic batch)."""
    import torch
    import torchvision
    from torchvision.ops import roi_align
    from torchvision.ops.poolers import _onnx_merge_levels

    scales, mapper = levels
    n = boxes.shape[0]
    ids = torch.zeros_like(boxes[..., :1]) + torch.arange(n, dtype=boxes.dtype, device=boxes.device).view(-1, 1, 1)
    rois = torch.cat([ids, boxes], dim=2).reshape(-1, 5)
    flat = boxes.reshape(-1, 4)
    if len(maps) == 1:
        return roi_align(maps[0], rois, pool.output_size, scales[0], pool.sampling_ratio)
    lvl = mapper([flat])
    result = torch.zeros((flat.shape[0], maps[0].shape[1], *pool.output_size), dtype=maps[0].dtype)
    tracing = []
    for level, (feature, scale) in enumerate(zip(maps, scales, strict=True)):
        idx = torch.where(lvl == level)[0]
        out = roi_align(feature, rois[idx], pool.output_size, scale, pool.sampling_ratio)
        if torchvision._is_tracing():
            tracing.append(out)
        else:
            result[idx] = out
    return _onnx_merge_levels(lvl, tracing) if torchvision._is_tracing() else result


def step_module(model: Any, spec: RcnnDecodeSpec, role: str) -> torch.nn.Module:
    """The exportable network of a core step: inputs and outputs in the declared order."""
    import torch

    heads = model.roi_heads
    names = spec.feature_names

    class FirstCore(torch.nn.Module):
        """images -> FPN maps (those the poolers read), objectness and deltas per level."""

        def __init__(self) -> None:
            super().__init__()
            self.backbone, self.head = model.backbone, model.rpn.head

        def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
            features = self.backbone(images)
            objectness, deltas = self.head(list(features.values()))
            return (*(features[n] for n in names), *objectness, *deltas)

    class RoiCore(torch.nn.Module):
        """FPN maps + proposals [N, P, 4] -> class logits [N, P, C], box regression [N, P, 4C]."""

        def __init__(self) -> None:
            super().__init__()
            self.box_head, self.box_predictor = heads.box_head, heads.box_predictor
            self.levels = _pool_levels(heads.box_roi_pool, spec, model)

        def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            *maps, proposals = inputs
            pooled = _roi_align(heads.box_roi_pool, self.levels, maps, proposals)
            logits, boxes = self.box_predictor(self.box_head(pooled))
            n, p = proposals.shape[0], proposals.shape[1]
            return logits.reshape(n, p, -1), boxes.reshape(n, p, -1)

    class MaskCore(torch.nn.Module):
        """FPN maps + final boxes [N, D, 4] (resized pixels) + labels [N, D] -> each box's label's 28x28 probabilities."""

        def __init__(self) -> None:
            super().__init__()
            self.mask_head, self.mask_predictor = heads.mask_head, heads.mask_predictor
            self.levels = _pool_levels(heads.mask_roi_pool, spec, model)

        def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
            *maps, boxes, labels = inputs
            logits = self.mask_predictor(self.mask_head(_roi_align(heads.mask_roi_pool, self.levels, maps, boxes)))
            index = labels.reshape(-1).long()[:, None, None, None].expand(-1, 1, logits.shape[2], logits.shape[3])
            probs = logits.gather(1, index).sigmoid()  # maskrcnn_inference: sigmoid, the label's channel
            return probs.reshape(boxes.shape[0], boxes.shape[1], logits.shape[2], logits.shape[3])

    cores = {"core": FirstCore, "roi_core": RoiCore, "mask_core": MaskCore}
    if role not in cores or (role == "mask_core" and not spec.masks):
        raise SpecError(f"the R-CNN family has no core {role!r}")
    return cores[role]().eval()


def core(model: Any, spec: RcnnDecodeSpec) -> torch.nn.Module:
    """The first core (export/verification tools that look at one core)."""
    return step_module(model, spec, "core")


# --------------------------------------------------------------------------- reference


def reference(model: Any, rgb: np.ndarray, score_threshold: float, iou_threshold: float | None, max_det: int) -> dict[str, Any]:
    """``model([image])`` with per-call thresholds; Mask R-CNN adds ``masks`` (the pasted probabilities,
    [N, H, W]) and ``mask_probs`` (the mask head's 28x28 probabilities of each detection's label)."""
    import torch

    heads = model.roi_heads
    saved = (heads.score_thresh, heads.nms_thresh, heads.detections_per_img)
    heads.score_thresh = score_threshold
    heads.nms_thresh = saved[1] if iou_threshold is None else iou_threshold
    heads.detections_per_img = max_det
    logits: list[torch.Tensor] = []
    hook = heads.mask_predictor.register_forward_hook(lambda m, i, o: logits.append(o)) if heads.mask_predictor else None
    try:
        with torch.no_grad():
            out = model([torch.from_numpy(rgb).permute(2, 0, 1).float().div(255.0)])[0]
    finally:
        heads.score_thresh, heads.nms_thresh, heads.detections_per_img = saved
        if hook is not None:
            hook.remove()
    result = {k: out[k].numpy() for k in ("boxes", "scores", "labels")}
    if "masks" in out:
        result["masks"] = out["masks"][:, 0].numpy()
        labels = out["labels"]
        probs = logits[0].sigmoid()[torch.arange(labels.shape[0]), labels] if labels.numel() else torch.zeros((0, 28, 28))
        result["mask_probs"] = probs.numpy()
    return result
