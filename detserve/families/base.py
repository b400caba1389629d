"""The family seam: what generic code may ask a detector family, and nothing more.

A family (torchvision single-stage, YOLO, ...) is one module that provides a :class:`Family`
object. Config generation, export, verification, the post-processing model, compare and eval read
its declarations -- never a table of family names:

- ``build``: the eager model, by name with seeded test weights or from the user's checkpoint;
- ``preprocess_spec`` / ``decode_spec``: frozen, validated specs derived from the model;
- ``core``: the exportable network (images -> raw tensors) and ``outputs``: its declared tensors
  (name, dtype, dims with a symbolic batch, tolerance);
- ``decode``: the batched torch post-processing with per-request controls (runtime: no model zoo
  import);
- ``reference``: the eager model's own detections, as the library computes them (parity).

Multi-step families (two-stage R-CNN) also provide ``steps(decode_spec)``: the ordered
:class:`StepDecl` list after the generic preprocessing (roles, kinds, declared inputs/outputs),
``step_module(model, decode_spec, role)`` for each exported core and ``run_step(decode_spec, role,
inputs, image_info, controls)`` for each torch step. A family without ``steps`` is the default
three-step pipeline (preprocess / core / postprocess) and uses ``core``/``outputs``/``decode``.

Runtime parts (``decode_spec_type``, ``decode``) must import only torch/torchvision/numpy:
the serving runtime never imports a model zoo whose licence or weight would burden it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import numpy as np
    import torch

    from detserve.specs import PreprocessSpec, RequestControls


@dataclass(frozen=True)
class TensorDecl:
    """One raw output of a family's core: what configs, export and verification need to know."""

    name: str
    dims: tuple[int, ...]  # after the (always dynamic) batch dimension; -1 where the size varies per input
    dtype: str = "FP32"  # Triton's data type name
    atol: float = 1e-4  # ONNX Runtime / TensorRT fp32 vs PyTorch
    rtol: float = 1e-4
    fp16: tuple[float, float] = (2e-2, 1e-2)  # (atol, rtol) of a TensorRT fp16 engine vs ONNX Runtime fp32
    int8: tuple[float, float] = (0.5, 0.1)  # ... of an int8 engine (calibrated)

    def tolerance(self, precision: str) -> tuple[float, float]:
        """(atol, rtol) this output gets at ``precision`` (fp32 | fp16 | int8)."""
        return {"fp32": (self.atol, self.rtol), "fp16": self.fp16, "int8": self.int8}[precision]


@dataclass(frozen=True)
class StepDecl:
    """One composing model of a multi-step pipeline, after the generic preprocessing step.

    ``kind`` "core": an exported network (ONNX -> onnxruntime / TensorRT), ``step_module`` gives it;
    "python": a torch step the generic stage backend runs through ``run_step``. Inputs are
    tensors an earlier step outputs (the preprocessing step gives ``images`` and ``image_info``);
    the last step outputs the ensemble's contract.
    """

    role: str  # the model is <ensemble>_<role>
    kind: str  # "core" | "python"
    inputs: tuple[TensorDecl, ...]
    outputs: tuple[TensorDecl, ...]

    def __post_init__(self) -> None:
        if self.kind not in ("core", "python"):
            raise ValueError(f"step kind must be 'core' or 'python', got {self.kind!r}")


class Family(Protocol):
    """A detector family; see the module docstring."""

    name: str  # stored in the decode spec ("family"), the key of the registry
    # True when served labels are class indices 0..nc-1 (YOLO) rather than dataset category ids
    # (torchvision, 0 = background): eval maps them through the annotation file's categories
    labels_are_indices: bool

    def detectors(self) -> Sequence[str]:
        """The model names ``build`` accepts by name."""
        ...

    def accepts(self, detector: str) -> bool:
        """Whether ``build`` takes ``detector`` (one of ``detectors()``, or e.g. a checkpoint path it recognises)."""
        ...

    def default_num_classes(self, checkpoint: Any) -> int:
        """The class count ``build`` gets when the user gives none (0: whatever the checkpoint holds)."""
        ...

    def build(self, detector: str, num_classes: int, checkpoint: Any, model_kwargs: dict[str, Any], seed: int | None) -> Any:
        """The eager model in eval mode."""
        ...

    def preprocess_spec(self, model: Any) -> PreprocessSpec: ...

    def decode_spec(self, model: Any, pre: PreprocessSpec) -> Any: ...

    def decode_spec_type(self) -> type: ...

    def core(self, model: Any, decode_spec: Any) -> torch.nn.Module: ...

    def outputs(self, decode_spec: Any) -> Sequence[TensorDecl]: ...

    def core_selects(self, decode_spec: Any) -> bool:
        """True when the core picks what fills its output slots (a top-k over scores, e.g. RT-DETR's query
        selection): near-ties reorder the slots across runtimes, so verification compares decoded detections
        rather than tensors (converters/verify_detections.py). False: each slot means a fixed anchor/position."""
        ...

    def decode(
        self,
        spec: Any,
        outputs: dict[str, torch.Tensor],
        padded_hw: Sequence[int],
        resized_hw: torch.Tensor,
        original_hw: torch.Tensor,
        controls: Sequence[RequestControls],
    ) -> list[dict[str, torch.Tensor]]:
        """Detections per image (boxes x1y1x2y2 in original pixels, scores, labels), by score."""
        ...

    def reference(
        self, model: Any, rgb: np.ndarray, score_threshold: float, iou_threshold: float | None, max_det: int
    ) -> dict[str, Any]:
        """The library's own detections for one decoded RGB image (numpy boxes/scores/labels); iou None: the model's own."""
        ...
