"""The mmdet family's decode spec and declared outputs (torch-free; no mmdet).

:class:`MmdetDecodeSpec` holds what mmdet's test-time post-processing reads from the model's
``test_cfg`` (CenterNet: top-k, max-pool kernel; CornerNet: corner top-k, embedding distance,
soft-NMS), so the served decode repeats it; ``outputs`` the core's raw tensors per head.
"""

from __future__ import annotations

from dataclasses import dataclass

from detserve.families.base import TensorDecl
from detserve.specs import Spec, check

HEADS = ("centernet", "cornernet")
SOFT_NMS_METHODS = ("naive", "linear", "gaussian")  # mmcv's soft_nms method names, in its C++ numbering
# CornerHead._decode_heatmap's num_dets: the corner pairs kept (top-k of k x k) before NMS, fixed in mmdet
CORNER_PAIRS_KEPT = 1000
NO_NMS_IOU = 0.5  # CenterNet has no NMS: a request's IoU threshold is accepted and ignored


@dataclass(frozen=True)
class MmdetDecodeSpec(Spec):
    """How a CenterNet / CornerNet core's raw heatmaps become detections, as mmdet's ``predict`` does.

    ``topk``: CenterNet's ``test_cfg.topk`` / CornerNet's ``corner_topk``; ``kernel``: the max-pool of
    the peak extraction. CornerNet: ``distance_threshold`` on the embedding distance, then mmcv's
    ``batched_nms`` with ``soft_nms`` (``soft_nms_method``, ``soft_nms_sigma``, ``soft_nms_min_score``;
    the IoU threshold is the request's, default ``nms_thresh``) and ``max_per_img``. The per-request
    score threshold keeps scores strictly above it (mmdet applies none: 0 keeps every positive score).
    """

    head: str
    num_classes: int
    class_names: tuple[str, ...]
    topk: int = 100
    kernel: int = 3
    distance_threshold: float = 0.5
    soft_nms_method: str = "gaussian"
    soft_nms_sigma: float = 0.5
    soft_nms_min_score: float = 1e-3
    max_per_img: int = 100
    score_thresh: float = 0.0
    nms_thresh: float = NO_NMS_IOU
    detections_per_img: int = 100
    family: str = "mmdet"

    def __post_init__(self) -> None:
        check(self.family == "mmdet", f"family must be 'mmdet', got {self.family!r}")
        check(self.head in HEADS, f"head must be one of {HEADS}, got {self.head!r}")
        check(self.num_classes >= 1, f"num_classes must be >= 1, got {self.num_classes}")
        check(len(self.class_names) == self.num_classes, f"need {self.num_classes} class_names, got {len(self.class_names)}")
        check(self.topk >= 1, f"topk must be >= 1, got {self.topk}")
        check(self.kernel >= 1 and self.kernel % 2 == 1, f"kernel must be odd and >= 1, got {self.kernel}")
        if self.head == "cornernet":
            check(
                self.topk * self.topk >= CORNER_PAIRS_KEPT,
                f"CornerNet keeps the best {CORNER_PAIRS_KEPT} of topk^2 corner pairs: topk must be >= 32, got {self.topk}",
            )
        check(self.soft_nms_method in SOFT_NMS_METHODS, f"soft_nms_method must be one of {SOFT_NMS_METHODS}")
        check(self.soft_nms_sigma > 0, f"soft_nms_sigma must be > 0, got {self.soft_nms_sigma}")
        check(self.soft_nms_min_score >= 0, f"soft_nms_min_score must be >= 0, got {self.soft_nms_min_score}")
        check(self.max_per_img >= 1, f"max_per_img must be >= 1, got {self.max_per_img}")
        check(0.0 <= self.score_thresh <= 1.0, f"score_thresh must be in [0, 1], got {self.score_thresh}")
        check(0.0 < self.nms_thresh <= 1.0, f"nms_thresh must be in (0, 1], got {self.nms_thresh}")
        check(self.detections_per_img >= 1, f"detections_per_img must be >= 1, got {self.detections_per_img}")


def outputs(spec: MmdetDecodeSpec) -> list[TensorDecl]:
    """The core's raw heatmaps at 1/4 of the canvas (H, W vary per canvas).

    Tolerances: ONNX Runtime fp32 vs PyTorch, measured in tests/unit/test_mmdet.py (heatmaps are
    probabilities / logits, sizes and offsets in feature cells).
    """
    c = spec.num_classes
    if spec.head == "centernet":
        return [
            TensorDecl("center_heatmap", (c, -1, -1), atol=1e-4, rtol=1e-4),
            TensorDecl("wh", (2, -1, -1), atol=1e-3, rtol=1e-4),
            TensorDecl("offset", (2, -1, -1), atol=1e-4, rtol=1e-4),
        ]
    return [
        TensorDecl("tl_heat", (c, -1, -1), atol=1e-3, rtol=1e-4),
        TensorDecl("br_heat", (c, -1, -1), atol=1e-3, rtol=1e-4),
        TensorDecl("tl_emb", (1, -1, -1), atol=1e-3, rtol=1e-4),
        TensorDecl("br_emb", (1, -1, -1), atol=1e-3, rtol=1e-4),
        TensorDecl("tl_off", (2, -1, -1), atol=1e-3, rtol=1e-4),
        TensorDecl("br_off", (2, -1, -1), atol=1e-3, rtol=1e-4),
    ]
