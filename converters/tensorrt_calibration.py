"""INT8 calibration data: sample images preprocessed exactly as the server preprocesses them.

Calibration only sees the core's input, so the images go through the served decoder
(:func:`detserve.runtime.imaging.decode_image`) and :func:`detserve.runtime.preprocess.preprocess` with the
model's own :class:`~detserve.specs.PreprocessSpec`: the activation ranges TensorRT measures are
those of served traffic. TensorRT calibrates at one input shape (the calibration profile), so each
tensor is placed on a canvas of that shape: padded bottom/right with the spec's ``pad_value`` (as
the preprocessing pads), cropped bottom/right where an image is larger (a portrait photo on a
landscape canvas). Fixed-size cores (SSD) need neither.

The calibration cache (TensorRT's per-tensor scales) is reused only for the same ONNX, the same
images and the same shape: a sidecar ``<cache>.json`` holds that key, so a stale cache from another
model or image set is recalibrated instead of silently applied.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from detserve.errors import DetserveError
from detserve.hashing import file_sha256
from detserve.specs import PreprocessSpec

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
MAX_CALIBRATION_IMAGES = 1000


class CalibrationDataError(DetserveError):
    """The calibration image folder is missing, empty or holds an unreadable image."""


def list_calibration_images(folder: Path, limit: int = MAX_CALIBRATION_IMAGES) -> list[Path]:
    """Image files directly in ``folder`` (sorted, so batches are reproducible), at most ``limit``."""
    if not folder.exists():
        raise CalibrationDataError(f"calibration image folder not found: {folder}")
    if not folder.is_dir():
        raise CalibrationDataError(f"--calibration-images must be a folder of images, got the file {folder}")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise CalibrationDataError(
            f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}",
            hint="use a few hundred photos like the ones you will serve; `detserve samples DIR` writes a handful",
        )
    return files[:limit]


def fit_to_canvas(tensor: Any, hw: tuple[int, int], pad_value: float) -> Any:
    """[3, h, w] -> [3, H, W]: pad bottom/right with ``pad_value``, crop bottom/right where larger."""
    out = tensor.new_full((tensor.shape[0], *hw), pad_value)
    h, w = min(hw[0], int(tensor.shape[-2])), min(hw[1], int(tensor.shape[-1]))
    out[:, :h, :w].copy_(tensor[:, :h, :w])
    return out


def preprocess_file(path: Path, pre: PreprocessSpec, hw: tuple[int, int]) -> np.ndarray:
    """One image, decoded and preprocessed as served, on the calibration canvas: float32 [3, H, W]."""
    from detserve.errors import ImageError
    from detserve.runtime.imaging import decode_image
    from detserve.runtime.preprocess import preprocess

    try:
        rgb = decode_image(path.read_bytes(), pre.max_image_pixels)
    except ImageError as e:
        raise CalibrationDataError(f"calibration image {path.name}: {e.message}", hint=e.hint) from e
    return fit_to_canvas(preprocess(rgb, pre).tensor, hw, pre.pad_value).numpy()


def make_batches(images: Sequence[np.ndarray], batch: int) -> list[np.ndarray]:
    """Full batches of ``batch`` images (the calibration shape is fixed): the last one is filled
    by cycling from the start, so every image is seen and no batch is short."""
    if not images:
        return []
    count = -(-len(images) // batch)
    order = [i % len(images) for i in range(count * batch)]
    return [np.ascontiguousarray(np.stack([images[i] for i in order[b * batch : (b + 1) * batch]])) for b in range(count)]


def load_calibration_batches(
    folder: Path, pre: PreprocessSpec, shape: tuple[int, int, int, int]
) -> tuple[list[Path], list[np.ndarray]]:
    """The folder's images as float32 batches of ``shape`` (N, 3, H, W), and the files used."""
    files = list_calibration_images(folder)
    hw = (int(shape[2]), int(shape[3]))
    return files, make_batches([preprocess_file(p, pre, hw) for p in files], int(shape[0]))


def files_digest(files: Sequence[Path]) -> str:
    """sha256 over the names and contents of the calibration images."""
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode())
        h.update(bytes.fromhex(file_sha256(p)))  # the file's digest, read in chunks
    return h.hexdigest()


@dataclass(frozen=True)
class CalibrationCache:
    """TensorRT's calibration cache file, valid only for the inputs its sidecar key names."""

    path: Path
    key: str

    @classmethod
    def for_inputs(cls, path: Path, onnx_sha256: str, files: Sequence[Path], shape: Sequence[int]) -> CalibrationCache:
        key = hashlib.sha256(json.dumps([onnx_sha256, files_digest(files), list(shape)]).encode()).hexdigest()
        return cls(path, key)

    @property
    def key_path(self) -> Path:
        return self.path.with_name(self.path.name + ".json")

    def read(self) -> bytes | None:
        """The cached scales, or None (absent, or made for another model/images/shape)."""
        if not (self.path.is_file() and self.key_path.is_file()):
            return None
        try:
            key = json.loads(self.key_path.read_text()).get("key")
        except (json.JSONDecodeError, AttributeError):
            return None
        return self.path.read_bytes() if key == self.key else None

    def write(self, data: bytes) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_bytes(data)
        self.key_path.write_text(json.dumps({"key": self.key}) + "\n")


def make_calibrator(trt: Any, batches: list[np.ndarray], cache: CalibrationCache) -> Any:
    """An ``IInt8EntropyCalibrator2`` feeding ``batches`` from CUDA memory held by torch.

    The class is created here because its base class lives in the lazily imported ``tensorrt``.
    Each batch stays referenced until the next ``get_batch`` call: TensorRT reads the pointer
    after the call returns.
    """
    import torch

    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self._batches = iter(batches)
            self._current: torch.Tensor | None = None
            self.batch_size = int(batches[0].shape[0]) if batches else 1

        def get_batch_size(self) -> int:
            return self.batch_size

        def get_batch(self, names: list[str]) -> list[int] | None:
            try:
                batch = next(self._batches)
            except StopIteration:
                self._current = None
                return None
            self._current = torch.from_numpy(batch).to("cuda", non_blocking=False).contiguous()
            torch.cuda.synchronize()  # TensorRT reads the buffer on its own stream
            return [int(self._current.data_ptr())]  # the core's one input, "images"

        def read_calibration_cache(self) -> bytes | None:
            return cache.read()

        def write_calibration_cache(self, data: Any) -> None:
            cache.write(bytes(memoryview(data)))

    return EntropyCalibrator()
