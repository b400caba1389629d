"""Raw core outputs -> detections in original-image pixels, exactly as the eager torchvision model.

This is the torch side of serving: it runs inside the Triton python-backend post-processing model
and in every reference path. It reproduces ``model.postprocess_detections`` followed by
``model.transform.postprocess`` (SSD, RetinaNet, FCOS) with the *same* torchvision classes and ops
(anchor generators, box coders, ``batched_nms``, ``resize_boxes`` arithmetic), so the numbers match
the eager model, but vectorised over a whole batch: scoring, top-k, decoding and clipping run once
for all images, and NMS runs once per distinct IoU threshold. Each image may carry its own
:class:`~detserve.specs.RequestControls` (score threshold, IoU threshold, max detections).

NMS reproduces each image's eager ``batched_nms`` call, including the float32 per-class offsets it
applies (see :func:`_eager_nms_inputs`), so IoUs are judged on the same float32 coordinates.
Known limit of "exact": where candidate scores tie exactly (e.g. identical logits over a constant
or padded image region), which of the tied candidates top-k/NMS keep is unspecified in torchvision
itself, so it can differ from the eager model.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from detserve.errors import SpecError
from detserve.families.torchvision.spec import AnchorSpec, PostprocessSpec, output_names

if TYPE_CHECKING:
    import torch
    from torch import Tensor
    from torchvision.models.detection.anchor_utils import AnchorGenerator, DefaultBoxGenerator

    from detserve.specs import RequestControls

_NEG_INF = float("-inf")


def _generator(anchors: AnchorSpec) -> AnchorGenerator | DefaultBoxGenerator:
    """The model's own torchvision generator class, so anchors come from the very same code."""
    from torchvision.models.detection.anchor_utils import AnchorGenerator, DefaultBoxGenerator

    if anchors.kind == "grid":
        sizes = tuple(tuple(s) for s in anchors.sizes)
        return AnchorGenerator(sizes=sizes, aspect_ratios=tuple(tuple(a) for a in anchors.aspect_ratios))
    return DefaultBoxGenerator(
        [list(a) for a in anchors.aspect_ratios],
        min_ratio=anchors.min_ratio,
        max_ratio=anchors.max_ratio,
        scales=list(anchors.scales) if anchors.scales is not None else None,
        steps=list(anchors.steps) if anchors.steps is not None else None,
        clip=anchors.clip,
    )


@functools.lru_cache(maxsize=64)
def _cached_anchors(
    anchors: AnchorSpec, padded_hw: tuple[int, int], device: str, dtype: torch.dtype
) -> tuple[Tensor, tuple[int, ...]]:
    """Anchors depend only on the padded size, so a server builds them once per size it sees."""
    import torch
    from torchvision.models.detection.image_list import ImageList

    gen = _generator(anchors)
    grid = anchors.grid_sizes(padded_hw)
    per_location = gen.num_anchors_per_location()
    if len(grid) != len(per_location):
        raise SpecError(
            f"the anchor spec has {len(per_location)} levels but gives {len(grid)} feature-map sizes",
            hint="rebuild the spec with detserve.families.torchvision.from_model",
        )
    # Only shapes are read by the generators: zero-channel tensors cost no memory.
    feats = [torch.empty((1, 0, h, w), dtype=dtype, device=device) for h, w in grid]
    images = ImageList(torch.empty((1, 0, *padded_hw), dtype=dtype, device=device), [padded_hw])
    with torch.no_grad():
        boxes = gen(images, feats)[0]
    counts = tuple(a * h * w for a, (h, w) in zip(per_location, grid, strict=True))
    return boxes, counts


def anchors_for(
    spec: PostprocessSpec | AnchorSpec,
    padded_hw: Sequence[int],
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[Tensor, list[int]]:
    """Anchors [M, 4] for one padded input size, and the number of anchors per feature level.

    Built by torchvision's own ``AnchorGenerator`` / ``DefaultBoxGenerator`` with the real
    feature-map sizes, so they equal the eager model's anchors bit for bit. Cached per
    (spec, size, device, dtype): treat the returned tensor as read-only. ``dtype`` None: float32.
    """
    import torch

    anchor_spec = spec.anchors if isinstance(spec, PostprocessSpec) else spec
    hw = (int(padded_hw[0]), int(padded_hw[1]))
    boxes, counts = _cached_anchors(anchor_spec, hw, str(torch.device(device or "cpu")), dtype or torch.float32)
    return boxes, list(counts)


def _ssd_candidates(spec: PostprocessSpec, logits: Tensor, thresh: Tensor) -> tuple[Tensor, ...]:
    """SSD: softmax, drop background column 0, per-class top-k over anchors above the threshold.

    Returns (image, anchor, label, score) per candidate, image-major then class-major then by
    score, which is the order the eager model feeds NMS.
    """
    import torch

    n, m, c = logits.shape
    scores = torch.softmax(logits, dim=-1)[:, :, 1:].transpose(1, 2)  # [N, C-1, M]
    masked = scores.masked_fill(~(scores > thresh[:, None, None]), _NEG_INF)
    top, anchor = masked.topk(min(spec.topk_candidates, m), dim=-1)  # [N, C-1, k]
    valid = top != _NEG_INF
    image = torch.arange(n, device=logits.device)[:, None, None].expand_as(anchor)
    label = torch.arange(1, c, device=logits.device)[None, :, None].expand_as(anchor)
    return image[valid], anchor[valid], label[valid], top[valid]


def _dense_scores(spec: PostprocessSpec, outputs: dict[str, Tensor], logits: Tensor) -> Tensor:
    """Per (anchor, class) scores: sigmoid (RetinaNet), or sqrt(sigmoid(cls) * sigmoid(ctr)) (FCOS)."""
    import torch

    if spec.family == "fcos":
        ctrness = outputs["bbox_ctrness"].to(logits.dtype)
        return torch.sqrt(torch.sigmoid(logits) * torch.sigmoid(ctrness))
    return torch.sigmoid(logits)


def _level_candidates(spec: PostprocessSpec, scores: Tensor, counts: list[int], thresh: Tensor) -> tuple[Tensor, ...]:
    """RetinaNet/FCOS: per level, flatten (anchor, class), keep > threshold, top-k.

    Returns (image, anchor, label, score) per candidate, image-major then level-major then by
    score, which is the order the eager model feeds NMS.
    """
    import torch

    n, _, c = scores.shape
    tops, anchors, labels = [], [], []
    start = 0
    for count in counts:  # anchors per level: a handful of levels, every image at once
        flat = scores[:, start : start + count, :].reshape(n, count * c)
        masked = flat.masked_fill(~(flat > thresh[:, None]), _NEG_INF)
        top, idx = masked.topk(min(spec.topk_candidates, count * c), dim=1)
        tops.append(top)
        anchors.append(torch.div(idx, c, rounding_mode="floor") + start)
        labels.append(idx % c)
        start += count
    top = torch.cat(tops, dim=1)
    valid = top != _NEG_INF
    image = torch.arange(n, device=scores.device)[:, None].expand_as(top)
    return image[valid], torch.cat(anchors, dim=1)[valid], torch.cat(labels, dim=1)[valid], top[valid]


def _decode(spec: PostprocessSpec, rel_codes: Tensor, anchors: Tensor) -> Tensor:
    """The model's own box coder (decoding is element-wise, so decoding only candidates is exact)."""
    from torchvision.models.detection._utils import BoxCoder, BoxLinearCoder

    if spec.family == "fcos":
        return BoxLinearCoder(normalize_by_size=spec.normalize_by_size).decode(rel_codes, anchors)
    wx, wy, ww, wh = (float(w) for w in spec.box_coder_weights)
    return BoxCoder((wx, wy, ww, wh), bbox_xform_clip=spec.bbox_xform_clip).decode_single(rel_codes, anchors)


def _clip(boxes: Tensor, hw: Tensor) -> Tensor:
    """``clip_boxes_to_image`` with one (height, width) per box instead of one per call."""
    import torch

    hw = hw.to(boxes.dtype)
    xs = torch.minimum(boxes[:, 0::2].clamp(min=0), hw[:, 1:2])
    ys = torch.minimum(boxes[:, 1::2].clamp(min=0), hw[:, 0:1])
    return torch.stack((xs, ys), dim=2).reshape(boxes.shape)


def _per_group_numel(device: torch.device) -> int:
    """Above this many coordinates torchvision's ``batched_nms`` runs one ``nms`` per group (torchvision 0.29)."""
    return 4000 if device.type == "cpu" else 100_000


def _eager_nms_inputs(boxes: Tensor, label: Tensor, image: Tensor, n: int, num_classes: int) -> tuple[Tensor, Tensor]:
    """The float32 boxes each image's eager ``batched_nms`` hands to ``nms``, and groups that keep those calls apart.

    Per image, torchvision's ``batched_nms`` either runs NMS per class on the boxes as they are
    (many boxes) or shifts them in float32 by label * (the image's max coordinate + 1) and runs
    one NMS. A single call over the batch offsetting by image * C + label would round the
    coordinates differently and flip near-threshold IoUs, so the per-image shift is reproduced.
    """
    import torch

    per_class = (torch.bincount(image, minlength=n) * 4 > _per_group_numel(boxes.device))[image]
    top = torch.full((n,), _NEG_INF, dtype=boxes.dtype, device=boxes.device)
    top = top.scatter_reduce(0, image, boxes.amax(dim=1), reduce="amax", include_self=False)
    offsets = label.to(boxes) * (top[image] + torch.tensor(1).to(boxes))
    shifted = torch.where(per_class[:, None], boxes, boxes + offsets[:, None])
    return shifted, image * num_classes + torch.where(per_class, label, torch.zeros_like(label))


def _float32_iou_threshold(iou: float) -> float:
    """A float64 threshold that judges an IoU as float32 NMS does: float32(IoU) > ``iou``.

    float32(q) > iou  <=>  q rounds to at least the first float32 above ``iou``  <=>  q is above the
    midpoint below that float (or on it, when round-half-to-even picks it). Matters for exact ties,
    which the float32 offsets of eager NMS make common (they quantise the coordinates).
    """
    above = np.nextafter(np.float32(iou), np.float32(np.inf)) if float(np.float32(iou)) <= iou else np.float32(iou)
    below = np.nextafter(above, np.float32(-np.inf))
    midpoint = (float(below) + float(above)) / 2  # exact in float64
    rounds_up_at_midpoint = int(above.view(np.int32)) % 2 == 0
    return float(np.nextafter(midpoint, -np.inf)) if rounds_up_at_midpoint else midpoint


def _batched_nms(boxes: Tensor, scores: Tensor, groups: Tensor, iou: float) -> Tensor:
    """``batched_nms`` that leaves the float32 boxes of every group as eager NMS sees them.

    Large inputs run one float32 ``nms`` per group: eager's own calls, bit for bit. Small ones
    are offset per group in one call, done in float64, which holds float32 coordinates exactly,
    with the threshold moved so that float64 IoUs are judged as their float32 roundings would be.
    """
    from torchvision.ops import batched_nms

    if boxes.numel() <= _per_group_numel(boxes.device):
        boxes, scores, iou = boxes.double(), scores.double(), _float32_iou_threshold(iou)
    return batched_nms(boxes, scores, groups, iou)


def _nms(boxes: Tensor, scores: Tensor, groups: Tensor, image: Tensor, ious: list[float]) -> Tensor:
    """Indices kept by NMS: one ``batched_nms`` per distinct IoU threshold, by score within each call."""
    import torch

    distinct = sorted(set(ious))
    if len(distinct) == 1:
        return _batched_nms(boxes, scores, groups, distinct[0])
    which = torch.tensor([distinct.index(iou) for iou in ious], device=boxes.device)[image]
    keeps = []
    for i, iou in enumerate(distinct):
        sel = torch.nonzero(which == i).squeeze(1)
        keeps.append(sel[_batched_nms(boxes[sel], scores[sel], groups[sel], iou)])
    return torch.cat(keeps)


def _limit_per_image(keep: Tensor, image: Tensor, max_det: Tensor, n: int) -> Tensor:
    """Group kept indices by image (score order kept) and cut each image at its own max_det."""
    import torch

    keep = keep[torch.sort(image[keep], stable=True).indices]
    img = image[keep]
    counts = torch.bincount(img, minlength=n)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(keep.numel(), device=keep.device) - starts[img]
    return keep[rank < max_det[img]]


def rescale_boxes(boxes: Tensor, resized_hw: Tensor, original_hw: Tensor) -> Tensor:
    """``resize_boxes`` from resized to original size, per box, with torchvision's float32 op order."""
    import torch

    ratio = original_hw.to(torch.float32) / resized_hw.to(torch.float32)  # [K, 2]: (h, w)
    x1, y1, x2, y2 = boxes.unbind(1)
    ratio_h, ratio_w = ratio[:, 0], ratio[:, 1]
    return torch.stack((x1 * ratio_w, y1 * ratio_h, x2 * ratio_w, y2 * ratio_h), dim=1)


def _check_batch(spec: PostprocessSpec, outputs: dict[str, Tensor], n_controls: int) -> None:
    """Fail with a clear message when the core's outputs do not fit the spec (wrong model/spec pair)."""
    names = output_names(spec.family)
    missing = [k for k in names if k not in outputs]
    if missing:
        raise SpecError(f"core outputs lack {', '.join(missing)}", hint=f"a {spec.family} core gives {', '.join(names)}")
    shape = tuple(outputs["cls_logits"].shape)
    if len(shape) != 3 or shape[2] != spec.num_classes:
        raise SpecError(
            f"cls_logits has shape {shape}, the spec expects (images, anchors, {spec.num_classes})",
            hint="the core model and its post-processing spec come from different builds",
        )
    last = {"bbox_regression": 4, "bbox_ctrness": 1}
    for key in names[1:]:
        if tuple(outputs[key].shape) != (*shape[:2], last[key]):
            raise SpecError(f"{key} has shape {tuple(outputs[key].shape)}, expected {(*shape[:2], last[key])}")
    if n_controls != shape[0]:
        raise ValueError(f"{shape[0]} images but {n_controls} request controls")


def postprocess_batch(
    spec: PostprocessSpec,
    outputs: dict[str, Tensor],
    padded_hw: Sequence[int],
    resized_hw: Tensor,
    original_hw: Tensor,
    controls: Sequence[RequestControls],
) -> list[dict[str, Tensor]]:
    """Detections for N images that share one padded size, as the eager model gives them.

    ``outputs``: the core's raw "cls_logits" [N, M, C], "bbox_regression" [N, M, 4] (and FCOS'
    "bbox_ctrness" [N, M, 1]); ``resized_hw`` / ``original_hw``: [N, 2] (height, width) per image;
    ``controls[i]`` replaces the model's score_thresh / nms_thresh / detections_per_img for image i
    (a score must be strictly above the threshold, as in torchvision). Returns one dict per image:
    boxes [K, 4] float32 (x1, y1, x2, y2, original pixels), scores [K], labels [K] int64, by score.
    """
    import torch

    _check_batch(spec, outputs, len(controls))
    logits = outputs["cls_logits"].float()  # the eager model works in float32
    device, n = logits.device, logits.shape[0]
    anchors, per_level = anchors_for(spec, padded_hw, device=device)
    if anchors.shape[0] != logits.shape[1]:
        raise SpecError(f"the core gives {logits.shape[1]} anchors, the spec {anchors.shape[0]} for {tuple(padded_hw)}")
    if n == 0:
        return []
    thresh = torch.tensor([ct.score_threshold for ct in controls], dtype=torch.float32, device=device)
    if spec.family == "ssd":
        image, anchor, label, score = _ssd_candidates(spec, logits, thresh)
    else:
        image, anchor, label, score = _level_candidates(spec, _dense_scores(spec, outputs, logits), per_level, thresh)
    boxes = _decode(spec, outputs["bbox_regression"].float()[image, anchor], anchors[anchor])
    resized = torch.as_tensor(resized_hw, device=device).reshape(n, 2)
    boxes = _clip(boxes, resized[image])
    ious = [float(ct.iou_threshold) for ct in controls]
    nms_boxes, groups = _eager_nms_inputs(boxes, label, image, n, spec.num_classes)
    keep = _nms(nms_boxes, score, groups, image, ious)
    max_det = torch.tensor([ct.max_det for ct in controls], dtype=torch.int64, device=device)
    keep = _limit_per_image(keep, image, max_det, n)
    image = image[keep]
    original = torch.as_tensor(original_hw, device=device).reshape(n, 2)
    boxes = rescale_boxes(boxes[keep], resized[image], original[image])
    counts = torch.bincount(image, minlength=n).tolist()
    parts = zip(boxes.split(counts), score[keep].split(counts), label[keep].split(counts), strict=True)
    return [{"boxes": b, "scores": s, "labels": lab} for b, s, lab in parts]
