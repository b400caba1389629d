"""The torch steps of a two-stage (Faster / Mask R-CNN) pipeline, with torchvision's own components.

Runtime code (the python step model runs it): torch and torchvision only. Every step rebuilds the
eager model's own pieces from the decode spec and calls them as the model does:

- ``proposals``: ``concat_box_prediction_layers``, the RPN's ``AnchorGenerator`` and ``BoxCoder``
  and ``RegionProposalNetwork.filter_proposals`` (pre/post-NMS top-n per level, RPN NMS, min size,
  score threshold) on the first core's raw objectness/deltas, one image at a time; the proposals
  are padded with zero boxes to ``post_nms_top_n`` (a fixed shape, so the second core batches)
  and ``num_proposals`` says how many are real. The box head treats every RoI on its own, so the
  padded rows cannot change a real row, and ``detections`` drops them before anything else.
- ``detections``: ``RoIHeads.postprocess_detections`` (box decoding, softmax, clip, score
  threshold, small boxes, per-class NMS, top-k) with the request's score/IoU threshold and
  max_det, then ``transform.postprocess``'s ``resize_boxes`` to original pixels.
- ``postprocess`` (Mask R-CNN): the detections, the mask core's 28x28 probabilities of each
  detection's label (as FP16) and the boxes in original pixels.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from detserve.errors import SpecError
from detserve.families.base import pad_detections

if TYPE_CHECKING:
    import torch

    from detserve.families.rcnn.spec import RcnnDecodeSpec
    from detserve.specs import RequestControls


@functools.lru_cache(maxsize=8)
def _rpn(spec: RcnnDecodeSpec) -> Any:
    """The model's ``RegionProposalNetwork`` without its head (only its proposal filtering is run)."""
    import torch
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.rpn import RegionProposalNetwork

    generator = AnchorGenerator(spec.anchor_sizes, spec.aspect_ratios)
    top = {"training": spec.rpn_pre_nms_top_n, "testing": spec.rpn_pre_nms_top_n}
    post = {"training": spec.rpn_post_nms_top_n, "testing": spec.rpn_post_nms_top_n}
    rpn = RegionProposalNetwork(
        generator, torch.nn.Identity(), 0.7, 0.3, 256, 0.5, top, post, spec.rpn_nms_thresh, score_thresh=spec.rpn_score_thresh
    )
    return rpn.eval()


@functools.lru_cache(maxsize=8)
def _roi_heads(spec: RcnnDecodeSpec) -> Any:
    """The model's ``RoIHeads`` for its ``postprocess_detections`` (box coder weights from the spec)."""
    from torchvision.models.detection.roi_heads import RoIHeads

    heads = RoIHeads(
        None, None, None, 0.5, 0.5, 512, 0.25, spec.box_coder_weights, spec.score_thresh, spec.nms_thresh, spec.detections_per_img
    )
    return heads.eval()


def proposals(spec: RcnnDecodeSpec, raw: dict[str, torch.Tensor], info: torch.Tensor) -> dict[str, np.ndarray]:
    """The RPN's proposals per image, padded to ``rpn_post_nms_top_n`` rows; ``num_proposals`` real ones."""
    import torch
    from torchvision.models.detection.image_list import ImageList
    from torchvision.models.detection.rpn import concat_box_prediction_layers

    rpn = _rpn(spec)
    n = int(info.shape[0])
    objectness = [raw[f"objectness_{i}"] for i in range(spec.num_levels)]
    deltas = [raw[f"rpn_deltas_{i}"] for i in range(spec.num_levels)]
    padded_hw = (int(info[0, 4]), int(info[0, 5]))
    image_sizes = [(int(h), int(w)) for h, w in info[:, 2:4].tolist()]
    # the anchor generator reads only the shapes (and dtype) of the images and feature maps
    images = ImageList(torch.empty((n, 0, *padded_hw)), image_sizes)
    maps = [torch.empty((n, 0, *o.shape[-2:])) for o in objectness]
    with torch.no_grad():
        anchors = rpn.anchor_generator(images, maps)
        per_level = [int(o[0].numel()) for o in objectness]
        flat_obj, flat_deltas = concat_box_prediction_layers(objectness, deltas)
        boxes = rpn.box_coder.decode(flat_deltas, anchors).view(n, -1, 4)
        kept, _ = rpn.filter_proposals(boxes, flat_obj, image_sizes, per_level)
    out = np.zeros((n, spec.rpn_post_nms_top_n, 4), dtype=np.float32)
    counts = np.zeros((n, 1), dtype=np.int32)
    for i, b in enumerate(kept):
        out[i, : b.shape[0]] = b.numpy()
        counts[i, 0] = b.shape[0]
    return {"proposals": out, "num_proposals": counts}


def detections(
    spec: RcnnDecodeSpec, raw: dict[str, torch.Tensor], info: torch.Tensor, controls: Sequence[RequestControls]
) -> list[dict[str, torch.Tensor]]:
    """``postprocess_detections`` per image with its request's controls: boxes in resized-image pixels."""
    import torch

    heads = _roi_heads(spec)
    out = []
    for i, c in enumerate(controls):
        k = int(raw["num_proposals"][i, 0])
        heads.score_thresh, heads.nms_thresh, heads.detections_per_img = c.score_threshold, c.iou_threshold, c.max_det
        hw = (int(info[i, 2]), int(info[i, 3]))
        with torch.no_grad():
            b, s, lab = heads.postprocess_detections(
                raw["class_logits"][i, :k], raw["box_regression"][i, :k], [raw["proposals"][i, :k]], [hw]
            )
        out.append({"boxes": b[0], "scores": s[0], "labels": lab[0]})
    return out


def to_original(boxes: torch.Tensor, info_row: torch.Tensor) -> torch.Tensor:
    """``transform.postprocess``: boxes from the resized image to the original's pixels (torchvision's ``resize_boxes``)."""
    from torchvision.models.detection.transform import resize_boxes

    oh, ow, rh, rw = (int(v) for v in info_row[:4].tolist())
    return resize_boxes(boxes, [rh, rw], [oh, ow])


def padded(det: dict[str, Any], max_det: int, prefix: str = "") -> dict[str, np.ndarray]:
    """Fixed-size rows (zeros past the count) for one image."""
    out = pad_detections(det, max_det)
    return {f"{prefix}{k}": v for k, v in out.items()}


def run_step(
    spec: RcnnDecodeSpec,
    role: str,
    raw: dict[str, torch.Tensor],
    info: torch.Tensor,
    controls: Sequence[RequestControls],
) -> list[dict[str, np.ndarray]]:
    """One torch step over a batch of images (same padded size): per-image output rows."""
    if role == "proposals":
        out = proposals(spec, raw, info)
        return [{k: v[i] for k, v in out.items()} for i in range(int(info.shape[0]))]
    if role == "detections" or (role == "postprocess" and not spec.masks):
        dets = detections(spec, raw, info, controls)
        if spec.masks:  # boxes stay in resized pixels: the mask core pools them from the features
            return [_internal(d) for d in dets]
        return [
            padded({**d, "boxes": to_original(d["boxes"], info[i])}, c.max_det)
            for i, (d, c) in enumerate(zip(dets, controls, strict=True))
        ]
    if role == "postprocess":
        return [_with_masks(raw, info, i, c.max_det) for i, c in enumerate(controls)]
    raise SpecError(f"the R-CNN family has no torch step {role!r}")


def _internal(det: dict[str, Any]) -> dict[str, np.ndarray]:
    """The detections as rows for the mask core: as many as there are (at least one), not max_det.

    The mask head costs per row: padding to max_det (up to thousands) would run it on empty rows.
    Images of one request with other counts are zero-padded to the longest by the python step model;
    ``det_count`` says how many rows are real, and the last step pads to max_det for the contract.
    """
    out = padded(det, max(1, int(det["scores"].shape[0])))
    return {
        "det_boxes": out["boxes"],
        "det_scores": out["scores"],
        "det_labels": out["labels"],
        "det_count": out["num_detections"],
    }


def _with_masks(raw: dict[str, torch.Tensor], info: torch.Tensor, i: int, max_det: int) -> dict[str, np.ndarray]:
    """The contract for image ``i``: ``max_det`` rows, boxes in original pixels, masks as FP16 probabilities."""
    k = int(raw["det_count"][i, 0])
    det = {
        "boxes": to_original(raw["det_boxes"][i, :k], info[i]),
        "scores": raw["det_scores"][i, :k],
        "labels": raw["det_labels"][i, :k],
    }
    out = padded(det, max_det)
    masks = np.zeros((max_det, *raw["mask_probs"].shape[2:]), dtype=np.float16)
    masks[:k] = raw["mask_probs"][i, :k].numpy().astype(np.float16)
    return {**out, "masks": masks}
