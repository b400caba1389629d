"""The ensemble's output contract, whatever the family: fixed-size detection tensors per image.

``num_detections`` INT32 [1], ``boxes`` FP32 [max_det, 4], ``scores`` FP32 [max_det], ``labels``
INT32 [max_det]: fixed sizes per request so that Triton can batch responses (DESIGN.md).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from torch import Tensor


def _numpy(value: Any) -> np.ndarray:
    if isinstance(value, Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def pad_detections(det: dict[str, Any], max_det: int) -> dict[str, np.ndarray]:
    """Fixed-shape outputs for Triton (every image of a response has the same shape).

    Returns num_detections int32 [1], boxes float32 [max_det, 4], scores float32 [max_det],
    labels int32 [max_det]; rows past num_detections are zeros. Extra detections are cut.
    """
    if max_det < 1:
        raise ValueError(f"max_det must be >= 1, got {max_det}")
    scores = _numpy(det["scores"]).astype(np.float32).reshape(-1)
    k = min(int(scores.shape[0]), int(max_det))
    out = {
        "num_detections": np.array([k], dtype=np.int32),
        "boxes": np.zeros((max_det, 4), dtype=np.float32),
        "scores": np.zeros((max_det,), dtype=np.float32),
        "labels": np.zeros((max_det,), dtype=np.int32),
    }
    out["boxes"][:k] = _numpy(det["boxes"]).astype(np.float32).reshape(-1, 4)[:k]
    out["scores"][:k] = scores[:k]
    out["labels"][:k] = _numpy(det["labels"]).astype(np.int32).reshape(-1)[:k]
    return out


def stack_rows(rows: list[np.ndarray]) -> np.ndarray:
    """One request's per-image rows as a batch; rows of different lengths (a step that returns as
    many detections as an image has) are zero-padded to the longest, their count said by another output."""
    longest = max(r.shape[0] for r in rows) if rows[0].ndim else 0
    if all(r.shape == rows[0].shape for r in rows):
        return np.stack(rows)
    return np.stack([np.pad(r, [(0, longest - r.shape[0])] + [(0, 0)] * (r.ndim - 1)) for r in rows])
