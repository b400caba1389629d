"""RGB pixels -> the core model's input tensor, exactly as the model was trained and evaluated.

For ``resize_mode="torchvision"`` and ``"fixed"`` this calls torchvision's own resize function
(the one ``GeneralizedRCNNTransform`` calls), in the same order (0..1 scale, normalise, resize,
pad), so the served tensor equals ``model.transform``'s bit for bit — a test checks difference 0.
For ``"ultralytics"`` it repeats ultralytics' ``LetterBox`` with the same OpenCV calls on the uint8
pixels (tests/unit/test_yolo.py checks difference 0 against ultralytics' predictor). For
``"transformers"`` it repeats a Hugging Face image processor's torchvision backend with the same
torchvision calls (tests/unit/test_detr.py checks difference 0 against the processor). For
``"mmdet_center"`` it repeats mmdet's centred test padding and data preprocessor (tests/unit/test_mmdet.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from detserve.specs import PreprocessSpec


@dataclass(frozen=True)
class Preprocessed:
    """One image ready for the core: the padded tensor and the sizes post-processing needs."""

    tensor: torch.Tensor  # float32 [3, H_pad, W_pad]
    original_hw: tuple[int, int]
    resized_hw: tuple[int, int]

    @property
    def padded_hw(self) -> tuple[int, int]:
        return (int(self.tensor.shape[-2]), int(self.tensor.shape[-1]))

    def info(self) -> np.ndarray:
        """INT32 [6]: original h, w; resized h, w; padded h, w (the ensemble's IMAGE_INFO)."""
        return np.array([*self.original_hw, *self.resized_hw, *self.padded_hw], dtype=np.int32)


def to_float(rgb: np.ndarray, spec: PreprocessSpec) -> torch.Tensor:
    """uint8 [H, W, 3] RGB -> float32 [3, H, W] in 0..1 (torchvision: ``x.float() / 255``)."""
    t = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)
    if spec.color_order == "BGR":
        t = t.flip(0)
    return t.to(torch.float32).div(spec.pixel_max)


def normalize(image: torch.Tensor, spec: PreprocessSpec) -> torch.Tensor:
    mean = torch.as_tensor(spec.image_mean, dtype=image.dtype, device=image.device)
    std = torch.as_tensor(spec.image_std, dtype=image.dtype, device=image.device)
    return (image - mean[:, None, None]) / std[:, None, None]


def resize(image: torch.Tensor, spec: PreprocessSpec) -> torch.Tensor:
    from torchvision.models.detection.transform import _resize_image_and_masks

    if spec.resize_mode == "torchvision":
        h, w = int(image.shape[-2]), int(image.shape[-1])
        scale = min(float(spec.min_size) / min(h, w), float(spec.max_size) / max(h, w))
        if math.floor(min(h, w) * scale) < 1:  # torch would raise deep inside interpolate
            from detserve.errors import ImageError

            raise ImageError(
                f"image {w}x{h} has too extreme an aspect ratio: resized to fit {spec.max_size} px its short side "
                "would have 0 pixels",
                hint=f"send images whose long side is at most about {spec.max_size} times the short side",
            )
        return _resize_image_and_masks(image, spec.min_size, spec.max_size)[0]
    assert spec.fixed_size is not None  # checked by the spec
    h, w = spec.fixed_size
    # "fixed": torchvision's fixed_size is (width, height)
    return _resize_image_and_masks(image, spec.min_size, spec.max_size, fixed_size=(w, h))[0]


def pad(image: torch.Tensor, spec: PreprocessSpec) -> torch.Tensor:
    """Pad bottom/right to a multiple of size_divisible."""
    ph, pw = spec.padded_hw((int(image.shape[-2]), int(image.shape[-1])))
    out = image.new_full((image.shape[0], ph, pw), spec.pad_value)
    out[:, : image.shape[-2], : image.shape[-1]].copy_(image)
    return out


def letterbox_ultralytics(rgb: np.ndarray, spec: PreprocessSpec) -> tuple[np.ndarray, tuple[int, int]]:
    """ultralytics' ``LetterBox(new_shape, auto=False, center=True)`` on uint8 pixels -> (canvas, resized hw).

    Same arithmetic as ``LetterBox.get_params`` (Python ``round`` of the scaled sides, at least 1
    pixel; ``round(d / 2 -+ 0.1)`` for the two pads) and the same calls as ``apply_image``
    (``cv2.resize`` INTER_LINEAR, skipped when the size is unchanged; ``cv2.copyMakeBorder``).
    ultralytics resizes BGR and detserve RGB: the kernel works on each channel alone, so the
    canvas is the same with its channels reversed (checked bit for bit by the tests).
    """
    import cv2

    assert spec.fixed_size is not None  # checked by the spec
    (new_h, new_w), (h, w) = spec.fixed_size, rgb.shape[:2]
    r = min(new_h / h, new_w / w)
    unpad_w, unpad_h = max(round(w * r), 1), max(round(h * r), 1)
    dw, dh = (new_w - unpad_w) / 2, (new_h - unpad_h) / 2
    top, bottom = round(dh - 0.1), round(dh + 0.1)
    left, right = round(dw - 0.1), round(dw + 0.1)
    img = rgb if (h, w) == (unpad_h, unpad_w) else cv2.resize(rgb, (unpad_w, unpad_h), interpolation=cv2.INTER_LINEAR)
    fill = round(spec.pad_value * spec.pixel_max)
    img = cv2.copyMakeBorder(img, top, bottom, left, right, cv2.BORDER_CONSTANT, value=(fill, fill, fill))
    return img, (unpad_h, unpad_w)


def shortest_longest_edge(hw: tuple[int, int], size: int, max_size: int) -> tuple[int, int]:
    """transformers' ``get_size_with_aspect_ratio`` (DETR's ``shortest_edge``/``longest_edge``), same arithmetic."""
    height, width = hw
    raw_size = None
    min_side, max_side = float(min(height, width)), float(max(height, width))
    if max_side / min_side * size > max_size:
        raw_size = max_size * min_side / max_side
        size = round(raw_size)
    if (height <= width and height == size) or (width <= height and width == size):
        return height, width
    if width < height:
        return (int(raw_size * height / width) if raw_size is not None else int(size * height / width)), size
    return size, (int(raw_size * width / height) if raw_size is not None else int(size * width / height))


def resize_transformers(rgb: np.ndarray, spec: PreprocessSpec) -> torch.Tensor:
    """A transformers image processor's torchvision backend on uint8 RGB -> float32 [3, h, w].

    The same calls as ``TorchvisionBackend``: ``tvF.resize`` of the uint8 tensor (bilinear,
    antialias), then ``rescale_and_normalize``: ``x * rescale_factor`` without normalisation, or
    its fused form ``tvF.normalize(x.float(), mean * (1 / rescale_factor), std * (1 / rescale_factor))``.
    """
    return resize_transformers_chw(torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1), spec)


def resize_transformers_chw(t: torch.Tensor, spec: PreprocessSpec) -> torch.Tensor:
    """``resize_transformers`` on a uint8 [3, H, W] tensor on any device (also runtime/gpu_preprocess.py)."""
    from torchvision.transforms.v2 import functional as tvF

    if spec.color_order == "BGR":
        t = t.flip(0)
    t = t.contiguous()
    if spec.fixed_size is not None:
        size = (int(spec.fixed_size[0]), int(spec.fixed_size[1]))
    else:
        size = shortest_longest_edge((int(t.shape[-2]), int(t.shape[-1])), spec.min_size, spec.max_size)
    if min(size) < 1:
        from detserve.errors import ImageError

        raise ImageError(
            f"image {t.shape[-1]}x{t.shape[-2]} has too extreme an aspect ratio: resized its short side would have 0 pixels",
            hint=f"send images whose long side is at most about {spec.max_size} times the short side",
        )
    t = tvF.resize(t[None], list(size), interpolation=tvF.InterpolationMode.BILINEAR, antialias=True)[0]
    rescale = 1.0 / spec.pixel_max
    if tuple(spec.image_mean) == (0.0, 0.0, 0.0) and tuple(spec.image_std) == (1.0, 1.0, 1.0):
        return t * rescale
    mean = torch.tensor(spec.image_mean) * (1.0 / rescale)
    std = torch.tensor(spec.image_std) * (1.0 / rescale)
    return tvF.normalize(t.to(torch.float32), mean.tolist(), std.tolist(), inplace=False)  # lists: any device


def center_pad(rgb: np.ndarray, spec: PreprocessSpec) -> torch.Tensor:
    """mmdet's ``RandomCenterCropPad`` test mode + ``DetDataPreprocessor`` (no resize): the float pixels pasted
    at ``canvas // 2 - size // 2`` on a canvas filled with ``center_pad_fill``, then ``(x - mean) / std``."""
    h, w = int(rgb.shape[0]), int(rgb.shape[1])
    ph, pw = spec.padded_hw((h, w))
    if max(ph, pw) > spec.max_size:
        from detserve.errors import ImageError

        raise ImageError(
            f"image {w}x{h} needs a {pw}x{ph} canvas, over this model's largest side {spec.max_size}",
            hint=f"send images whose sides are below {spec.max_size - spec.size_divisible} pixels",
        )
    canvas = torch.tensor(spec.center_pad_fill, dtype=torch.float32)[:, None, None].repeat(1, ph, pw)
    top, left = ph // 2 - h // 2, pw // 2 - w // 2
    # the crop around the centre keeps side // 2 + canvas // 2 pixels at most: an odd side equal to its
    # canvas (CornerNet: h | 127 == h) loses its last row/column in mmdet, so here too
    rows, cols = min(h, h // 2 + ph // 2), min(w, w // 2 + pw // 2)
    canvas[:, top : top + rows, left : left + cols] = to_float(rgb[:rows, :cols], spec)
    return normalize(canvas, spec)


def preprocess(rgb: np.ndarray, spec: PreprocessSpec) -> Preprocessed:
    """Decoded RGB pixels -> padded, normalised tensor, in torchvision's order (or ultralytics')."""
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected uint8 [H, W, 3], got {rgb.dtype} {rgb.shape}")
    if spec.resize_mode == "ultralytics":
        # letterbox the uint8 pixels first, then 0..1 (ultralytics: ``im.float().div_(255)``)
        canvas, resized_hw = letterbox_ultralytics(rgb, spec)
        return Preprocessed(
            tensor=normalize(to_float(canvas, spec), spec),
            original_hw=(int(rgb.shape[0]), int(rgb.shape[1])),
            resized_hw=resized_hw,
        )
    if spec.resize_mode == "mmdet_center":
        hw = (int(rgb.shape[0]), int(rgb.shape[1]))
        return Preprocessed(tensor=center_pad(rgb, spec), original_hw=hw, resized_hw=hw)
    if spec.resize_mode == "transformers":
        resized = resize_transformers(rgb, spec)
        return Preprocessed(
            tensor=resized,
            original_hw=(int(rgb.shape[0]), int(rgb.shape[1])),
            resized_hw=(int(resized.shape[-2]), int(resized.shape[-1])),
        )
    image = normalize(to_float(rgb, spec), spec)
    resized = resize(image, spec)
    return Preprocessed(
        tensor=pad(resized, spec),
        original_hw=(int(rgb.shape[0]), int(rgb.shape[1])),
        resized_hw=(int(resized.shape[-2]), int(resized.shape[-1])),
    )
