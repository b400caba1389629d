"""The DETR family's decode spec and declared outputs (torch-free; no transformers).

:class:`DetrDecodeSpec`: how the core's ``logits``/``pred_boxes`` become detections, as the image
processor's ``post_process_object_detection`` does it; the named configurations are in ``configs``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from detserve.families.base import TensorDecl
from detserve.specs import Spec, check

ModelType = Literal["rt_detr", "rt_detr_v2", "d_fine", "detr"]
Activation = Literal["sigmoid", "softmax"]
DEFAULT_THRESHOLD = 0.5  # post_process_object_detection's default threshold
DEFAULT_MAX_DET = 100  # the ensemble contract's default, bounded by the number of queries


@dataclass(frozen=True)
class DetrDecodeSpec(Spec):
    """How the core's ``logits``/``pred_boxes`` become detections, as the image processor does it.

    ``activation``: ``sigmoid`` (focal-loss heads: RT-DETR, RT-DETRv2, D-FINE; a top-k over
    queries x classes) or ``softmax`` (DETR: the last logit column is "no object" and is dropped).
    ``nms_thresh`` is fixed at 1.0: these models have no NMS, a request's IoU threshold is ignored.
    """

    model_type: ModelType
    activation: Activation
    num_classes: int  # real classes; DETR's logits have one more column
    num_queries: int
    class_names: tuple[str, ...]
    score_thresh: float = DEFAULT_THRESHOLD
    nms_thresh: float = 1.0
    detections_per_img: int = DEFAULT_MAX_DET
    family: str = "detr"

    def __post_init__(self) -> None:
        check(self.family == "detr", f"family must be 'detr', got {self.family!r}")
        check(self.model_type in get_args(ModelType), f"model_type must be one of {get_args(ModelType)}, got {self.model_type!r}")
        check(
            self.activation in get_args(Activation), f"activation must be one of {get_args(Activation)}, got {self.activation!r}"
        )
        check(self.num_classes >= 1, f"num_classes must be >= 1, got {self.num_classes}")
        check(self.num_queries >= 1, f"num_queries must be >= 1, got {self.num_queries}")
        check(len(self.class_names) == self.num_classes, f"need {self.num_classes} class_names, got {len(self.class_names)}")
        check(0.0 <= self.score_thresh <= 1.0, f"score_thresh must be in [0, 1], got {self.score_thresh}")
        check(self.nms_thresh == 1.0, f"nms_thresh must be 1.0 (DETR-style models have no NMS), got {self.nms_thresh}")
        check(
            1 <= self.detections_per_img <= self.num_queries,
            f"detections_per_img must be in [1, num_queries={self.num_queries}], got {self.detections_per_img}",
        )

    @property
    def logit_columns(self) -> int:
        return self.num_classes + (1 if self.activation == "softmax" else 0)


def outputs(spec: DetrDecodeSpec) -> list[TensorDecl]:
    """The core's two outputs. Tolerances measured with ONNX Runtime fp32 (tests/unit/test_detr.py)."""
    return [
        TensorDecl("logits", (spec.num_queries, spec.logit_columns), atol=1e-3, rtol=1e-3, fp16=(5e-2, 2e-2)),
        TensorDecl("pred_boxes", (spec.num_queries, 4), atol=1e-4, rtol=1e-3, fp16=(1e-2, 1e-2)),
    ]
