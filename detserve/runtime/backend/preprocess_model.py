"""Preprocess step: encoded image bytes -> normalised, padded tensor + image_info, per the stored spec."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from detserve.errors import ImageError
from detserve.runtime.backend.common import (
    apply_torch_threads,
    check_wanted,
    preprocess_spec,
    request_parameters,
    respond_each,
    tune_stub_malloc,
)
from detserve.runtime.imaging import load_image, open_request_images
from detserve.runtime.preprocess import Preprocessed, preprocess
from detserve.specs import PreprocessSpec


def preprocess_images(blobs: list[bytes], spec: PreprocessSpec) -> tuple[np.ndarray, np.ndarray]:
    """Several encoded images of one request -> ([n, 3, H, W] float32, [n, 6] int32).

    Images of one request share one canvas (the largest padded size), as torchvision batches
    them; send one image per request (as the detserve client does) to keep every image on its
    own canvas and let Triton's dynamic batcher group same-sized requests.
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
    h = max(p.padded_hw[0] for p in items)
    w = max(p.padded_hw[1] for p in items)
    batch = torch.full((len(items), 3, h, w), spec.pad_value, dtype=torch.float32)
    info = np.empty((len(items), 6), dtype=np.int32)
    for i, p in enumerate(items):
        batch[i, :, : p.padded_hw[0], : p.padded_hw[1]].copy_(p.tensor)
        info[i] = (*p.original_hw, *p.resized_hw, h, w)
    return batch.numpy(), info


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        tune_stub_malloc()
        apply_torch_threads(args)
        self.spec = preprocess_spec(args)  # the build's, with the server's pixel budget if it sets one

    def _handle(self, request: Any) -> Any:
        # checked per request, just before its decode: the last of a batch of large images may
        # wait seconds behind the others, and its client may be gone by then (backend/common.py)
        check_wanted(request, request_parameters(request))
        tensor = pb_utils.get_input_tensor_by_name(request, "IMAGE")
        blobs = [bytes(b) for b in tensor.as_numpy().reshape(-1)]
        images, info = preprocess_images(blobs, self.spec)
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("images", images), pb_utils.Tensor("image_info", info)])

    def execute(self, requests: list[Any]) -> list[Any]:
        return respond_each(pb_utils, requests, self._handle)
