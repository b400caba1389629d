"""The R-CNN family's decode spec and declared steps (torch-free): Faster R-CNN and Mask R-CNN as a multi-step pipeline.

Why not one exported model: torchvision's whole-model ONNX export freezes the score/IoU threshold
and the top-100 into the graph, breaks at batch > 1 for Mask R-CNN (pytorch/vision #2311), and
TensorRT's NMS layer looks at the top 5000 boxes only. So every NMS stays in torch, and the
pipeline is (after the generic preprocessing step):

``core`` (backbone + FPN + RPN head: the FPN maps the RoI pooler reads, raw objectness and deltas
per level) -> ``proposals`` (torch: anchors, decode, ``filter_proposals``, padded to
``rpn_post_nms_top_n``) -> ``roi_core`` (multi-scale RoIAlign + box head + predictor on the
proposals) -> ``postprocess`` (torch: ``postprocess_detections`` with per-request controls,
boxes to original pixels). Mask R-CNN: ``roi_core`` -> ``detections`` (same, boxes kept in the
resized image) -> ``mask_core`` (RoIAlign + mask head on the final boxes, the label's 28x28
probabilities) -> ``postprocess`` (boxes to original pixels, masks as FP16).

The spec and the steps' declarations are runtime code (torch-free here); the torch steps are in
:mod:`detserve.families.rcnn.decode`, building, cores and the reference in
:mod:`detserve.families.rcnn.models`.
"""

from __future__ import annotations

from dataclasses import dataclass

from detserve.families.base import DETECTIONS, IMAGE_INFO, IMAGES, StepDecl, TensorDecl
from detserve.specs import Spec, check

# name -> torchvision.models.detection builder (all build offline with weights=None, weights_backbone=None)
DETECTORS: tuple[str, ...] = (
    "fasterrcnn_mobilenet_v3_large_320_fpn",
    "fasterrcnn_mobilenet_v3_large_fpn",
    "fasterrcnn_resnet50_fpn",
    "fasterrcnn_resnet50_fpn_v2",
    "maskrcnn_resnet50_fpn",
    "maskrcnn_resnet50_fpn_v2",
)
MASK_SIZE = 28  # the mask head's own resolution (MaskRCNNPredictor: 14x14 RoIs, one 2x deconvolution)


@dataclass(frozen=True)
class RcnnDecodeSpec(Spec):
    """What the torch steps need, read from the live model (``rcnn.models.decode_spec_from_model``).

    ``score_thresh``/``nms_thresh``/``detections_per_img`` are the RoI heads' (per-request defaults);
    the ``rpn_*`` settings are the RPN's eval-time ones (``rpn_pre_nms_top_n_test``, ...).
    """

    num_classes: int  # columns of the box predictor, background included (torchvision)
    masks: bool
    num_levels: int  # feature maps the RPN reads (all of the FPN's)
    anchor_sizes: tuple[tuple[int, ...], ...]
    aspect_ratios: tuple[tuple[float, ...], ...]
    feature_names: tuple[str, ...]  # FPN maps the RoI poolers read, in the pooler's order
    feature_channels: int
    rpn_pre_nms_top_n: int
    rpn_post_nms_top_n: int
    rpn_nms_thresh: float
    rpn_score_thresh: float
    box_coder_weights: tuple[float, float, float, float]
    score_thresh: float = 0.05
    nms_thresh: float = 0.5
    detections_per_img: int = 100
    family: str = "rcnn"

    def __post_init__(self) -> None:
        check(self.family == "rcnn", f"family must be 'rcnn', got {self.family!r}")
        check(self.num_classes >= 2, f"num_classes must be >= 2 (background included), got {self.num_classes}")
        check(self.num_levels >= 1 and len(self.anchor_sizes) == self.num_levels, "one anchor size tuple per level")
        check(len(self.aspect_ratios) == self.num_levels, "one aspect ratio tuple per level")
        check(len(self.feature_names) >= 1, "the RoI pooler reads at least one feature map")
        check(self.rpn_pre_nms_top_n >= 1 and self.rpn_post_nms_top_n >= 1, "RPN top-n must be >= 1")
        check(0.0 < self.rpn_nms_thresh <= 1.0, f"rpn_nms_thresh must be in (0, 1], got {self.rpn_nms_thresh}")
        check(0.0 <= self.score_thresh <= 1.0, f"score_thresh must be in [0, 1], got {self.score_thresh}")
        check(0.0 < self.nms_thresh <= 1.0, f"nms_thresh must be in (0, 1], got {self.nms_thresh}")
        check(self.detections_per_img >= 1, f"detections_per_img must be >= 1, got {self.detections_per_img}")
        check(len(self.box_coder_weights) == 4, "box_coder_weights has 4 numbers")

    @property
    def anchors_per_location(self) -> tuple[int, ...]:
        return tuple(len(s) * len(r) for s, r in zip(self.anchor_sizes, self.aspect_ratios, strict=True))


# --------------------------------------------------------------------------- declared steps

# a feature map or head output grows with the image: -1 spatial dims (fixed per engine profile on TensorRT)
# (feature maps ~1 in size: ~1e-4 reordering noise in the deepest layers of the seeded fixture)
FEATURE_ATOL, FEATURE_RTOL = 1e-3, 1e-3


def _features(spec: RcnnDecodeSpec) -> tuple[TensorDecl, ...]:
    return tuple(
        TensorDecl(f"feat_{n}", (spec.feature_channels, -1, -1), atol=FEATURE_ATOL, rtol=FEATURE_RTOL) for n in spec.feature_names
    )


def _rpn_outputs(spec: RcnnDecodeSpec) -> tuple[TensorDecl, ...]:
    obj = [
        TensorDecl(f"objectness_{i}", (a, -1, -1), atol=FEATURE_ATOL, rtol=FEATURE_RTOL)
        for i, a in enumerate(spec.anchors_per_location)
    ]
    deltas = [
        TensorDecl(f"rpn_deltas_{i}", (4 * a, -1, -1), atol=FEATURE_ATOL, rtol=FEATURE_RTOL)
        for i, a in enumerate(spec.anchors_per_location)
    ]
    return (*obj, *deltas)


def _contract(masks: bool) -> tuple[TensorDecl, ...]:
    return (*DETECTIONS, TensorDecl("masks", (-1, MASK_SIZE, MASK_SIZE), "FP16")) if masks else DETECTIONS


def steps(spec: RcnnDecodeSpec) -> list[StepDecl]:
    """The steps after preprocessing (see the module docstring); names are the tensors' in the ensemble."""
    p = spec.rpn_post_nms_top_n
    images = IMAGES
    props = TensorDecl("proposals", (p, 4))
    count = TensorDecl("num_proposals", (1,), "INT32")
    # logits/box deltas of the box predictor: |values| up to ~10, ulp-level reordering in the FC layers
    roi = (
        TensorDecl("class_logits", (p, spec.num_classes), atol=5e-4),
        TensorDecl("box_regression", (p, 4 * spec.num_classes), atol=5e-4),
    )
    out = [
        StepDecl("core", "core", (images,), (*_features(spec), *_rpn_outputs(spec))),
        StepDecl("proposals", "python", (*_rpn_outputs(spec), IMAGE_INFO), (props, count)),
        StepDecl("roi_core", "core", (*_features(spec), props), roi),
    ]
    decode_in = (*roi, props, count, IMAGE_INFO)
    if not spec.masks:
        return [*out, StepDecl("postprocess", "python", decode_in, _contract(False))]
    det = (
        TensorDecl("det_boxes", (-1, 4)),
        TensorDecl("det_scores", (-1,)),
        TensorDecl("det_labels", (-1,), "INT32"),
        TensorDecl("det_count", (1,), "INT32"),
    )
    # probabilities: sigmoid slope <= 0.25 turns ~4e-4 of mask-head logit noise into <= 1e-4
    probs = TensorDecl("mask_probs", (-1, MASK_SIZE, MASK_SIZE), atol=1e-4, rtol=1e-4)
    return [
        *out,
        StepDecl("detections", "python", decode_in, det),
        StepDecl("mask_core", "core", (*_features(spec), det[0], det[2]), (probs,)),
        StepDecl("postprocess", "python", (*det, probs, IMAGE_INFO), _contract(True)),
    ]


def outputs(spec: RcnnDecodeSpec) -> list[TensorDecl]:
    """The first core's outputs (export/verification tools that look at one core): its FPN maps and RPN tensors."""
    return list(steps(spec)[0].outputs)
