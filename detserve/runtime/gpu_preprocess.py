"""Pre-processing on a torch device: encoded images -> the core's input tensor, left on that device.

The same steps as :mod:`detserve.runtime.preprocess`, on tensors: JPEGs decoded in one batch by
``torchvision.io.decode_jpeg(device=...)`` (nvJPEG on a GPU), other formats decoded on the CPU by
:mod:`detserve.runtime.imaging` and uploaded, then scale/normalise/resize/pad in torch on the device.
The result is handed on by DLPack (runtime/backend/preprocess_model.py), so no pixel goes back to
the host between the decode and the core.

On the CPU (``device="cpu"``) the tensor equals :func:`~detserve.runtime.preprocess.preprocess`
bit for bit for every ``resize_mode`` (tests/unit/test_gpu_preprocess.py): torchvision's CPU JPEG
decoder gives Pillow's pixels (both libjpeg-turbo, checked: baseline, progressive, 4:4:4/4:2:2/4:2:0,
grey), and each image runs the same torch calls on a tensor of the same memory layout (HWC, as
``torch.from_numpy(rgb).permute(2, 0, 1)``): torch picks kernels by layout (a contiguous CHW input
happened to give the same values on the test images, which is no promise). On a GPU the kernels (and
nvJPEG's IDCT) round differently: scripts/gpu_serve_check.py measures the bound against the CPU
tensor of the same file. Modes whose reference is not torch (``"ultralytics"``: OpenCV's resize
on uint8 pixels; any mode added later and not listed in :data:`TORCH_MODES`) run the CPU path and
upload its result: equal to the CPU by construction, with no GPU work but the copy.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from detserve.errors import ImageError
from detserve.runtime.imaging import load_image, open_request_images
from detserve.runtime.preprocess import (
    Preprocessed,
    normalize,
    pad,
    preprocess,
    resize,
    resize_transformers_chw,
)
from detserve.specs import PreprocessSpec

if TYPE_CHECKING:
    from PIL import Image

# resize modes whose reference is torch: run on the device. The others run the CPU path.
TORCH_MODES = ("torchvision", "fixed", "transformers")
# JPEG pixel modes decode_jpeg(mode=RGB) turns into Pillow's convert("RGB") pixels. CMYK/YCCK
# (Adobe) and MPO go through Pillow: nvJPEG's colour conversion of those is not Pillow's.
_DEVICE_JPEG_MODES = ("RGB", "L")


def resolve_device(device: str | torch.device) -> torch.device:
    """``"cpu"``, ``"cuda"`` or ``"cuda:N"`` -> a device, refusing CUDA where there is none."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        from detserve.errors import DetserveError

        raise DetserveError(
            f"pre-processing on {dev} was asked for, but torch sees no CUDA GPU (torch {torch.__version__})",
            hint="serve this repository on a machine with an NVIDIA GPU, or rebuild it without --device gpu",
        )
    return dev


def _device_jpeg(im: Image.Image) -> bool:
    return im.format == "JPEG" and im.mode in _DEVICE_JPEG_MODES


def _decode_jpegs(blobs: Sequence[bytes], device: torch.device) -> list[torch.Tensor]:
    """JPEGs -> uint8 [3, H, W] each on ``device``, one batched call (EXIF orientation not applied, as
    :func:`~detserve.runtime.imaging.decode_image`)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
    with warnings.catch_warnings():
        # torchvision 0.29 deprecates its image codecs for TorchCodec (a warning per call would fill
        # the server log); 0.26 on the GPU machine does not. docs: the migration is future work.
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torchvision\.io")
        return list(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))


def decode_on(blobs: Sequence[bytes], spec: PreprocessSpec, device: torch.device) -> list[torch.Tensor]:
    """Encoded images -> uint8 [H, W, 3] RGB tensors on ``device``, each laid out as the CPU path's
    ``torch.from_numpy(rgb)``. Every header is checked against the pixel limits first (nothing is
    decoded for a request over its budget), exactly as on the CPU."""
    opened = open_request_images(blobs, spec.max_image_pixels, spec.max_request_pixels)
    out: list[torch.Tensor | None] = [None] * len(blobs)
    jpegs = [i for i, im in enumerate(opened) if _device_jpeg(im)]
    if jpegs:
        try:
            decoded = _decode_jpegs([blobs[i] for i in jpegs], device)
        except RuntimeError:
            # a corrupt file (Pillow below refuses it with the CPU path's message, naming it) or one the
            # device's decoder cannot take (Pillow decodes it; the request is served as on the CPU)
            decoded = []
        for i, chw in zip(jpegs, decoded, strict=False):
            out[i] = chw.permute(1, 2, 0).contiguous()
    for i in range(len(opened)):
        if out[i] is None:
            out[i] = torch.from_numpy(_load(opened, blobs, i)).to(device)
    return [t for t in out if t is not None]


def _load(opened: Sequence[Image.Image], blobs: Sequence[bytes], i: int) -> np.ndarray:
    """Image ``i`` decoded on the CPU (imaging.load_image), its error naming it as the CPU path does."""
    try:
        return load_image(opened[i], len(blobs[i]))
    except ImageError as e:
        where = f"image {i + 1} of {len(blobs)}: " if len(blobs) > 1 else ""
        raise ImageError(where + e.message, hint=e.hint) from e


def _to_float(chw: torch.Tensor, spec: PreprocessSpec) -> torch.Tensor:
    """preprocess.to_float on a uint8 [3, H, W] view (same calls, same order)."""
    if spec.color_order == "BGR":
        chw = chw.flip(0)
    return chw.to(torch.float32).div(spec.pixel_max)


def preprocess_tensor(hwc: torch.Tensor, spec: PreprocessSpec) -> Preprocessed:
    """uint8 [H, W, 3] RGB on any device -> :class:`Preprocessed` on that device (see the module docstring)."""
    original_hw = (int(hwc.shape[0]), int(hwc.shape[1]))
    if spec.resize_mode not in TORCH_MODES:  # OpenCV's (or another library's) reference: the CPU path
        return _upload(preprocess(hwc.cpu().numpy(), spec), hwc.device)
    chw = hwc.permute(2, 0, 1)
    if spec.resize_mode == "transformers":
        resized = resize_transformers_chw(chw, spec)
        return Preprocessed(resized, original_hw, (int(resized.shape[-2]), int(resized.shape[-1])))
    resized = resize(normalize(_to_float(chw, spec), spec), spec)
    return Preprocessed(pad(resized, spec), original_hw, (int(resized.shape[-2]), int(resized.shape[-1])))


def preprocess_on(blobs: Sequence[bytes], spec: PreprocessSpec, device: str | torch.device) -> list[Preprocessed]:
    """Several encoded images of one request -> one :class:`Preprocessed` each, tensors on ``device``."""
    dev = resolve_device(device)
    if dev.type != "cpu" and spec.resize_mode not in TORCH_MODES:
        # nothing to gain on the device: decode, letterbox and scale on the CPU, then upload
        return [_upload(p, dev) for p in preprocess_on(blobs, spec, "cpu")]
    items = []
    for i, hwc in enumerate(decode_on(blobs, spec, dev)):
        try:
            items.append(preprocess_tensor(hwc, spec))
        except ImageError as e:
            where = f"image {i + 1} of {len(blobs)}: " if len(blobs) > 1 else ""
            raise ImageError(where + e.message, hint=e.hint) from e
    return items


def _upload(p: Preprocessed, device: torch.device) -> Preprocessed:
    return dataclasses.replace(p, tensor=p.tensor.to(device))  # whatever else a mode records, kept


def stack_on(items: Sequence[Preprocessed], spec: PreprocessSpec) -> tuple[torch.Tensor, np.ndarray]:
    """Images -> ([n, 3, H, W] float32 on their device, contiguous and computed, ready for DLPack; [n, 6]
    int32 image_info on the host), each image on its own canvas at the top left, as
    preprocess_model.preprocess_images."""
    h = max(p.padded_hw[0] for p in items)
    w = max(p.padded_hw[1] for p in items)
    device = items[0].tensor.device
    batch = torch.full((len(items), 3, h, w), spec.pad_value, dtype=torch.float32, device=device)
    info = np.empty((len(items), 6), dtype=np.int32)
    for i, p in enumerate(items):
        batch[i, :, : p.padded_hw[0], : p.padded_hw[1]].copy_(p.tensor)
        info[i] = (*p.original_hw, *p.resized_hw, *p.padded_hw)
    if batch.is_cuda:
        # the legacy DLPack capsule (torch.utils.dlpack.to_dlpack) carries no stream: the python backend
        # and the next step read the memory on their own streams, so torch's queued kernels must be done
        torch.cuda.current_stream(batch.device).synchronize()
    return batch, info
