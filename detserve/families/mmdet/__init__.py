"""The mmdet family: CenterNet and CornerNet from OpenMMLab's mmdet 3.3 on the seam.

- Preprocessing: mmdet's test pipeline repeated (``resize_mode="mmdet_center"`` in
  :mod:`detserve.runtime.preprocess`): no resize, the image pasted centred on a canvas padded by
  ``RandomCenterCropPad``'s logical-or rule, then the data preprocessor's mean/std; the border
  (the image's place on the canvas) follows from ``image_info``.
- Core: backbone + neck + head (CornerNet: the last hourglass stack's head, its corner pools rewritten
  without ``cummax`` so it exports: ``pool.py``): the raw heatmaps, sizes/embeddings and offsets.
- Decode (``decode.py``, torch only): mmdet's peak extraction, top-k and box assembly; CornerNet's
  corner grouping and mmcv's soft-NMS, step for step.
- Reference: mmdet's ``inference_detector`` (the config's test pipeline and ``predict``).

mmdet/mmcv/mmengine (Apache-2.0) are imported only in ``models.py`` and ``zoo.py`` (the compiled-ops
stand-in and mmcv's soft-NMS built alone); the serving runtime never imports them.
"""

from __future__ import annotations

from typing import Any

from detserve.families.base import ModelsHalf, SingleStage
from detserve.families.mmdet.decode import decode
from detserve.families.mmdet.spec import MmdetDecodeSpec, outputs

NAMED = ("centernet_r18", "cornernet_hg104", "cornernet_tiny")  # models.DETECTORS' keys (no mmdet import here)
CHECKPOINT_DETECTOR = "mmdet"


class MmdetFamily(SingleStage, ModelsHalf):
    """mmdet CenterNet / CornerNet detectors (see the module docstring)."""

    name = "mmdet"
    labels_are_indices = True  # mmdet class indices 0..nc-1, in the dataset's category order
    outputs = staticmethod(outputs)
    decode = staticmethod(decode)

    def detectors(self) -> list[str]:
        return list(NAMED)

    def accepts(self, detector: str) -> bool:
        """A named test model, or ``mmdet``: the architecture of the ``--config`` given with it."""
        return detector in NAMED or detector == CHECKPOINT_DETECTOR

    def default_num_classes(self, checkpoint: Any) -> int:
        """0: the config's own class count."""
        return 0

    def decode_spec_type(self) -> type[MmdetDecodeSpec]:
        return MmdetDecodeSpec

    def core_selects(self, spec: Any) -> bool:
        return False  # dense heatmaps: every output position is a fixed place; the top-k is in the decode

    def models(self) -> Any:
        from detserve.families.mmdet import models

        return models


FAMILY = MmdetFamily()
