"""Raw frames (``FRAMES``, issue 25 part 3) through the same pre-processing as encoded files.

A frame sent as uint8 pixels must give the core exactly the tensor and image_info that the same
pixels give as a lossless PNG through ``IMAGE``: difference 0, for every resize mode. The served
check (a real Triton, both inputs through the ensemble's first step) is in
tests/integration/test_frames.py.
"""

from __future__ import annotations

import io
import sys
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from PIL import Image

from detserve.errors import ImageError, RequestError
from detserve.specs import PreprocessSpec

SPECS = {
    "torchvision": PreprocessSpec(min_size=96, max_size=160),
    "fixed": PreprocessSpec(resize_mode="fixed", fixed_size=(96, 128), size_divisible=1),
    "ultralytics": PreprocessSpec(
        resize_mode="ultralytics", fixed_size=(96, 96), image_mean=(0.0, 0.0, 0.0), image_std=(1.0, 1.0, 1.0), pad_value=114 / 255
    ),
    "transformers": PreprocessSpec(resize_mode="transformers", min_size=80, max_size=128, size_divisible=1),
    "transformers-bgr-fixed": PreprocessSpec(
        resize_mode="transformers", fixed_size=(64, 80), size_divisible=1, color_order="BGR"
    ),
}


@pytest.fixture
def backend(monkeypatch: pytest.MonkeyPatch) -> Any:
    """The preprocess model's module, importable without Triton's stub (its functions do not touch pb_utils)."""
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", SimpleNamespace())
    from detserve.runtime.backend import preprocess_model

    return preprocess_model


def _frames(n: int = 2, h: int = 75, w: int = 131) -> np.ndarray:
    return np.random.default_rng(7).integers(0, 256, size=(n, h, w, 3), dtype=np.uint8)


def _png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("mode", sorted(SPECS))
@pytest.mark.parametrize("per_image", [False, True])
def test_frames_equal_the_same_pixels_as_png(backend: Any, mode: str, per_image: bool) -> None:
    frames = _frames()
    spec = SPECS[mode]
    from_files = backend.preprocess_request(np.array([[_png(f)] for f in frames], dtype=object), None, spec, per_image)
    from_frames = backend.preprocess_request(None, frames, spec, per_image)
    assert from_files[0].dtype == from_frames[0].dtype == np.float32
    assert np.array_equal(from_files[1], from_frames[1]), (from_files[1], from_frames[1])
    assert from_files[0].shape == from_frames[0].shape
    assert float(np.abs(from_files[0] - from_frames[0]).max()) == 0.0  # bit for bit


def test_a_read_only_buffer_is_accepted(backend: Any) -> None:
    """Triton hands the stub a read-only array; torch cannot share one, so the frames are copied."""
    frames = _frames(1)
    frames.flags.writeable = False
    images, info = backend.preprocess_frames(frames, SPECS["torchvision"])
    assert images.shape[0] == 1 and info[0, :2].tolist() == [75, 131]


def test_both_or_neither_input_is_a_clear_error(backend: Any) -> None:
    frames = _frames(1)
    blob = np.array([[_png(frames[0])]], dtype=object)
    with pytest.raises(RequestError, match="both IMAGE and FRAMES"):
        backend.preprocess_request(blob, frames, SPECS["torchvision"])
    with pytest.raises(RequestError, match=r"no image: send IMAGE .* or FRAMES"):
        backend.preprocess_request(None, None, SPECS["torchvision"])


def test_frames_are_held_to_the_pixel_limits_before_any_work(backend: Any) -> None:
    spec = PreprocessSpec(min_size=96, max_size=160, max_image_pixels=10_000, max_request_pixels=15_000)
    with pytest.raises(ImageError, match=r"request holds 19650 pixels in its 2 frame"):
        backend.preprocess_frames(_frames(2), spec)  # each within 10 000, together 19 650 > 15 000
    with pytest.raises(ImageError, match="over the limit of 10000"):
        backend.preprocess_frames(_frames(1, 101, 100), spec)
    with pytest.raises(ImageError, match="no pixels"):
        backend.preprocess_frames(np.zeros((1, 0, 4, 3), np.uint8), spec)
    with pytest.raises(RequestError, match=r"uint8 \[N, H, W, 3\]"):
        backend.preprocess_frames(np.zeros((1, 4, 4, 4), np.uint8), spec)


def test_frames_input_can_be_left_out_for_the_raw_body_shortcut() -> None:
    """`detserve build --no-frames-input`: IMAGE is the pre-processing's and so the ensemble's only input, which
    Triton's HTTP raw-body shortcut needs (it deduces the input only for a one-input model); FRAMES by default."""
    from detserve.tritonconfig import ServingOptions, preprocess_config

    pre = PreprocessSpec(resize_mode="fixed", fixed_size=(96, 128), size_divisible=1)
    for frames, names in ((True, ["IMAGE", "FRAMES"]), (False, ["IMAGE"])):
        # the ensemble exposes what its first step declares (tests/integration/test_contract.py serves it)
        assert [t.name for t in preprocess_config("m", pre, ServingOptions(frames_input=frames)).input] == names
