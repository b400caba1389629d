"""The DETR family: transformer detectors without NMS (RT-DETR, RT-DETRv2, D-FINE, DETR) from Hugging Face transformers.

- Preprocessing: the model's own image processor, repeated bit for bit (``resize_mode="transformers"``
  in :mod:`detserve.runtime.preprocess`): RT-DETR / D-FINE stretch to a fixed size and scale to 0..1;
  DETR resizes the short side (long side bounded), normalises, and pads only to batch neighbours.
- Core: the whole model, images -> raw ``logits`` [N, queries, classes (+1 for DETR's no-object)]
  and ``pred_boxes`` [N, queries, 4] (cx, cy, w, h relative to the input), pure-PyTorch attention.
- Decode (``decode.py``, torch only): the image processor's ``post_process_object_detection`` --
  sigmoid and a top-k over queries x classes (RT-DETR, D-FINE), or a softmax without the no-object
  column and the best class per query (DETR) -- boxes to original pixels, score strictly above the
  threshold, by score, at most ``max_det`` (which can never exceed what the queries give).
- Reference: the processor, the eager model and the processor's post-processing on the same pixels.

There is no NMS: a request's ``iou_threshold`` is validated like everywhere (0 < t <= 1) and has no
effect (``docs/families-detr.md``). transformers is imported only by :mod:`detserve.families.detr.models`
(build, core, reference), never by the serving runtime (``spec.py``, ``decode.py``).
"""

from __future__ import annotations

from typing import Any

from detserve.families.base import ModelsHalf, SingleStage
from detserve.families.detr.decode import decode
from detserve.families.detr.spec import DetrDecodeSpec, outputs


class DetrFamily(SingleStage, ModelsHalf):
    """Transformer detectors from Hugging Face transformers (see the module docstring)."""

    name = "detr"
    labels_are_indices = True  # the model's label ids 0..num_labels-1 (id2label), in the dataset's category order
    outputs = staticmethod(outputs)
    decode = staticmethod(decode)

    def detectors(self) -> list[str]:
        from detserve.families.detr.configs import DETECTORS

        return list(DETECTORS)

    def accepts(self, detector: str) -> bool:
        from detserve.families.detr.configs import CHECKPOINT_DETECTOR, DETECTORS

        return detector in DETECTORS or detector == CHECKPOINT_DETECTOR

    def default_num_classes(self, checkpoint: Any) -> int:
        """80 (COCO) for a model built by name (also with a weights file); 0 = a save_pretrained folder's own count."""
        from pathlib import Path

        return 0 if checkpoint is not None and Path(checkpoint).is_dir() else 80

    def decode_spec_type(self) -> type[DetrDecodeSpec]:
        return DetrDecodeSpec

    def core_selects(self, spec: DetrDecodeSpec) -> bool:
        # RT-DETR / RT-DETRv2 / D-FINE (sigmoid heads) choose their decoder queries by a top-k over encoder
        # scores inside the core; DETR's queries are fixed learned slots
        return spec.activation == "sigmoid"

    def models(self) -> Any:
        from detserve.families.detr import models

        return models


FAMILY = DetrFamily()
