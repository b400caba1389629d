"""The optimisation profile of a core: the input shapes a TensorRT engine accepts and is tuned for.

Derived from the preprocessing alone (no TensorRT), so the range is tested on a CPU. A new resize
mode needs its spatial range here.
"""

from __future__ import annotations

from dataclasses import dataclass

from detserve.errors import SpecError
from detserve.specs import PreprocessSpec

INPUT_NAME = "images"
# Smallest padded side of a dynamic-H/W profile: one stride-32 cell. torchvision's resize keeps
# the long side <= max_size, so a very elongated image can have a short side of a few pixels,
# padded to one multiple of size_divisible.
MIN_DYNAMIC_SIDE = 32


@dataclass(frozen=True)
class ShapeRange:
    """One input's min/opt/max shapes (NCHW). TensorRT tunes kernels for ``opt``."""

    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    def to_dict(self) -> dict[str, list[int]]:
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max)}


def derive_profile(pre: PreprocessSpec, max_batch_size: int, opt_batch: int | None = None) -> ShapeRange:
    """The ``images`` profile: batch 1..max_batch_size, and the spatial range the preprocessing can produce.

    - Batch: min 1, max ``max_batch_size`` (Triton's dynamic batcher never sends more), opt
      ``max_batch_size`` unless given: under load the batcher fills batches, which is where
      throughput is decided.
    - Fixed-size cores (SSD): H/W fixed at the padded ``fixed_size``.
    - Dynamic cores (RetinaNet/FCOS, torchvision resize): min ``MIN_DYNAMIC_SIDE`` (32) per side
      (an elongated image's short side), opt the 4:3 landscape size the ONNX export traces with,
      max the padded ``max_size x max_size`` (no resized side passes max_size). DETR (transformers'
      shortest/longest edge, no padding): the same, with a min of 1 pixel per side.
    """
    if max_batch_size < 1:
        raise SpecError(f"max_batch_size must be >= 1, got {max_batch_size}")
    opt_n = max_batch_size if opt_batch is None else opt_batch
    if not 1 <= opt_n <= max_batch_size:
        raise SpecError(f"opt batch must be in [1, {max_batch_size}], got {opt_n}")
    fixed = pre.fixed_input_hw
    if fixed is not None:
        lo = hi = opt = fixed
    else:
        # transformers' processors (DETR) pad nothing: an elongated image's short side can be a few pixels
        side = 1 if pre.resize_mode == "transformers" else MIN_DYNAMIC_SIDE
        lo = pre.padded_hw((side, side))
        opt = pre.trace_hw  # the size export_core traces with
        hi = pre.padded_hw((pre.max_size, pre.max_size))
    return ShapeRange((1, 3, *lo), (opt_n, 3, *opt), (max_batch_size, 3, *hi))


def calibration_shape(profile: ShapeRange, batch: int = 8) -> tuple[int, int, int, int]:
    """INT8 calibration runs at one shape: the profile's opt H/W and up to ``batch`` images."""
    n = max(1, min(batch, profile.max[0]))
    return (n, 3, int(profile.opt[2]), int(profile.opt[3]))
