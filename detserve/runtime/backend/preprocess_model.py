"""Preprocess step: encoded image bytes (``IMAGE``) or raw RGB pixels (``FRAMES``) -> normalised, padded
tensor + image_info, per the stored spec."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from detserve.errors import ImageError, RequestError
from detserve.pipeline import FRAMES, IMAGE
from detserve.runtime.backend.common import (
    EarlySender,
    apply_torch_threads,
    check_wanted,
    config_parameter,
    preprocess_spec,
    request_parameters,
    tune_stub_malloc,
)
from detserve.runtime.canvas import CANVAS_PARAMETER, PER_IMAGE
from detserve.runtime.imaging import check_frame_pixels, load_image, open_request_images
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
    return _assemble(items, spec, per_image)


def preprocess_frames(frames: np.ndarray, spec: PreprocessSpec, per_image: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``FRAMES`` of one request, uint8 [n, H, W, 3] RGB -> what :func:`preprocess_images` gives for the same
    pixels sent as lossless files: the same :func:`preprocess` call on the same array, so the tensors are
    bit-identical (tests/unit/test_frames.py); the pixel budgets are checked from the shape first."""
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[3] != 3:
        raise RequestError(f"FRAMES must be uint8 [N, H, W, 3] RGB pixels, got {frames.dtype} {list(frames.shape)}")
    n, h, w = (int(v) for v in frames.shape[:3])
    if n == 0 or h == 0 or w == 0:
        raise ImageError(f"FRAMES holds no pixels (shape {list(frames.shape)})")
    check_frame_pixels(n, h, w, spec.max_image_pixels, spec.max_request_pixels)
    # a copy: Triton's input buffer is read-only and torch refuses to share one (as load_image copies)
    return _assemble([preprocess(np.array(f), spec) for f in frames], spec, per_image)


def preprocess_request(
    image: np.ndarray | None, frames: np.ndarray | None, spec: PreprocessSpec, per_image: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """One request's ``IMAGE`` or ``FRAMES`` input (both optional in the config, exactly one given)."""
    if image is not None and frames is not None:
        raise RequestError(
            "the request carries both IMAGE and FRAMES; an image comes either as encoded bytes (IMAGE) or as raw "
            "pixels (FRAMES), never both in one request",
            hint="send the encoded images and the raw frames in separate requests",
        )
    if frames is not None:
        return preprocess_frames(frames, spec, per_image)
    if image is None:
        raise RequestError(
            "the request carries no image: send IMAGE (encoded files, BYTES [N, 1]) or FRAMES (uint8 RGB [N, H, W, 3])"
        )
    return preprocess_images([bytes(b) for b in image.reshape(-1)], spec, per_image)


def _assemble(items: list[Preprocessed], spec: PreprocessSpec, per_image: bool) -> tuple[np.ndarray, np.ndarray]:
    """Preprocessed images -> one request's ([n, 3, H, W], [n, 6] image_info), each on its own canvas."""
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


def request_inputs(request: Any) -> tuple[np.ndarray | None, np.ndarray | None]:
    """A request's ``IMAGE`` and ``FRAMES`` arrays, None where absent (a repository built before FRAMES has no such input)."""
    tensors = (pb_utils.get_input_tensor_by_name(request, n) for n in (IMAGE, FRAMES))
    image, frames = (t.as_numpy() if t is not None else None for t in tensors)
    return image, frames


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
        self.sender = EarlySender(pb_utils)
        self._warm_up()

    def _warm_up(self) -> None:
        """One small PNG through the whole CPU path, so that the first request does not pay the imports its
        code makes on first use (PIL's decoders, torchvision's resize): measured, the first request after a
        load 1 085 / 1 032 ms without, 70 / 63 ms with (the second: 35-39 ms). The +87 MB they take, every
        stub took at its first image anyway; now it shows at rest."""
        import io

        from PIL import Image

        try:
            png = io.BytesIO()
            Image.new("RGB", (64, 48), (90, 120, 150)).save(png, format="PNG")
            preprocess_images([png.getvalue()], self.spec, self.per_image)
        except Exception:  # a warm-up only: whatever it meets, the requests meet and answer
            pass

    def _handle(self, request: Any) -> Any:
        # checked per request, just before its decode: the last of a batch of large images may
        # wait seconds behind the others, and its client may be gone by then (backend/common.py)
        check_wanted(request, request_parameters(request))
        encoded = pb_utils.get_input_tensor_by_name(request, "IMAGE")
        if self.device is not None and encoded is not None and pb_utils.get_input_tensor_by_name(request, "FRAMES") is None:
            return self._on_device([bytes(b) for b in encoded.as_numpy().reshape(-1)], self.device)
        images, info = preprocess_request(*request_inputs(request), self.spec, self.per_image)
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

    def execute(self, requests: list[Any]) -> list[Any] | None:
        # each request handed on as soon as its images are pre-processed (EarlySender)
        return self.sender.execute(requests, self._handle)
