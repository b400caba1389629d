"""The DETR family's runtime half: raw ``logits``/``pred_boxes`` -> detections (torch only, no transformers).

The image processor's ``post_process_object_detection``: sigmoid and a top-k over queries x classes
(RT-DETR, D-FINE), or a softmax without the no-object column and the best class per query (DETR);
boxes to original pixels, score strictly above the threshold, by score, at most ``max_det``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from detserve.families.detr.spec import DetrDecodeSpec
    from detserve.specs import RequestControls


def _corners(boxes: torch.Tensor) -> torch.Tensor:
    """transformers' ``center_to_corners_format`` (same float32 ops)."""
    import torch

    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([(cx - 0.5 * w), (cy - 0.5 * h), (cx + 0.5 * w), (cy + 0.5 * h)], dim=-1)


def _scale(padded_hw: Sequence[int], resized_hw: torch.Tensor, original_hw: torch.Tensor) -> torch.Tensor:
    """[N, 4] factors from relative boxes to original pixels: the processor's ``box * (w, h, w, h)``.

    Boxes are relative to the core's input. An image alone on its canvas (every single-image
    request) gets exactly the processor's factor; an image padded to a larger neighbour of the same
    request (DETR) is relative to the padded canvas, so its factor first takes the canvas back to it.
    """
    import torch

    orig = original_hw.to(torch.float32)
    img_h, img_w = orig[:, 0], orig[:, 1]
    factors = torch.stack([img_w, img_h, img_w, img_h], dim=1)
    ph, pw = float(padded_hw[0]), float(padded_hw[1])
    padded = (resized_hw[:, 0] != int(padded_hw[0])) | (resized_hw[:, 1] != int(padded_hw[1]))
    if bool(padded.any()):
        rh, rw = resized_hw[:, 0].to(torch.float64), resized_hw[:, 1].to(torch.float64)
        canvas = torch.stack([pw / rw, ph / rh, pw / rw, ph / rh], dim=1)
        factors = torch.where(padded[:, None], (factors.to(torch.float64) * canvas).to(torch.float32), factors)
    return factors


def decode(
    spec: DetrDecodeSpec,
    outputs: dict[str, torch.Tensor],
    padded_hw: Sequence[int],
    resized_hw: torch.Tensor,
    original_hw: torch.Tensor,
    controls: Sequence[RequestControls],
) -> list[dict[str, torch.Tensor]]:
    """Detections per image as ``post_process_object_detection`` gives them, by score, at most max_det."""
    import torch

    resized_hw, original_hw = torch.as_tensor(resized_hw).reshape(-1, 2), torch.as_tensor(original_hw).reshape(-1, 2)
    logits, pred = outputs["logits"].float(), outputs["pred_boxes"].float()
    n, q = int(logits.shape[0]), int(logits.shape[1])
    if len(controls) != n or int(resized_hw.shape[0]) != n:
        raise ValueError(f"{len(controls)} controls and {int(resized_hw.shape[0])} image sizes for {n} images")
    boxes = _corners(pred) * _scale(padded_hw, resized_hw, original_hw)[:, None, :]
    if spec.activation == "sigmoid":
        # the processor: top-k (k = queries) over queries x classes of the sigmoid, sorted
        scores, index = torch.topk(torch.sigmoid(logits).flatten(1), q, dim=-1)
        labels = index % spec.num_classes
        boxes = boxes.gather(1, (index // spec.num_classes).unsqueeze(-1).expand(-1, -1, 4))
    else:
        # the processor: softmax, drop the no-object column, best class per query (query order)
        scores, labels = torch.softmax(logits, -1)[..., :-1].max(-1)
        scores, order = scores.sort(dim=-1, descending=True, stable=True)
        labels = labels.gather(1, order)
        boxes = boxes.gather(1, order.unsqueeze(-1).expand(-1, -1, 4))
    thresh = torch.tensor([c.score_threshold for c in controls], dtype=torch.float32)
    max_det = torch.tensor([min(c.max_det, q) for c in controls])
    rank = torch.arange(q).expand(n, q)
    keep = (scores > thresh[:, None]) & (rank < max_det[:, None])  # sorted: the kept ones are a prefix
    counts = keep.sum(1).tolist()
    return [
        {"boxes": boxes[i, :k], "scores": scores[i, :k], "labels": labels[i, :k].to(torch.int64)} for i, k in enumerate(counts)
    ]
