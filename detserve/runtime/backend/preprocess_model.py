"""Preprocess step: encoded image bytes -> normalised, padded tensor + image_info, per the stored spec."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from detserve.errors import ImageError, RequestError
from detserve.runtime.backend.common import (
    apply_torch_threads,
    check_wanted,
    config_parameter,
    preprocess_spec,
    request_parameters,
    respond_each,
    tune_stub_malloc,
)
from detserve.runtime.canvas import CANVAS_PARAMETER, PER_IMAGE
from detserve.runtime.imaging import load_image, open_request_images
from detserve.runtime.preprocess import Preprocessed, preprocess
from detserve.specs import PreprocessSpec


def preprocess_images(blobs: list[bytes], spec: PreprocessSpec, per_image: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Several encoded images of one request -> ([n, 3, H, W] float32, [n, 6] int32 image_info).

    Every image is padded to its own canvas only (runtime/canvas.py; ``image_info`` columns 4-5),
    never to its neighbours': ``[H, W]`` is the largest canvas, the rest of a smaller image's rows
    is filler that the next steps crop off. That needs steps that crop (``per_image``: the
    python-onnxruntime cores, the fused layout). A native core (Triton's onnxruntime or TensorRT
    backend) runs the whole tensor, so there a request whose images land on different canvases
    is refused, naming them, instead of answering differently than for each image alone.
    """
    # every header first: a request over the pixel budget fails before any image is decoded
    opened = open_request_images(blobs, spec.max_image_pixels, spec.max_request_pixels)
    items: list[Preprocessed] = []
    for i, (blob, im) in enumerate(zip(blobs, opened, strict=True)):
        try:
            items.append(preprocess(load_image(im, len(blob)), spec))
        except ImageError as e:
            where = f"image {i + 1} of {len(blobs)}: " if len(blobs) > 1 else ""
            raise ImageError(where + e.message, hint=e.hint) from e
    if not per_image:
        _one_canvas(items)
    h = max(p.padded_hw[0] for p in items)
    w = max(p.padded_hw[1] for p in items)
    batch = torch.full((len(items), 3, h, w), spec.pad_value, dtype=torch.float32)
    info = np.empty((len(items), 6), dtype=np.int32)
    for i, p in enumerate(items):
        batch[i, :, : p.padded_hw[0], : p.padded_hw[1]].copy_(p.tensor)
        info[i] = (*p.original_hw, *p.resized_hw, *p.padded_hw)
    return batch.numpy(), info


def _one_canvas(items: list[Preprocessed]) -> None:
    canvases = [tuple(p.padded_hw) for p in items]
    if len(set(canvases)) > 1:
        j = next(i for i, c in enumerate(canvases) if c != canvases[0])
        (h0, w0), (h1, w1) = canvases[0], canvases[j]
        raise RequestError(
            f"images 1 and {j + 1} of this request pre-process to different canvases ({h0}x{w0}, {h1}x{w1}); this "
            "deployment's core (a native onnxruntime or TensorRT model) runs one canvas per request, and padding an "
            "image to its neighbour's canvas would change its detections",
            hint="send images of different sizes in separate requests (the detserve client sends one per request), "
            "or serve the python-onnxruntime target or the fused layout, where every image keeps its own canvas",
        )


def step_device(args: dict[str, Any]) -> torch.device | None:
    """The config parameter ``device`` (written by ``detserve build --device gpu``): ``"cuda"`` -> this
    instance's GPU (a KIND_GPU instance group), where the IMAGE pre-processing runs and its tensor stays
    (runtime/gpu_preprocess.py). Absent or ``"cpu"`` (repositories built before): None, today's path."""
    if config_parameter(args, "device", "cpu") != "cuda":
        return None
    return torch.device("cuda", int(args.get("model_instance_device_id", 0)))


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        tune_stub_malloc()
        apply_torch_threads(args)
        self.spec = preprocess_spec(args)  # the build's, with the server's pixel budget if it sets one
        self.per_image = config_parameter(args, CANVAS_PARAMETER, "") == PER_IMAGE
        self.device = step_device(args)

    def _handle(self, request: Any) -> Any:
        # checked per request, just before its decode: the last of a batch of large images may
        # wait seconds behind the others, and its client may be gone by then (backend/common.py)
        check_wanted(request, request_parameters(request))
        encoded = pb_utils.get_input_tensor_by_name(request, "IMAGE")
        if self.device is not None and encoded is not None and pb_utils.get_input_tensor_by_name(request, "FRAMES") is None:
            return self._on_device([bytes(b) for b in encoded.as_numpy().reshape(-1)], self.device)
        tensor = pb_utils.get_input_tensor_by_name(request, "IMAGE")
        blobs = [bytes(b) for b in tensor.as_numpy().reshape(-1)]
        images, info = preprocess_images(blobs, self.spec, self.per_image)
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("images", images), pb_utils.Tensor("image_info", info)])

    def _on_device(self, blobs: list[bytes], device: torch.device) -> Any:
        """Decoded and pre-processed on ``device``; the tensor handed on through DLPack, no host copy."""
        import torch.utils.dlpack

        from detserve.runtime.gpu_preprocess import preprocess_on, stack_on

        items = preprocess_on(blobs, self.spec, device)
        if not self.per_image:
            _one_canvas(items)
        images, info = stack_on(items, self.spec)
        tensor = pb_utils.Tensor.from_dlpack("images", torch.utils.dlpack.to_dlpack(images))
        return pb_utils.InferenceResponse(output_tensors=[tensor, pb_utils.Tensor("image_info", info)])

    def execute(self, requests: list[Any]) -> list[Any]:
        return respond_each(pb_utils, requests, self._handle)
