"""The YOLO family: ultralytics YOLOv8 / YOLO11 (and YOLOv10 / YOLO26) detection models on the seam.

- Preprocessing: ultralytics' own ``LetterBox`` on a fixed square canvas (``resize_mode="ultralytics"``
  in :mod:`detserve.runtime.preprocess`: OpenCV resize of the uint8 pixels, centred pad 114, 0..1, RGB).
- Core: the network with its in-graph box decode, as ultralytics exports it: ``predictions``
  [N, 4 + nc, anchors] (xywh in input pixels + class probabilities, no NMS); an end-to-end head
  (``model_kwargs={"end2end": True}`` on YOLOv10/YOLO26) gives ``detections`` [N, k, 6] instead
  (x1y1x2y2, score, class: the head's own top-k, no NMS needed).
- Decode (``decode.py``, torch/torchvision only): ultralytics' ``non_max_suppression`` then
  ``scale_boxes``, vectorised over the batch with per-request controls.
- Reference: ultralytics' ``DetectionPredictor`` on the same pixels.

ultralytics is AGPL-3.0: it builds/loads models, exports the core and is the parity reference, all
in ``models.py`` (imported only inside the members that need it). The serving runtime (``spec.py``,
``decode.py``) never imports it.
"""

from __future__ import annotations

from typing import Any

from detserve.families.base import ModelsHalf, SingleStage
from detserve.families.yolo.decode import decode
from detserve.families.yolo.spec import CHECKPOINT_DETECTOR, DETECTORS, YoloDecodeSpec, outputs


class YoloFamily(SingleStage, ModelsHalf):
    """ultralytics YOLO detection models (see the module docstring)."""

    name = "yolo"
    labels_are_indices = True  # ultralytics class ids 0..nc-1, in the dataset's category order
    outputs = staticmethod(outputs)
    decode = staticmethod(decode)

    def detectors(self) -> list[str]:
        return list(DETECTORS)

    def accepts(self, detector: str) -> bool:
        """A model name, or ``yolo``: the architecture of the checkpoint given with it."""
        return detector in DETECTORS or detector == CHECKPOINT_DETECTOR

    def default_num_classes(self, checkpoint: Any) -> int:
        """80 (COCO) for a model built by name; 0 = the checkpoint's own count."""
        return 0 if checkpoint is not None else 80

    def decode_spec_type(self) -> type[YoloDecodeSpec]:
        return YoloDecodeSpec

    def core_selects(self, spec: Any) -> bool:
        # end-to-end heads (YOLOv10, YOLO26) pick their detections by a top-k inside the graph: near-ties
        # reorder the rows across runtimes; otherwise every output column is a fixed grid position
        return bool(spec.end2end)

    def models(self) -> Any:
        from detserve.families.yolo import models

        return models


FAMILY = YoloFamily()
