"""Export a family's core to ONNX and verify ONNX Runtime against PyTorch, per declared output.

The core (``Family.core``) returns raw tensors only; the resize/normalise and the post-processing
(decode, NMS, rescale) stay out of the graph: they run in torch in their own Triton models, so no
engine needs NMS plugins and each piece is checked on its own. Output names, dynamic dims and
tolerances come from the family's declarations (``Family.outputs``), not from a table here.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from detserve.errors import VerificationError
from detserve.families.base import TensorDecl
from detserve.specs import PreprocessSpec

# FP32 tolerance of the ONNX Runtime check, elementwise: |ort - torch| <= ATOL * scale + RTOL * |torch|,
# where scale = max(1, max |torch|) of that output. Float32 kernel reordering errs in proportion to the
# magnitudes the network computes with, not by a fixed amount: a trained-size FCOS (BatchNorm statistics
# from images, logits up to ~1e1) differs by 4e-4 on logits near 0, which a fixed 1e-4 floor refused
# while every detection matched. A real conversion bug errs by a share of the scale itself.
FP32_ATOL = 1e-4
FP32_RTOL = 1e-4
OPSET = 17


def export_core(
    core: torch.nn.Module, outputs: Sequence[TensorDecl], pre: PreprocessSpec, path: Path, sample_hw: tuple[int, int]
) -> Path:
    """Export the core with a dynamic batch (and dynamic H/W unless the spec fixes the size); fold constants; check.

    Every declared dim of -1 becomes a dynamic axis of that output.
    """

    core = core.eval()
    names = [o.name for o in outputs]
    fixed = pre.fixed_input_hw
    hw = fixed or sample_hw
    dynamic_axes: dict[str, dict[int, str]] = {"images": {0: "batch"}}
    for out in outputs:
        dynamic_axes[out.name] = {0: "batch", **{i + 1: f"{out.name}_{i + 1}" for i, d in enumerate(out.dims) if d < 0}}
    if fixed is None:
        dynamic_axes["images"].update({2: "height", 3: "width"})
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation/tracer warnings
        # dynamo=False: the TorchScript-based exporter handles torchvision's detection heads with
        # dynamic H/W and needs no onnxscript; the graph is checked below either way.
        torch.onnx.export(
            core,
            (torch.zeros((2, 3, *hw)),),
            str(path),
            input_names=["images"],
            output_names=names,
            dynamic_axes=dynamic_axes,
            opset_version=OPSET,
            dynamo=False,
        )
    return fold_and_check(path)


def fold_and_check(path: Path) -> Path:
    """Fold constants, drop dead nodes, sort; refuse a graph ONNX's full checker rejects; save in place."""
    import onnx
    import onnx_graphsurgeon as gs

    graph = gs.import_onnx(onnx.load(str(path)))
    graph.fold_constants().cleanup().toposort()
    cleaned = gs.export_onnx(graph)
    onnx.checker.check_model(cleaned, full_check=True)
    onnx.save(cleaned, str(path))
    return path


@dataclass(frozen=True)
class OutputError:
    name: str
    shape: tuple[int, ...]
    max_abs: float
    max_rel: float
    worst_excess: float  # max(|a-b| - (atol * scale + rtol|b|)); <= 0 means within tolerance
    scale: float = 1.0  # max(1, max |reference|): the output's own magnitude, which the atol floor scales with

    @property
    def ok(self) -> bool:
        return self.worst_excess <= 0.0


@dataclass(frozen=True)
class CoreVerification:
    backend: str
    atol: float
    rtol: float
    input_shapes: list[tuple[int, ...]]
    outputs: list[OutputError]

    @property
    def ok(self) -> bool:
        return all(o.ok for o in self.outputs)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ok"] = self.ok
        return d

    def summary(self) -> str:
        parts = [f"{o.name}: max abs {o.max_abs:.2e}, max rel {o.max_rel:.2e} (scale {o.scale:.3g})" for o in self.outputs]
        return f"{self.backend} vs PyTorch ({'ok' if self.ok else 'FAILED'}): " + "; ".join(parts)


def compare_outputs(name: str, got: np.ndarray, ref: np.ndarray, atol: float, rtol: float) -> OutputError:
    """Elementwise ``|got - ref| <= atol * scale + rtol * |ref|`` with the output's scale (module comment)."""
    if got.shape != ref.shape:
        raise VerificationError(f"output {name}: shape {got.shape} differs from PyTorch's {ref.shape}")
    diff = np.abs(got.astype(np.float64) - ref.astype(np.float64))
    mag = np.abs(ref.astype(np.float64))
    scale = max(1.0, float(mag.max(initial=0.0)))
    rel = diff / np.maximum(mag, 1e-12)
    return OutputError(
        name=name,
        shape=tuple(int(s) for s in got.shape),
        max_abs=float(diff.max(initial=0.0)),
        max_rel=float(rel.max(initial=0.0)),
        worst_excess=float((diff - (atol * scale + rtol * mag)).max(initial=-np.inf)),
        scale=scale,
    )


def merge_errors(name: str, errs: Sequence[OutputError]) -> OutputError:
    """One output's errors over several batches: the worst of each figure (the last batch's shape)."""
    return OutputError(
        name=name,
        shape=errs[-1].shape,
        max_abs=max(e.max_abs for e in errs),
        max_rel=max(e.max_rel for e in errs),
        worst_excess=max(e.worst_excess for e in errs),
        scale=max(e.scale for e in errs),
    )


def verify_onnxruntime(
    core: torch.nn.Module, outputs: Sequence[TensorDecl], onnx_path: Path, batches: list[torch.Tensor]
) -> CoreVerification:
    """Run the same inputs through PyTorch and ONNX Runtime; per-output max abs/rel error within its declared fp32 tolerance."""
    import onnxruntime as ort

    core = core.eval()
    decl = {o.name: o for o in outputs}
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    errors: dict[str, list[OutputError]] = {n: [] for n in decl}
    for batch in batches:
        with torch.no_grad():
            out = core(batch)
        ref = [t.numpy() for t in ((out,) if isinstance(out, torch.Tensor) else out)]  # one output or several
        got = session.run(list(decl), {"images": batch.numpy()})
        for (name, o), g, r in zip(decl.items(), got, ref, strict=True):
            errors[name].append(compare_outputs(name, g, r, o.atol, o.rtol))
    merged = [merge_errors(n, errs) for n, errs in errors.items()]
    return CoreVerification(
        backend=f"onnxruntime {ort.__version__}",
        atol=max(o.atol for o in outputs),  # the loosest; each output has its own
        rtol=max(o.rtol for o in outputs),
        input_shapes=[tuple(int(s) for s in b.shape) for b in batches],
        outputs=merged,
    )


def require_ok(result: CoreVerification) -> None:
    if not result.ok:
        bad = [o for o in result.outputs if not o.ok]
        raise VerificationError(
            "converted core disagrees with PyTorch beyond tolerance: "
            + "; ".join(f"{o.name} max abs {o.max_abs:.3e} (rel {o.max_rel:.3e}, output scale {o.scale:.3g})" for o in bad),
            hint=f"tolerance is |diff| <= {result.atol}*max(1, max|ref|) + {result.rtol}*|ref| per output; "
            "--no-verify skips the check (not advised)",
        )
