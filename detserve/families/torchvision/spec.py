"""The torchvision family's decode spec and declared tensors (torch-free: the registry and configs read them).

:class:`PostprocessSpec` holds how the core's raw outputs become detections exactly as the eager
SSD / RetinaNet / FCOS model does it; :class:`AnchorSpec` the model's own anchor/prior/point
generator, rebuilt in the post-processing step (:mod:`detserve.families.torchvision.decode`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, get_args

from detserve.errors import SpecError
from detserve.families.base import TensorDecl
from detserve.specs import Spec, check

HeadType = Literal["ssd", "retinanet", "fcos"]  # the family names this package serves
AnchorKind = Literal["default_boxes", "grid"]
HEAD_TYPES: tuple[str, ...] = get_args(HeadType)

# (atol, rtol) at fp16 / int8 TensorRT vs ONNX Runtime fp32: logits move more than box codes
_TOLERANCES = {
    "cls_logits": ((2e-2, 1e-2), (0.5, 0.1)),
    "bbox_regression": ((1e-2, 1e-2), (0.25, 0.1)),
    "bbox_ctrness": ((2e-2, 1e-2), (0.5, 0.1)),
}


@dataclass(frozen=True)
class AnchorSpec(Spec):
    """The model's own anchor/prior/point generator, rebuilt in the post-processing model.

    ``grid``: torchvision ``AnchorGenerator(sizes, aspect_ratios)`` (RetinaNet, FCOS points).
    ``default_boxes``: torchvision ``DefaultBoxGenerator`` (SSD priors).
    Feature-map sizes come from ``fixed_grid_sizes`` when the input size is fixed, else from
    ``strides`` as ceil(H / stride) — checked against the real model when the repository is built.
    """

    kind: AnchorKind
    sizes: tuple[tuple[int, ...], ...] = ()
    aspect_ratios: tuple[tuple[float, ...], ...] = ()
    min_ratio: float = 0.15
    max_ratio: float = 0.9
    scales: tuple[float, ...] | None = None
    steps: tuple[int, ...] | None = None
    clip: bool = True
    strides: tuple[int, ...] | None = None
    fixed_input_hw: tuple[int, int] | None = None
    fixed_grid_sizes: tuple[tuple[int, int], ...] | None = None

    def __post_init__(self) -> None:
        check(self.kind in get_args(AnchorKind), f"anchor kind must be one of {get_args(AnchorKind)}, got {self.kind!r}")
        check(len(self.aspect_ratios) > 0, "aspect_ratios must not be empty")
        if self.kind == "grid":
            check(len(self.sizes) == len(self.aspect_ratios), "grid anchors need one sizes entry per aspect_ratios entry")
        check(
            self.strides is not None or (self.fixed_input_hw is not None and self.fixed_grid_sizes is not None),
            "anchors need strides, or fixed_input_hw with fixed_grid_sizes",
        )
        levels = len(self.aspect_ratios)
        for name in ("strides", "fixed_grid_sizes", "steps"):
            value = getattr(self, name)
            check(value is None or len(value) == levels, f"{name} needs one entry per level ({levels}), got {value}")
        if self.kind == "default_boxes" and self.scales is not None:
            check(len(self.scales) == levels + 1, f"default boxes need {levels + 1} scales (levels + 1), got {len(self.scales)}")

    def grid_sizes(self, padded_hw: tuple[int, int]) -> list[tuple[int, int]]:
        h, w = padded_hw
        if (
            self.fixed_grid_sizes is not None
            and self.fixed_input_hw is not None
            and tuple(padded_hw) == tuple(self.fixed_input_hw)
        ):
            return [(int(a), int(b)) for a, b in self.fixed_grid_sizes]
        if self.strides is None:
            raise SpecError(f"this model only accepts inputs of {self.fixed_input_hw}, got {padded_hw}")
        return [(math.ceil(h / s), math.ceil(w / s)) for s in self.strides]

    @property
    def per_location(self) -> tuple[int, ...]:
        """Anchors per feature-map position and level, as the generator's ``num_anchors_per_location``."""
        if self.kind == "default_boxes":
            return tuple(2 + 2 * len(r) for r in self.aspect_ratios)
        return tuple(len(s) * len(a) for s, a in zip(self.sizes, self.aspect_ratios, strict=True))

    def count(self, padded_hw: tuple[int, int]) -> int:
        """Anchors per image for one padded input size (the core's anchor dimension)."""
        return sum(a * h * w for a, (h, w) in zip(self.per_location, self.grid_sizes(padded_hw), strict=True))


@dataclass(frozen=True)
class PostprocessSpec(Spec):
    """How the core's raw outputs become detections, exactly as the eager torchvision model does."""

    family: HeadType
    num_classes: int  # class columns of the head; for SSD this includes background column 0
    anchors: AnchorSpec
    score_thresh: float
    nms_thresh: float
    detections_per_img: int
    topk_candidates: int
    box_coder_weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)
    normalize_by_size: bool = True  # FCOS' BoxLinearCoder
    bbox_xform_clip: float = math.log(1000.0 / 16)

    def __post_init__(self) -> None:
        if isinstance(self.anchors, Mapping):  # built from JSON
            object.__setattr__(self, "anchors", AnchorSpec.from_dict(self.anchors))
        check(self.family in HEAD_TYPES, f"family must be one of {HEAD_TYPES}, got {self.family!r}")
        check(self.num_classes >= 1, f"num_classes must be >= 1, got {self.num_classes}")
        check(0.0 <= self.score_thresh < 1.0, f"score_thresh must be in [0, 1), got {self.score_thresh}")
        check(0.0 < self.nms_thresh <= 1.0, f"nms_thresh must be in (0, 1], got {self.nms_thresh}")
        check(self.detections_per_img >= 1, f"detections_per_img must be >= 1, got {self.detections_per_img}")
        check(self.topk_candidates >= 1, f"topk_candidates must be >= 1, got {self.topk_candidates}")
        check(len(self.box_coder_weights) == 4, "box_coder_weights needs 4 values")


def output_names(head: str) -> tuple[str, ...]:
    """The core's raw outputs of a head type, in order (FCOS adds its centerness)."""
    if head == "fcos":
        return ("cls_logits", "bbox_regression", "bbox_ctrness")
    return ("cls_logits", "bbox_regression")


def outputs(spec: PostprocessSpec) -> list[TensorDecl]:
    """The core's declared outputs: [anchors, classes | 4 | 1], anchors fixed only when the input size is (SSD)."""
    fixed = spec.anchors.fixed_grid_sizes is not None and spec.anchors.fixed_input_hw is not None
    m = spec.anchors.count(tuple(spec.anchors.fixed_input_hw)) if fixed else -1  # type: ignore[arg-type]
    last = {"cls_logits": spec.num_classes, "bbox_regression": 4, "bbox_ctrness": 1}
    return [TensorDecl(n, (m, last[n]), fp16=_TOLERANCES[n][0], int8=_TOLERANCES[n][1]) for n in output_names(spec.family)]
