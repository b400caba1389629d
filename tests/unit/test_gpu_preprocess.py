"""GPU-resident pre-processing (runtime/gpu_preprocess.py), tested on CPU tensors: the same function
with ``device="cpu"`` must give today's CPU tensor bit for bit, for every resize mode. On a CUDA GPU
(``-m gpu``) the bound against the CPU tensor is measured instead: CUDA kernels round differently."""

from __future__ import annotations

import io
import sys
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from detserve.errors import ImageError
from detserve.runtime.gpu_preprocess import preprocess_on, stack_on
from detserve.runtime.imaging import decode_image
from detserve.runtime.preprocess import preprocess
from detserve.specs import PreprocessSpec

SPECS = {
    "torchvision": PreprocessSpec(min_size=200, max_size=333),
    "torchvision-bgr": PreprocessSpec(min_size=160, max_size=240, color_order="BGR", size_divisible=1),
    "fixed": PreprocessSpec(resize_mode="fixed", fixed_size=(320, 320), image_mean=(0.5,) * 3, image_std=(0.5,) * 3),
    "ultralytics": PreprocessSpec(
        resize_mode="ultralytics", fixed_size=(320, 320), image_mean=(0, 0, 0), image_std=(1, 1, 1), pad_value=114 / 255
    ),
    "transformers": PreprocessSpec(
        resize_mode="transformers", fixed_size=(256, 320), image_mean=(0, 0, 0), image_std=(1, 1, 1), size_divisible=1
    ),
    "transformers-normalised": PreprocessSpec(resize_mode="transformers", min_size=200, max_size=300, size_divisible=1),
}


def _jpeg(rgb: np.ndarray, mode: str = "RGB", **kw: Any) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).convert(mode).save(buf, "JPEG", **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def blobs(samples: dict[str, bytes]) -> dict[str, bytes]:
    """The sample photos (JPEG, RGB PNG, grey PNG) plus JPEG variants: progressive, 4:4:4, grey, CMYK."""
    rgb = decode_image(samples["coffee.jpg"], 10**9)[::2, ::2]
    return {
        **samples,
        "progressive.jpg": _jpeg(rgb, quality=60, progressive=True),
        "444.jpg": _jpeg(rgb, quality=90, subsampling=0),
        "grey.jpg": _jpeg(rgb, "L"),
        "cmyk.jpg": _jpeg(rgb, "CMYK"),  # decoded by Pillow, then uploaded
    }


# every image for the default mode; for the others a photo, grey PNG, grey and CMYK JPEG (CI budget)
FEW = ("rocket.jpg", "camera.png", "grey.jpg", "cmyk.jpg")


@pytest.mark.parametrize("mode", list(SPECS))
def test_cpu_tensor_equals_cpu_preprocessing_bit_for_bit(mode: str, blobs: dict[str, bytes]) -> None:
    spec = SPECS[mode]
    for name, blob in blobs.items():
        if mode != "torchvision" and name not in FEW:
            continue
        ref = preprocess(decode_image(blob, 10**9), spec)
        (ours,) = preprocess_on([blob], spec, "cpu")
        assert ours.tensor.shape == ref.tensor.shape, name
        diff = (ours.tensor - ref.tensor).abs().max().item()
        assert torch.equal(ours.tensor, ref.tensor), f"{mode} {name}: max |diff| {diff}"
        assert (ours.original_hw, ours.resized_hw) == (ref.original_hw, ref.resized_hw), name


def test_request_batch_equals_the_cpu_model(monkeypatch: pytest.MonkeyPatch, blobs: dict[str, bytes]) -> None:
    """Several images of one request (own canvases, padded to the largest) as the preprocess step builds them."""
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", SimpleNamespace())
    from detserve.runtime.backend.preprocess_model import preprocess_images

    spec = SPECS["torchvision"]
    request = [blobs["rocket.jpg"], blobs["camera.png"], blobs["444.jpg"]]
    ref_images, ref_info = preprocess_images(request, spec, per_image=True)
    images, info = stack_on(preprocess_on(request, spec, "cpu"), spec)
    assert images.is_contiguous() and torch.equal(images, torch.from_numpy(ref_images))
    assert np.array_equal(info, ref_info)


def test_bad_images_fail_like_the_cpu_path(blobs: dict[str, bytes]) -> None:
    spec = SPECS["torchvision"]
    truncated = blobs["astronaut.jpg"][:5000]
    with pytest.raises(ImageError, match=r"image 2 of 2: cannot decode JPEG pixel data \(5000 bytes\).*truncated"):
        preprocess_on([blobs["rocket.jpg"], truncated], spec, "cpu")
    # a JPEG the device's decoder refuses but Pillow decodes (nvJPEG lacks some JPEG features): served as on the CPU
    import detserve.runtime.gpu_preprocess as gp

    def refuse(*_: Any) -> None:
        raise RuntimeError("unsupported JPEG process")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gp, "_decode_jpegs", refuse)
        (ours,) = preprocess_on([blobs["rocket.jpg"]], spec, "cpu")
    assert torch.equal(ours.tensor, preprocess(decode_image(blobs["rocket.jpg"], 10**9), spec).tensor)
    small = PreprocessSpec(min_size=200, max_size=333, max_request_pixels=300_000)  # 2 x 512x512 declared
    with pytest.raises(ImageError, match=r"over the per-request budget.*nothing was decoded"):
        preprocess_on([blobs["astronaut.jpg"], blobs["astronaut.jpg"]], small, "cpu")


class _Tensor:
    """pb_utils.Tensor stand-in: remembers how each output was made."""

    def __init__(self, name: str, value: Any, how: str = "numpy") -> None:
        self.name, self.value, self.how = name, value, how

    @classmethod
    def from_dlpack(cls, name: str, capsule: Any) -> _Tensor:
        return cls(name, torch.utils.dlpack.from_dlpack(capsule), "dlpack")


def test_model_device_branch_hands_the_tensor_on_by_dlpack(monkeypatch: pytest.MonkeyPatch, blobs: dict[str, bytes]) -> None:
    """The preprocess step's ``device`` branch (a CUDA device on a GPU), run here on a CPU device."""
    import json

    blob = np.array([[blobs["astronaut.jpg"]]], dtype=object)
    pb = SimpleNamespace(
        Tensor=_Tensor,
        InferenceResponse=lambda output_tensors: {t.name: t for t in output_tensors},
        get_input_tensor_by_name=lambda request, name: SimpleNamespace(as_numpy=lambda: blob) if name == "IMAGE" else None,
    )
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", pb)
    from detserve.runtime.backend import preprocess_model

    monkeypatch.setattr(preprocess_model, "pb_utils", pb)  # whichever stand-in imported it first

    spec = SPECS["torchvision"]
    config = {"parameters": {"preprocess_spec": {"string_value": spec.to_json()}, "device": {"string_value": "cuda"}}}
    assert preprocess_model.step_device({"model_config": json.dumps(config), "model_instance_device_id": "1"}) == torch.device(
        "cuda", 1
    )
    del config["parameters"]["device"]
    assert preprocess_model.step_device({"model_config": json.dumps(config)}) is None  # repositories built before

    model = preprocess_model.TritonPythonModel()
    model.spec, model.per_image, model.device = spec, False, torch.device("cpu")
    monkeypatch.setattr(preprocess_model, "check_wanted", lambda *a: None)
    monkeypatch.setattr(preprocess_model, "request_parameters", lambda r: {})
    out = model._handle(object())
    assert out["images"].how == "dlpack" and out["image_info"].how == "numpy"
    ref_images, ref_info = preprocess_model.preprocess_images([blobs["astronaut.jpg"]], spec)
    assert torch.equal(out["images"].value, torch.from_numpy(ref_images))
    assert np.array_equal(out["image_info"].value, ref_info)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", list(SPECS))
def test_cuda_tensor_bound_against_the_cpu(mode: str, blobs: dict[str, bytes]) -> None:
    """On the GPU: the same shapes and sizes; values within a bound (nvJPEG's IDCT and CUDA's resize
    round differently: a JPEG pixel may decode one level apart, i.e. 1/255 / std after normalising)."""
    spec = SPECS[mode]
    for name, blob in blobs.items():
        ref = preprocess(decode_image(blob, 10**9), spec)
        (ours,) = preprocess_on([blob], spec, "cuda")
        assert ours.tensor.device.type == "cuda" and ours.tensor.shape == ref.tensor.shape, name
        assert (ours.original_hw, ours.resized_hw) == (ref.original_hw, ref.resized_hw), name
        bound = 8.0 / 255 / min(spec.image_std)  # a few uint8 levels, in normalised units
        assert (ours.tensor.cpu() - ref.tensor).abs().max().item() <= bound, name
