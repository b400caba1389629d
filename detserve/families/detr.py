"""The DETR family: transformer detectors without NMS (RT-DETR, RT-DETRv2, D-FINE, DETR) from Hugging Face transformers.

- Preprocessing: the model's own image processor, repeated bit for bit (``resize_mode="transformers"``
  in :mod:`detserve.runtime.preprocess`): RT-DETR / D-FINE stretch to a fixed size and scale to 0..1;
  DETR resizes the short side (long side bounded), normalises, and pads only to batch neighbours.
- Core: the whole model, images -> raw ``logits`` [N, queries, classes (+1 for DETR's no-object)]
  and ``pred_boxes`` [N, queries, 4] (cx, cy, w, h relative to the input), pure-PyTorch attention.
- Decode (:func:`decode`, torch only): the image processor's ``post_process_object_detection`` --
  sigmoid and a top-k over queries x classes (RT-DETR, D-FINE), or a softmax without the no-object
  column and the best class per query (DETR) -- boxes to original pixels, score strictly above the
  threshold, by score, at most ``max_det`` (which can never exceed what the queries give).
- Reference: the processor, the eager model and the processor's post-processing on the same pixels.

There is no NMS: a request's ``iou_threshold`` is validated like everywhere (0 < t <= 1) and has no
effect (``docs/families-detr.md``). transformers is imported only by :mod:`detserve.families.detr_models`
(build, core, reference), never by the serving runtime (the spec type and :func:`decode`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, get_args

from detserve.families.base import SingleStage, TensorDecl
from detserve.specs import PreprocessSpec, RequestControls, Spec, check

if TYPE_CHECKING:
    import numpy as np
    import torch

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


# --------------------------------------------------------------------------- runtime: decode


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


def outputs(spec: DetrDecodeSpec) -> list[TensorDecl]:
    """The core's two outputs. Tolerances measured with ONNX Runtime fp32 (tests/unit/test_detr.py)."""
    return [
        TensorDecl("logits", (spec.num_queries, spec.logit_columns), atol=1e-3, rtol=1e-3, fp16=(5e-2, 2e-2)),
        TensorDecl("pred_boxes", (spec.num_queries, 4), atol=1e-4, rtol=1e-3, fp16=(1e-2, 1e-2)),
    ]


class DetrFamily(SingleStage):
    """Transformer detectors from Hugging Face transformers (see the module docstring)."""

    name = "detr"
    labels_are_indices = True  # the model's label ids 0..num_labels-1 (id2label), in the dataset's category order

    def detectors(self) -> list[str]:
        from detserve.families.detr_configs import DETECTORS

        return list(DETECTORS)

    def accepts(self, detector: str) -> bool:
        from detserve.families.detr_configs import CHECKPOINT_DETECTOR, DETECTORS

        return detector in DETECTORS or detector == CHECKPOINT_DETECTOR

    def default_num_classes(self, checkpoint: Any) -> int:
        """80 (COCO) for a model built by name (also with a weights file); 0 = a save_pretrained folder's own count."""
        from pathlib import Path

        return 0 if checkpoint is not None and Path(checkpoint).is_dir() else 80

    def build(self, detector: str, num_classes: int, checkpoint: Any, model_kwargs: dict[str, Any], seed: int | None) -> Any:
        from detserve.families.detr_models import build

        return build(detector, num_classes, checkpoint, model_kwargs, seed)

    def preprocess_spec(self, model: Any) -> PreprocessSpec:
        from detserve.families.detr_models import preprocess_spec

        return preprocess_spec(model)

    def decode_spec(self, model: Any, pre: PreprocessSpec) -> DetrDecodeSpec:
        from detserve.families.detr_models import decode_spec

        return decode_spec(model, pre)

    def decode_spec_type(self) -> type[DetrDecodeSpec]:
        return DetrDecodeSpec

    def core(self, model: Any, spec: DetrDecodeSpec) -> torch.nn.Module:
        from detserve.families.detr_models import core

        return core(model, spec)

    def outputs(self, spec: DetrDecodeSpec) -> list[TensorDecl]:
        return outputs(spec)

    def core_selects(self, spec: DetrDecodeSpec) -> bool:
        # RT-DETR / RT-DETRv2 / D-FINE (sigmoid heads) choose their decoder queries by a top-k over encoder
        # scores inside the core; DETR's queries are fixed learned slots
        return spec.activation == "sigmoid"

    def decode(
        self,
        spec: DetrDecodeSpec,
        outputs: dict[str, torch.Tensor],
        padded_hw: Sequence[int],
        resized_hw: torch.Tensor,
        original_hw: torch.Tensor,
        controls: Sequence[RequestControls],
    ) -> list[dict[str, torch.Tensor]]:
        return decode(spec, outputs, padded_hw, resized_hw, original_hw, controls)

    def reference(
        self, model: Any, rgb: np.ndarray, score_threshold: float, iou_threshold: float | None, max_det: int
    ) -> dict[str, Any]:
        """The processor + eager model + ``post_process_object_detection``; ``iou_threshold`` is ignored (no NMS)."""
        from detserve.families.detr_models import reference

        return reference(model, rgb, score_threshold, max_det)


FAMILY = DetrFamily()
