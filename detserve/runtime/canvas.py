"""Every image of a request on its own canvas.

A request may carry several images of different sizes. A padding family (torchvision's R-CNN,
FCOS, RetinaNet; DETR) pads an image to a multiple of its stride. Padding it further, to the
largest image of its request as torchvision batches them, moves the features near the padding:
an image's detections would depend on the images sent beside it. So each image keeps its own
canvas (``image_info`` columns 4-5: the padded size of that image alone), and the steps group
*images*, not requests, by shape: images of one shape from any requests run as one batch.

Between steps a request's tensor is still one dense array (Triton's contract). Where the images
of one request have outputs of different shapes (a core's feature maps or per-anchor outputs
follow the canvas), the per-image arrays travel zero-padded to the largest, with a companion
tensor ``<name>__shape`` (INT32 ``[n, ndim]``: each image's own shape) that the next step reads to
crop them back. The pre-processed ``images`` need no companion: their shapes are the canvases.

numpy only (torch tensors slice the same way): the python-onnxruntime core imports it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from detserve.errors import DetserveError

SHAPE_SUFFIX = "__shape"
# the pre-processing step's config parameter: "per_image" where every later step crops each image
# to its own canvas (python-onnxruntime cores), otherwise one canvas per request (native backends)
CANVAS_PARAMETER = "canvas"
PER_IMAGE = "per_image"


def shape_name(name: str) -> str:
    """The companion tensor that gives each image's own shape of ``name``."""
    return name + SHAPE_SUFFIX


def is_shape_name(name: str) -> bool:
    return name.endswith(SHAPE_SUFFIX)


def canvas_of(info_row: Any) -> tuple[int, int]:
    """An image's own padded size, from its ``image_info`` row."""
    return int(info_row[4]), int(info_row[5])


def pack(rows: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """One request's per-image arrays -> (their zero-padded stack, INT32 [n, ndim] own shapes)."""
    shapes = np.array([r.shape for r in rows], dtype=np.int32).reshape(len(rows), -1)
    if len(rows) == 1:  # the common case: one image per request, no copy
        return rows[0][None], shapes
    if all(r.shape == rows[0].shape for r in rows):
        return np.stack(rows), shapes
    out = np.zeros((len(rows), *shapes.max(axis=0).tolist()), dtype=rows[0].dtype)
    for i, r in enumerate(rows):
        out[(i, *(slice(0, s) for s in r.shape))] = r
    return out, shapes


def unpack(batch: Any, shapes: np.ndarray | None, name: str = "tensor") -> list[Any]:
    """A request's tensor -> one array per image, each cropped to its own shape (``shapes``; None: rows as they are)."""
    n = int(batch.shape[0])
    if shapes is None:
        return [batch[i] for i in range(n)]
    dims = tuple(int(d) for d in batch.shape[1:])
    if shapes.shape != (n, len(dims)) or (shapes < 0).any() or (shapes > np.array(dims, dtype=np.int64)).any():
        raise DetserveError(f"{shape_name(name)} {shapes.tolist()} does not describe {name} of shape {list(batch.shape)}")
    return [batch[(i, *(slice(0, int(s)) for s in shapes[i]))] for i in range(n)]


def crop_to_canvases(images: Any, info: np.ndarray) -> list[Any]:
    """The pre-processed images of a request, each on its own canvas (``image_info`` columns 4-5)."""
    if info.shape[0] != images.shape[0]:
        raise DetserveError(f"image_info has {info.shape[0]} rows for {images.shape[0]} images")
    crops = []
    for i in range(images.shape[0]):
        h, w = canvas_of(info[i])
        if not (0 < h <= images.shape[-2] and 0 < w <= images.shape[-1]):
            raise DetserveError(f"image_info canvas {h}x{w} outside the images tensor {list(images.shape)}")
        crops.append(images[i, :, :h, :w])
    return crops
