"""Raw YOLO core output -> detections, as ultralytics' predictor gives them (runtime: torch/torchvision only).

ultralytics' ``non_max_suppression`` then ``scale_boxes``, vectorised over the batch with
per-request controls; an end-to-end head (YOLOv10 / YOLO26) needs no NMS, only its own top-k order.
The serving step runs this; it never imports ultralytics (AGPL-3.0).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from detserve.families.yolo.spec import YoloDecodeSpec
    from detserve.specs import RequestControls


def _scale_boxes(
    boxes: torch.Tensor, img: torch.Tensor, padded_hw: Sequence[int], resized_hw: torch.Tensor, original_hw: torch.Tensor
) -> torch.Tensor:
    """ultralytics' ``scale_boxes`` (undo the centred letterbox, clip), one row per detection of image ``img``.

    The gain is new/old side as a double cast to float32 and the pad ``round(d / 2 - 0.1)`` as
    ultralytics computes them per image; then the same float32 ops on the boxes.
    """
    import torch

    rh, rw = resized_hw[:, 0].tolist(), resized_hw[:, 1].tolist()
    oh, ow = original_hw[:, 0].tolist(), original_hw[:, 1].tolist()
    per_image = [
        (
            round((padded_hw[1] - w) / 2 - 0.1),
            round((padded_hw[0] - h) / 2 - 0.1),
            w / w0,
            h / h0,
        )
        for h, w, h0, w0 in zip(rh, rw, oh, ow, strict=True)
    ]
    pad_x, pad_y, gain_x, gain_y = (torch.tensor(v, dtype=torch.float32)[img] for v in zip(*per_image, strict=True))
    out = boxes.clone()
    out[:, 0::2] -= pad_x[:, None]
    out[:, 1::2] -= pad_y[:, None]
    out[:, 0::2] /= gain_x[:, None]
    out[:, 1::2] /= gain_y[:, None]
    lo = torch.zeros_like(out)
    hi = original_hw.to(torch.float32)[img][:, [1, 0, 1, 0]]
    return torch.minimum(torch.maximum(out, lo), hi)


def _nms_candidates(
    spec: YoloDecodeSpec, pred: torch.Tensor, controls: Sequence[RequestControls]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Conf filter of the whole batch at once: (image index, xyxy box, score, class) of every candidate."""
    import torch

    x = pred.float().transpose(1, 2)  # [N, A, 4 + nc], as ultralytics transposes
    conf, cls = x[..., 4 : 4 + spec.num_classes].max(-1)  # best class; first index on ties, like ultralytics
    thresh = torch.tensor([c.score_threshold for c in controls], dtype=torch.float32)
    img, anchor = (conf > thresh[:, None]).nonzero(as_tuple=True)  # strictly above, as ultralytics
    xywh = x[img, anchor, :4]
    half = xywh[:, 2:] / 2  # ultralytics' xywh2xyxy, same float32 ops
    boxes = torch.cat((xywh[:, :2] - half, xywh[:, :2] + half), 1)
    return img, boxes, conf[img, anchor], cls[img, anchor]


def decode(
    spec: YoloDecodeSpec,
    outputs: dict[str, torch.Tensor],
    padded_hw: Sequence[int],
    resized_hw: torch.Tensor,
    original_hw: torch.Tensor,
    controls: Sequence[RequestControls],
) -> list[dict[str, torch.Tensor]]:
    """Detections per image as ultralytics' predictor returns them (boxes in original pixels, by score)."""
    import torch

    resized_hw, original_hw = torch.as_tensor(resized_hw).reshape(-1, 2), torch.as_tensor(original_hw).reshape(-1, 2)
    n = int(resized_hw.shape[0])
    if len(controls) != n:
        raise ValueError(f"{len(controls)} controls for {n} images")
    if spec.end2end:
        img, boxes, scores, labels = _end2end_keep(outputs["detections"], controls)
    else:
        img, boxes, scores, labels = _nms_keep(spec, outputs["predictions"], controls)
    boxes = _scale_boxes(boxes, img, padded_hw, resized_hw, original_hw)
    counts = torch.bincount(img, minlength=n).tolist()
    return [
        {"boxes": b, "scores": s, "labels": c}
        for b, s, c in zip(boxes.split(counts), scores.split(counts), labels.split(counts), strict=True)
    ]


def _nms_keep(
    spec: YoloDecodeSpec, pred: torch.Tensor, controls: Sequence[RequestControls]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Candidate cap, class-aware NMS and max_det per image, on the batch's candidates.

    NMS runs once per image on exactly the float32 boxes ultralytics builds (box + class * max_wh).
    A single batched call would need an image offset on top, and at ~6e5 px a float32 ulp is
    already 0.06 px: any extra offset changes the IoUs, so an image's detections would depend on
    its position in the batch. Everything else here is batched.
    """
    import torch
    import torchvision

    img, boxes, scores, labels = _nms_candidates(spec, pred, controls)
    starts = torch.cumsum(torch.bincount(img, minlength=len(controls)), 0).tolist()
    kept: list[torch.Tensor] = []
    for i, (lo, hi) in enumerate(zip([0, *starts[:-1]], starts, strict=True)):
        idx = torch.arange(lo, hi)
        if hi - lo > spec.max_nms:  # ultralytics keeps the max_nms best candidates, sorted
            idx = idx[scores[idx].argsort(descending=True)[: spec.max_nms]]
        offset = labels[idx, None].float() * spec.max_wh
        keep = torchvision.ops.nms(boxes[idx] + offset, scores[idx], controls[i].iou_threshold)
        kept.append(idx[keep[: controls[i].max_det]])
    sel = torch.cat(kept) if kept else torch.zeros(0, dtype=torch.long)
    return img[sel], boxes[sel], scores[sel], labels[sel]


def _end2end_keep(
    det: torch.Tensor, controls: Sequence[RequestControls]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """ultralytics' end-to-end branch: score strictly above the threshold, the first max_det in the head's order."""
    import torch

    det = det.float()
    thresh = torch.tensor([c.score_threshold for c in controls], dtype=torch.float32)
    max_det = torch.tensor([c.max_det for c in controls])
    mask = det[..., 4] > thresh[:, None]
    mask &= torch.cumsum(mask, 1) <= max_det[:, None]
    img, slot = mask.nonzero(as_tuple=True)
    rows = det[img, slot]
    return img, rows[:, :4], rows[:, 4], rows[:, 5].long()
