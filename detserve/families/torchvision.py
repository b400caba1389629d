"""torchvision's single-stage detectors -- SSD/SSDlite, RetinaNet, FCOS -- as families on the seam.

Builders, checkpoints and the score-spread test fixture live in ``torchvision_models``; the specs
derived from the live model in ``torchvision_specs``; the batched torch decode (the model's own
anchors, box coders, ``batched_nms``) in ``detserve.families.torchvision_decode``. This module is what generic code
sees: one :class:`TorchvisionFamily` per head type, with the core's declared outputs.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np

from detserve.errors import SpecError
from detserve.families.base import SingleStage, TensorDecl
from detserve.specs import PostprocessSpec, PreprocessSpec, RequestControls

# (atol, rtol) at fp16 / int8 TensorRT vs ONNX Runtime fp32: logits move more than box codes
_TOLERANCES = {
    "cls_logits": ((2e-2, 1e-2), (0.5, 0.1)),
    "bbox_regression": ((1e-2, 1e-2), (0.25, 0.1)),
    "bbox_ctrness": ((2e-2, 1e-2), (0.5, 0.1)),
}


def _core_class() -> type:
    import torch

    class TorchvisionCore(torch.nn.Module):
        """backbone + head: normalised padded images -> the head's raw outputs, in declared order."""

        def __init__(self, model: torch.nn.Module, output_names: tuple[str, ...]) -> None:
            super().__init__()
            self.backbone: Any = model.backbone
            self.head: Any = model.head
            self.output_names = output_names

        def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
            features = self.backbone(images)
            if isinstance(features, torch.Tensor):  # SSD backbones may return one map
                features = OrderedDict([("0", features)])
            head_outputs = self.head(list(features.values()))
            return tuple(head_outputs[name] for name in self.output_names)

    return TorchvisionCore


class TorchvisionFamily(SingleStage):
    """One torchvision head type (``ssd``, ``retinanet`` or ``fcos``)."""

    labels_are_indices = False  # torchvision emits category ids (0 is background)

    def __init__(self, name: str) -> None:
        self.name = name

    def detectors(self) -> list[str]:
        from detserve.families.torchvision_models import DETECTORS

        return sorted(d for d, (_, fam) in DETECTORS.items() if fam == self.name)

    def accepts(self, detector: str) -> bool:
        return detector in self.detectors()

    def default_num_classes(self, checkpoint: Any) -> int:
        """torchvision's default: COCO's 91 columns, background included."""
        return 91

    def build(self, detector: str, num_classes: int, checkpoint: Any, model_kwargs: dict[str, Any], seed: int | None) -> Any:
        from detserve.families.torchvision_models import build_detector, spread_init_detector

        if seed is not None:
            if checkpoint is not None:
                raise SpecError("a spread-init seed replaces the heads' weights; it cannot be combined with a checkpoint")
            return spread_init_detector(detector, num_classes, seed, **model_kwargs)
        return build_detector(detector, num_classes, checkpoint, **model_kwargs)

    def preprocess_spec(self, model: Any) -> PreprocessSpec:
        from detserve.families.torchvision_specs import preprocess_spec_from_model

        return preprocess_spec_from_model(model)

    def decode_spec(self, model: Any, pre: PreprocessSpec) -> PostprocessSpec:
        from detserve.families.torchvision_specs import postprocess_spec_from_model

        return postprocess_spec_from_model(model, self.name)

    def decode_spec_type(self) -> type[PostprocessSpec]:
        return PostprocessSpec

    def output_names(self) -> tuple[str, ...]:
        if self.name == "fcos":
            return ("cls_logits", "bbox_regression", "bbox_ctrness")
        return ("cls_logits", "bbox_regression")

    def core_selects(self, spec: Any) -> bool:
        return False  # every output slot is a fixed anchor / grid position

    def outputs(self, spec: PostprocessSpec) -> list[TensorDecl]:
        m = _fixed_num_anchors(spec)
        last = {"cls_logits": spec.num_classes, "bbox_regression": 4, "bbox_ctrness": 1}
        return [TensorDecl(n, (m, last[n]), fp16=_TOLERANCES[n][0], int8=_TOLERANCES[n][1]) for n in self.output_names()]

    def core(self, model: Any, spec: PostprocessSpec) -> Any:
        return _core_class()(model, self.output_names()).eval()

    def decode(
        self,
        spec: PostprocessSpec,
        outputs: dict[str, Any],
        padded_hw: Sequence[int],
        resized_hw: Any,
        original_hw: Any,
        controls: Sequence[RequestControls],
    ) -> list[dict[str, Any]]:
        from detserve.families.torchvision_decode import postprocess_batch

        return postprocess_batch(spec, outputs, padded_hw, resized_hw, original_hw, controls)

    def reference(
        self, model: Any, rgb: np.ndarray, score_threshold: float, iou_threshold: float | None, max_det: int
    ) -> dict[str, Any]:
        """``model([image])`` with per-call thresholds, exactly as torchvision runs it."""
        import torch

        saved = (model.score_thresh, model.nms_thresh, model.detections_per_img)
        iou = saved[1] if iou_threshold is None else iou_threshold
        model.score_thresh, model.nms_thresh, model.detections_per_img = score_threshold, iou, max_det
        try:
            with torch.no_grad():
                out = model([torch.from_numpy(rgb).permute(2, 0, 1).float().div(255.0)])[0]
        finally:
            model.score_thresh, model.nms_thresh, model.detections_per_img = saved
        return {k: out[k].numpy() for k in ("boxes", "scores", "labels")}


def _fixed_num_anchors(spec: PostprocessSpec) -> int:
    """Anchors per image when the input size is fixed (SSD), else -1 (dynamic)."""
    if spec.anchors.fixed_grid_sizes is None or spec.anchors.fixed_input_hw is None:
        return -1
    from detserve.families.torchvision_decode import anchors_for

    anchors, _ = anchors_for(spec, tuple(spec.anchors.fixed_input_hw))
    return int(anchors.shape[0])


FAMILIES = {name: TorchvisionFamily(name) for name in ("ssd", "retinanet", "fcos")}
