"""Draw detections on the original image (a client-side choice of threshold)."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

from clients.grpc_client import Detections
from detserve.errors import ClientError

# one colour per class, by label; detserve stream's annotated videos use the same (detserve/video/sinks.py)
PALETTE = [
    (230, 25, 75),
    (60, 180, 75),
    (255, 225, 25),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
]


def draw_detections(image: bytes, detections: Detections, out_path: Path, class_names: list[str] | None = None) -> Path:
    """Save ``image`` with one labelled box per detection; returns the written path (PNG/JPEG by suffix)."""
    from PIL import Image, ImageDraw

    with Image.open(io.BytesIO(image)) as im:
        canvas = im.convert("RGB")
    if detections.masks is not None and len(detections):
        canvas = _overlay_masks(canvas, detections)
    pen = ImageDraw.Draw(canvas)
    width = max(1, round(max(canvas.size) / 300))
    for box, score, label in zip(detections.boxes, detections.scores, detections.labels, strict=True):
        colour = PALETTE[int(label) % len(PALETTE)]
        name = class_names[int(label)] if class_names and 0 <= int(label) < len(class_names) else str(int(label))
        x1, y1, x2, y2 = (float(v) for v in box)
        pen.rectangle((x1, y1, x2, y2), outline=colour, width=width)
        text = f"{name} {float(score):.2f}"
        tx, ty = x1, max(0.0, y1 - 11)
        pen.rectangle(pen.textbbox((tx, ty), text), fill=colour)
        pen.text((tx, ty), text, fill=(0, 0, 0))
    prepare_directory(out_path.parent)
    canvas.save(out_path)
    return out_path


def _overlay_masks(canvas: Any, detections: Detections, alpha: float = 0.45) -> Any:
    """Each instance mask (pasted as torchvision does, probability > 0.5) tinted in its label's colour."""
    import numpy as np
    from PIL import Image

    from clients.masks import paste_masks

    assert detections.masks is not None
    pixels = np.asarray(canvas, dtype=np.float32).copy()
    hw = (pixels.shape[0], pixels.shape[1])
    for mask, box, label in zip(detections.masks, detections.boxes, detections.labels, strict=True):
        inside = paste_masks(mask[None], box[None], hw, threshold=0.5)[0]  # one at a time: K full-size masks add up
        colour = np.array(PALETTE[int(label) % len(PALETTE)], dtype=np.float32)
        pixels[inside] = (1 - alpha) * pixels[inside] + alpha * colour
    return Image.fromarray(pixels.round().clip(0, 255).astype(np.uint8))


def prepare_directory(directory: Path) -> Path:
    """``directory``, created if missing; a clear error when a file stands in the way or it is not writable."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as e:
        raise ClientError(f"cannot write drawings into {directory}: {e.filename or directory} is a file, not a directory") from e
    except OSError as e:
        raise ClientError(f"cannot create {directory}: {e.strerror or e}") from e
    if not os.access(directory, os.W_OK):
        raise ClientError(f"cannot write drawings into {directory}: permission denied")
    return directory
