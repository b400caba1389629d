"""The family seam: what generic code may ask a detector family, and nothing more.

A family (torchvision single-stage, YOLO, ...) is one package, ``detserve/families/<name>/``
(``spec``, ``decode``, ``models``; docs/families.md), whose ``__init__`` provides a :class:`Family`
object. Config generation, export, verification, the python step model, compare and eval read
its declarations -- never a table of family names:

- ``build``: the eager model, by name with seeded test weights or from the user's checkpoint;
- ``preprocess_spec`` / ``decode_spec``: frozen, validated specs derived from the model;
- ``steps(decode_spec)``: the ordered :class:`StepDecl` list after the generic preprocessing
  (roles, kinds, declared inputs/outputs) -- every family has them; ``step_module(model,
  decode_spec, role)`` gives each exported core and ``run_step(decode_spec, role, inputs,
  image_info, controls)`` runs each torch step;
- ``core``: the first exportable network (images -> raw tensors) and ``outputs``: its declared
  tensors (name, dtype, dims with a symbolic batch, tolerance);
- ``reference``: the eager model's own detections, as the library computes them (parity).

A single-stage family (one core, then decode + NMS) writes none of the step members itself: it
provides ``decode`` (the batched torch post-processing of ``outputs`` with per-request controls:
:class:`Decoder`) and inherits :class:`SingleStage`, whose steps are ``[core, postprocess]`` built
from ``outputs`` and the detection contract, and whose ``postprocess`` step is ``decode`` +
fixed-size padding.
Two-stage R-CNN declares its own chain (core / proposals / roi_core / ... / postprocess).

Runtime parts (``decode_spec_type``, ``decode``, ``run_step``: a family's ``spec`` and ``decode``)
must import only torch/torchvision/numpy: the serving runtime never imports a model zoo whose
licence or weight would burden it. The members that need the zoo (``build``, the specs read off the
model, ``core``/``step_module``, ``reference``) live in the family's ``models`` module, reached
through :class:`ModelsHalf`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from detserve.errors import SpecError

if TYPE_CHECKING:
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
    """One composing model of a family's pipeline, after the generic preprocessing step.

    ``kind`` "core": an exported network (ONNX -> onnxruntime / TensorRT), ``step_module`` gives it;
    "python": a torch step the python step model (runtime/backend/step_model.py) runs through ``run_step``. Inputs are
    tensors an earlier step outputs (the preprocessing step gives ``images`` and ``image_info``);
    the last step outputs the ensemble's contract.
    """

    role: str  # the model is <ensemble>_<role>
    kind: str  # "core" | "python"
    inputs: tuple[TensorDecl, ...]
    outputs: tuple[TensorDecl, ...]
    # a torch step that may run on the GPU and take its inputs where a TensorRT core left them
    # (ServingOptions.postprocess_on_gpu): a single-stage family's post-processing. R-CNN's steps
    # read the counts of earlier torch steps on the CPU, so they stay there.
    gpu_inputs: bool = False

    def __post_init__(self) -> None:
        if self.kind not in ("core", "python"):
            raise ValueError(f"step kind must be 'core' or 'python', got {self.kind!r}")


# the tensors the generic preprocessing step gives every family, and the detection contract the last
# step gives the ensemble (tritonconfig.OUTPUTS; masks only where a family adds them)
IMAGES = TensorDecl("images", (3, -1, -1))  # [3, H, W]; fixed where the preprocess spec fixes the size
IMAGE_INFO = TensorDecl("image_info", (6,), "INT32")
DETECTIONS: tuple[TensorDecl, ...] = (
    TensorDecl("num_detections", (1,), "INT32"),
    TensorDecl("boxes", (-1, 4)),
    TensorDecl("scores", (-1,)),
    TensorDecl("labels", (-1,), "INT32"),
)


def _numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor, wherever it lives
        return value.detach().cpu().numpy()  # type: ignore[no-any-return]
    return np.asarray(value)


def pad_detections(det: dict[str, Any], max_det: int) -> dict[str, np.ndarray]:
    """Fixed-shape outputs for Triton (every image of a response has the same shape).

    Returns num_detections int32 [1], boxes float32 [max_det, 4], scores float32 [max_det],
    labels int32 [max_det]; rows past num_detections are zeros. Extra detections are cut.
    """
    if max_det < 1:
        raise ValueError(f"max_det must be >= 1, got {max_det}")
    scores = _numpy(det["scores"]).astype(np.float32).reshape(-1)
    k = min(int(scores.shape[0]), int(max_det))
    out = {
        "num_detections": np.array([k], dtype=np.int32),
        "boxes": np.zeros((max_det, 4), dtype=np.float32),
        "scores": np.zeros((max_det,), dtype=np.float32),
        "labels": np.zeros((max_det,), dtype=np.int32),
    }
    out["boxes"][:k] = _numpy(det["boxes"]).astype(np.float32).reshape(-1, 4)[:k]
    out["scores"][:k] = scores[:k]
    out["labels"][:k] = _numpy(det["labels"]).astype(np.int32).reshape(-1)[:k]
    return out


def stack_rows(rows: list[np.ndarray]) -> np.ndarray:
    """One request's per-image rows as a batch; rows of different lengths (a step that returns as
    many detections as an image has) are zero-padded to the longest, their count said by another output."""
    longest = max(r.shape[0] for r in rows) if rows[0].ndim else 0
    if all(r.shape == rows[0].shape for r in rows):
        return np.stack(rows)
    return np.stack([np.pad(r, [(0, longest - r.shape[0])] + [(0, 0)] * (r.ndim - 1)) for r in rows])


def single_stage_steps(outputs: Sequence[TensorDecl]) -> list[StepDecl]:
    """The steps of every single-stage family: its core (``images`` -> ``outputs``), then the
    post-processing (``outputs`` + ``image_info`` -> the detections)."""
    raw = tuple(outputs)
    return [
        StepDecl("core", "core", (IMAGES,), raw),
        StepDecl("postprocess", "python", (*raw, IMAGE_INFO), DETECTIONS, gpu_inputs=True),
    ]


def is_single_stage(steps: Sequence[StepDecl]) -> bool:
    """True for ``[core, postprocess]``: one core whose outputs the post-processing decodes (the
    build exports and verifies it as one core, and may fuse it; see converters/repository.py)."""
    return [(s.role, s.kind) for s in steps] == [("core", "core"), ("postprocess", "python")]


class Decoder(Protocol):
    """A single-stage family's own part: its core, the core's outputs, and their decode (what
    :class:`SingleStage` builds the step members from, and what verification judges a core by)."""

    def outputs(self, decode_spec: Any) -> Sequence[TensorDecl]: ...

    def core(self, model: Any, decode_spec: Any) -> torch.nn.Module: ...

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


class SingleStage:
    """The step members of a single-stage family, from its ``outputs``, ``core`` and ``decode``."""

    def steps(self: Decoder, decode_spec: Any) -> list[StepDecl]:
        return single_stage_steps(self.outputs(decode_spec))

    def step_module(self: Decoder, model: Any, decode_spec: Any, role: str) -> torch.nn.Module:
        if role != "core":
            raise SpecError(f"a single-stage family exports one core, not {role!r}")
        return self.core(model, decode_spec)

    def run_step(
        self: Decoder,
        decode_spec: Any,
        role: str,
        raw: dict[str, Any],
        info: torch.Tensor,
        controls: Sequence[RequestControls],
    ) -> list[dict[str, np.ndarray]]:
        """``postprocess``: decode + NMS the images (one canvas) in one pass, where ``raw`` is (CPU, or
        the GPU a TensorRT core left it on); ``max_det`` zero-padded rows per image, on the CPU."""
        if role != "postprocess":
            raise SpecError(f"a single-stage family has one torch step, 'postprocess', not {role!r}")
        canvas = (int(info[0, 4]), int(info[0, 5]))  # image_info's own padded size (runtime/canvas.py)
        dets = self.decode(decode_spec, raw, canvas, info[:, 2:4], info[:, 0:2], controls)
        return [pad_detections(d, c.max_det) for d, c in zip(dets, controls, strict=True)]


class ModelsHalf:
    """The members a family keeps in its zoo half (``<family>/models.py``): imported on first use, so
    asking the registry for a family never loads a model library. A family defines :meth:`models`
    (one function-level import of its ``models`` module); the module provides ``build``,
    ``preprocess_spec``, ``decode_spec``, ``core`` (a multi-step family also ``step_module``) and
    ``reference`` with the :class:`Family` signatures."""

    def models(self) -> Any:
        raise NotImplementedError

    def build(self, detector: str, num_classes: int, checkpoint: Any, model_kwargs: dict[str, Any], seed: int | None) -> Any:
        return self.models().build(detector, num_classes, checkpoint, model_kwargs, seed)

    def preprocess_spec(self, model: Any) -> PreprocessSpec:
        return self.models().preprocess_spec(model)  # type: ignore[no-any-return]

    def decode_spec(self, model: Any, pre: PreprocessSpec) -> Any:
        return self.models().decode_spec(model, pre)

    def core(self, model: Any, decode_spec: Any) -> torch.nn.Module:
        return self.models().core(model, decode_spec)  # type: ignore[no-any-return]

    def step_module(self, model: Any, decode_spec: Any, role: str) -> torch.nn.Module:
        return self.models().step_module(model, decode_spec, role)  # type: ignore[no-any-return]

    def reference(
        self, model: Any, rgb: np.ndarray, score_threshold: float, iou_threshold: float | None, max_det: int
    ) -> dict[str, Any]:
        return self.models().reference(model, rgb, score_threshold, iou_threshold, max_det)  # type: ignore[no-any-return]


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

    def steps(self, decode_spec: Any) -> list[StepDecl]:
        """The composing models after the generic preprocessing, in order; the last gives the detections."""
        ...

    def step_module(self, model: Any, decode_spec: Any, role: str) -> torch.nn.Module:
        """The exportable network of the core step ``role`` (inputs and outputs in declared order)."""
        ...

    def run_step(
        self, decode_spec: Any, role: str, raw: dict[str, Any], info: torch.Tensor, controls: Sequence[RequestControls]
    ) -> list[dict[str, np.ndarray]]:
        """The torch step ``role`` over a batch of images of one canvas: one dict of output rows per image."""
        ...

    def reference(
        self, model: Any, rgb: np.ndarray, score_threshold: float, iou_threshold: float | None, max_det: int
    ) -> dict[str, Any]:
        """The library's own detections for one decoded RGB image (numpy boxes/scores/labels); iou None: the model's own."""
        ...
