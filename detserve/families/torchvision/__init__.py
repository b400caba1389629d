"""torchvision's single-stage detectors -- SSD/SSDlite, RetinaNet, FCOS -- as families on the seam.

``spec`` holds the decode spec and the core's declared outputs, ``decode`` the batched torch
post-processing (the model's own anchors, box coders, ``batched_nms``: what the serving step runs),
``from_model`` reads the specs off a live model and ``models`` builds, loads and seeds the eager
model (imported only inside the members that need it). This module is what generic code sees: one
:class:`TorchvisionFamily` per head type.
"""

from __future__ import annotations

from typing import Any

from detserve.families.base import ModelsHalf, SingleStage
from detserve.families.torchvision.decode import postprocess_batch
from detserve.families.torchvision.spec import HEAD_TYPES, PostprocessSpec, outputs
from detserve.specs import PreprocessSpec


class TorchvisionFamily(SingleStage, ModelsHalf):
    """One torchvision head type (``ssd``, ``retinanet`` or ``fcos``)."""

    labels_are_indices = False  # torchvision emits category ids (0 is background)
    outputs = staticmethod(outputs)
    decode = staticmethod(postprocess_batch)

    def __init__(self, name: str) -> None:
        self.name = name

    def detectors(self) -> list[str]:
        from detserve.families.torchvision.models import DETECTORS

        return sorted(d for d, (_, fam) in DETECTORS.items() if fam == self.name)

    def accepts(self, detector: str) -> bool:
        return detector in self.detectors()

    def default_num_classes(self, checkpoint: Any) -> int:
        """torchvision's default: COCO's 91 columns, background included."""
        return 91

    def decode_spec(self, model: Any, pre: PreprocessSpec) -> PostprocessSpec:
        from detserve.families.torchvision.from_model import postprocess_spec_from_model

        return postprocess_spec_from_model(model, self.name)

    def decode_spec_type(self) -> type[PostprocessSpec]:
        return PostprocessSpec

    def core_selects(self, spec: Any) -> bool:
        return False  # every output slot is a fixed anchor / grid position

    def models(self) -> Any:
        from detserve.families.torchvision import models

        return models


FAMILIES = {name: TorchvisionFamily(name) for name in HEAD_TYPES}
