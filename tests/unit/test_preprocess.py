"""Verification rung 1, in process: detserve's preprocessing equals torchvision's transform bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from detserve.runtime.imaging import decode_image
from detserve.runtime.preprocess import preprocess
from detserve.specs import PreprocessSpec

TRANSFORMS = {
    # detector -> model keywords (the transform is what matters here, so the models stay small)
    "ssdlite320_mobilenet_v3_large": {},
    "ssd300_vgg16": {},
    "retinanet_resnet50_fpn_v2": {"min_size": 256, "max_size": 320},
    "fcos_resnet50_fpn": {},  # torchvision's defaults: 800 / 1333
}


@pytest.fixture(scope="module")
def models() -> dict[str, torch.nn.Module]:
    from detserve.families.torchvision.models import build_detector

    return {name: build_detector(name, 3, **kw) for name, kw in TRANSFORMS.items()}


@pytest.mark.parametrize("detector", list(TRANSFORMS))
def test_bit_exact_against_model_transform(detector: str, models: dict[str, torch.nn.Module], samples: dict[str, bytes]) -> None:
    from torchvision.transforms.functional import to_tensor

    from detserve.families.torchvision.from_model import preprocess_spec_from_model

    model = models[detector]
    spec = preprocess_spec_from_model(model)
    for name, blob in samples.items():
        rgb = decode_image(blob, 10**9)
        ours = preprocess(rgb, spec)
        ref = model.transform([to_tensor(rgb)])[0]
        assert ours.tensor.shape == ref.tensors[0].shape, name
        assert torch.equal(ours.tensor, ref.tensors[0]), f"{name}: max diff {(ours.tensor - ref.tensors[0]).abs().max()}"
        assert ours.resized_hw == tuple(ref.image_sizes[0])
        assert ours.original_hw == rgb.shape[:2]


def test_bgr_swaps_channels() -> None:
    rgb = np.zeros((4, 4, 3), np.uint8)
    rgb[..., 0] = 255
    spec = PreprocessSpec(resize_mode="fixed", fixed_size=(4, 4), size_divisible=1, image_mean=(0, 0, 0), image_std=(1, 1, 1))
    bgr = PreprocessSpec(**{**spec.to_dict(), "color_order": "BGR"})
    assert preprocess(rgb, spec).tensor[0].eq(1).all()
    assert preprocess(rgb, bgr).tensor[2].eq(1).all() and preprocess(rgb, bgr).tensor[0].eq(0).all()


def test_padding_to_multiple_of_divisor() -> None:
    rgb = np.zeros((50, 70, 3), np.uint8)
    out = preprocess(rgb, PreprocessSpec(min_size=50, max_size=1000, size_divisible=32))
    assert out.resized_hw == (50, 70) and out.padded_hw == (64, 96)


def test_rejects_wrong_array() -> None:
    with pytest.raises(ValueError, match="uint8"):
        preprocess(np.zeros((4, 4), np.uint8), PreprocessSpec())


def test_multi_threaded_results_agree_bit_for_bit(samples: dict[str, bytes]) -> None:
    """Why the preprocess stub keeps >= 2 torch threads: on one thread torch's CPU kernels give
    last-bit different floats (seen: up to 5e-7), on 2, 3, 4 threads the very same ones."""
    spec = PreprocessSpec(min_size=256, max_size=320)
    rgb = decode_image(samples["astronaut.jpg"], 10**9)
    previous = torch.get_num_threads()
    try:
        outs = {}
        for n in (2, 3, 4):
            torch.set_num_threads(n)
            outs[n] = preprocess(rgb, spec).tensor
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(outs[2], outs[3]) and torch.equal(outs[2], outs[4])
