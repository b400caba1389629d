"""Two-stage detectors -- torchvision's Faster R-CNN and Mask R-CNN -- as a multi-step family.

``spec`` holds the decode spec and the declared steps (core -> proposals -> roi_core -> ... ->
postprocess: see its docstring for why every NMS stays in torch), ``decode`` the torch steps the
serving step model runs, ``models`` the eager models, the seeded fixture, the cores and the
reference (imported only inside the members that need it).
"""

from __future__ import annotations

from typing import Any

from detserve.families.base import ModelsHalf
from detserve.families.rcnn.decode import run_step
from detserve.families.rcnn.spec import DETECTORS, RcnnDecodeSpec, outputs, steps


class RcnnFamily(ModelsHalf):
    """torchvision Faster R-CNN / Mask R-CNN (see the module docstring)."""

    name = "rcnn"
    labels_are_indices = False  # torchvision category ids, 0 = background
    steps = staticmethod(steps)
    run_step = staticmethod(run_step)
    # the first core's outputs; they become detections only through the rest of the chain
    outputs = staticmethod(outputs)

    def detectors(self) -> list[str]:
        return list(DETECTORS)

    def accepts(self, detector: str) -> bool:
        return detector in DETECTORS

    def default_num_classes(self, checkpoint: Any) -> int:
        return 91

    def decode_spec_type(self) -> type[RcnnDecodeSpec]:
        return RcnnDecodeSpec

    def core_selects(self, spec: Any) -> bool:
        return False  # every output slot is a fixed anchor / grid position

    def models(self) -> Any:
        from detserve.families.rcnn import models

        return models


FAMILY = RcnnFamily()
