"""Instance masks: paste the served 28x28 probabilities into the original image, as torchvision does.

An instance-mask model serves ``masks`` [max_det, 28, 28] -- each detection's probabilities at the
mask head's own resolution, inside its box -- rather than full-resolution masks (100 full-HD float
masks would be ~830 MB). :func:`paste_masks` repeats torchvision's ``paste_masks_in_image``
(``torchvision.models.detection.roi_heads``) step for step in numpy, so no torch is needed:

1. pad every mask by one pixel of zeros and grow its box by the same factor (``expand_masks``,
   ``expand_boxes``: scale (28 + 2) / 28, float32 arithmetic), then truncate the box to integers;
2. resize the padded mask to the box's integer size (w = x2 - x1 + 1, at least 1) with bilinear
   interpolation, ``align_corners=False`` (``F.interpolate``);
3. copy the part inside the image onto a zero canvas.

Probabilities come out as torchvision's (to float32 rounding of the interpolation); ``threshold``
gives binary masks (torchvision's Mask R-CNN users threshold at 0.5).
"""

from __future__ import annotations

import numpy as np


def _expand_boxes(boxes: np.ndarray, scale: np.float32) -> np.ndarray:
    w_half = (boxes[:, 2] - boxes[:, 0]) * np.float32(0.5)
    h_half = (boxes[:, 3] - boxes[:, 1]) * np.float32(0.5)
    x_c = (boxes[:, 2] + boxes[:, 0]) * np.float32(0.5)
    y_c = (boxes[:, 3] + boxes[:, 1]) * np.float32(0.5)
    w_half = w_half * scale
    h_half = h_half * scale
    return np.stack([x_c - w_half, y_c - h_half, x_c + w_half, y_c + h_half], axis=1).astype(np.float32)


def _source_index(out_size: int, in_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """torch's upsample_bilinear2d (align_corners=False) source rows: (index, next index, weight of the next)."""
    scale = np.float32(in_size) / np.float32(out_size)
    src = scale * (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5)
    src = np.maximum(src, np.float32(0.0))
    i0 = src.astype(np.int64)
    i1 = np.minimum(i0 + 1, in_size - 1)
    return i0, i1, (src - i0.astype(np.float32)).astype(np.float32)


def resize_bilinear(mask: np.ndarray, h: int, w: int) -> np.ndarray:
    """``F.interpolate(mask[None, None], (h, w), mode="bilinear", align_corners=False)[0, 0]`` in float32."""
    y0, y1, ly = _source_index(h, mask.shape[0])
    x0, x1, lx = _source_index(w, mask.shape[1])
    ly, lx = ly[:, None], lx[None, :]
    one = np.float32(1.0)
    top = mask[y0][:, x0] * (one - lx) + mask[y0][:, x1] * lx
    bottom = mask[y1][:, x0] * (one - lx) + mask[y1][:, x1] * lx
    return (top * (one - ly) + bottom * ly).astype(np.float32)


def paste_boxes(boxes: np.ndarray, mask_size: int = 28, padding: int = 1) -> np.ndarray:
    """The integer boxes the masks are pasted into: grown by (M + 2 padding) / M, truncated toward
    zero (``.to(torch.int64)``). A coordinate within float noise of an integer can truncate either
    way: the pasted mask then moves by a pixel."""
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    scale = np.float32(float(mask_size + 2 * padding) / mask_size)
    return _expand_boxes(boxes, scale).astype(np.int64)


def paste_masks(
    masks: np.ndarray, boxes: np.ndarray, image_hw: tuple[int, int], threshold: float | None = None, padding: int = 1
) -> np.ndarray:
    """[K, M, M] probabilities in their boxes -> [K, H, W] float32 probabilities (or bool with ``threshold``).

    ``boxes`` are the served boxes (x1, y1, x2, y2 in original pixels), ``image_hw`` the original size.
    """
    masks = np.asarray(masks, dtype=np.float32)
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    if masks.ndim != 3 or masks.shape[0] != boxes.shape[0]:
        raise ValueError(f"need masks [K, M, M] and boxes [K, 4], got {masks.shape} and {boxes.shape}")
    im_h, im_w = int(image_hw[0]), int(image_hw[1])
    padded = np.pad(masks, ((0, 0), (padding, padding), (padding, padding)))
    ints = paste_boxes(boxes, masks.shape[-1], padding)
    out = np.zeros((masks.shape[0], im_h, im_w), dtype=np.float32)
    for k, (mask, box) in enumerate(zip(padded, ints, strict=True)):
        w = max(int(box[2] - box[0] + 1), 1)
        h = max(int(box[3] - box[1] + 1), 1)
        resized = resize_bilinear(mask, h, w)
        x_0, x_1 = max(int(box[0]), 0), min(int(box[2]) + 1, im_w)
        y_0, y_1 = max(int(box[1]), 0), min(int(box[3]) + 1, im_h)
        if x_1 > x_0 and y_1 > y_0:
            out[k, y_0:y_1, x_0:x_1] = resized[y_0 - box[1] : y_1 - box[1], x_0 - box[0] : x_1 - box[0]]
    return out if threshold is None else out > threshold


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two binary masks (1.0 when both are empty)."""
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)
