"""The ensemble's output contract, whatever the family: fixed-size detection tensors per image.

``num_detections`` INT32 [1], ``boxes`` FP32 [max_det, 4], ``scores`` FP32 [max_det], ``labels``
INT32 [max_det]: fixed sizes per request so that Triton can batch responses. The rows are made
where the contract is declared (``detserve/families/base.py``: the families pad their own steps'
rows, and a family may not import the runtime); the runtime uses them from there.
"""

from __future__ import annotations

from detserve.families.base import pad_detections, stack_rows

__all__ = ["pad_detections", "stack_rows"]
