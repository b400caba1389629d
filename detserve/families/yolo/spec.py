"""The YOLO family's decode spec and declared output (torch-free; no ultralytics).

The named models, ultralytics' predict defaults, :class:`YoloDecodeSpec` (how the core's output
becomes detections, as ultralytics' predictor does it) and the core's one output.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from detserve.families.base import TensorDecl
from detserve.specs import Spec, check

# name -> the package's model yaml (the scale letter selects depth/width from the yaml's "scales")
DETECTORS: dict[str, str] = {
    **{f"yolov8{s}": f"yolov8{s}.yaml" for s in "nsmlx"},
    **{f"yolo11{s}": f"yolo11{s}.yaml" for s in "nsmlx"},
    **{f"yolov10{s}": f"yolov10{s}.yaml" for s in "nsmblx"},
    **{f"yolo26{s}": f"yolo26{s}.yaml" for s in "nsmlx"},
}
DEFAULT_IMGSZ = 640
CHECKPOINT_DETECTOR = "yolo"  # the detector name for a user's checkpoint (its own architecture)
PAD_VALUE = 114  # ultralytics' LetterBox fill, in uint8 pixels
# ultralytics' predict defaults: Model.predict sets conf 0.25; cfg/default.yaml iou 0.7, max_det 300;
# utils/nms.py non_max_suppression max_nms 30000 (candidate cap) and max_wh 7680 (class offset)
DEFAULT_CONF, DEFAULT_IOU, DEFAULT_MAX_DET, MAX_NMS, MAX_WH = 0.25, 0.7, 300, 30000, 7680


@dataclass(frozen=True)
class YoloDecodeSpec(Spec):
    """How a YOLO core's output becomes detections, exactly as ultralytics' predictor does it.

    ``score_thresh``/``nms_thresh``/``detections_per_img`` are the per-request defaults (named as in
    the torchvision spec so :meth:`RequestControls.from_parameters` reads either). ``num_predictions``
    is the core's last/middle dim: anchors (NMS head) or the end-to-end head's top-k slots.
    """

    num_classes: int
    class_names: tuple[str, ...]
    imgsz: int
    strides: tuple[int, ...]
    num_predictions: int
    score_thresh: float = DEFAULT_CONF
    nms_thresh: float = DEFAULT_IOU
    detections_per_img: int = DEFAULT_MAX_DET
    max_nms: int = MAX_NMS
    max_wh: int = MAX_WH
    agnostic: bool = False
    end2end: bool = False
    family: str = "yolo"

    def __post_init__(self) -> None:
        check(self.family == "yolo", f"family must be 'yolo', got {self.family!r}")
        check(self.num_classes >= 1, f"num_classes must be >= 1, got {self.num_classes}")
        check(len(self.class_names) == self.num_classes, f"need {self.num_classes} class_names, got {len(self.class_names)}")
        check(len(self.strides) > 0 and min(self.strides) > 0, f"strides must be positive, got {self.strides}")
        check(
            self.imgsz > 0 and self.imgsz % max(self.strides) == 0,
            f"imgsz must be a positive multiple of the largest stride {max(self.strides)}, got {self.imgsz}",
        )
        anchors = num_anchors(self.imgsz, self.strides)
        expected = min(self.num_predictions, anchors) if self.end2end else anchors
        check(
            self.num_predictions == expected,
            f"num_predictions must be {expected} (anchors: {anchors}), got {self.num_predictions}",
        )
        check(0.0 <= self.score_thresh <= 1.0, f"score_thresh must be in [0, 1], got {self.score_thresh}")
        check(0.0 < self.nms_thresh <= 1.0, f"nms_thresh must be in (0, 1], got {self.nms_thresh}")
        check(self.detections_per_img >= 1, f"detections_per_img must be >= 1, got {self.detections_per_img}")
        check(self.max_nms >= 1, f"max_nms must be >= 1, got {self.max_nms}")
        check(self.max_wh > 0, f"max_wh must be > 0, got {self.max_wh}")
        check(not self.agnostic, "class-agnostic NMS is not supported (ultralytics' predict default is class-aware)")


def num_anchors(imgsz: int, strides: Sequence[int]) -> int:
    return sum((imgsz // s) ** 2 for s in strides)


def outputs(spec: YoloDecodeSpec) -> list[TensorDecl]:
    """The core's one output. Tolerances measured with ONNX Runtime fp32 (tests/unit/test_yolo.py):
    box coordinates are pixels up to ``imgsz`` (abs error ~1e-4 at 640), probabilities ~1e-6."""
    if spec.end2end:
        return [TensorDecl("detections", (spec.num_predictions, 6), atol=2e-3, rtol=1e-4)]
    return [TensorDecl("predictions", (4 + spec.num_classes, spec.num_predictions), atol=2e-3, rtol=1e-4)]
