"""The torch core target (``--target python-torch``): every core step saved as a torch artifact and
run by torch inside the python step model, verified against eager PyTorch like the ONNX core.

The artifact is a ``torch.export`` ExportedProgram (``model.pt2``, ``torch.export.save``): the graph
that PyTorch itself runs, so no ONNX op coverage stands in the way -- the fallback where neither
ONNX Runtime nor TensorRT can hold an op, and the GPU core where TensorRT is absent. The batch and
every dimension a step declares as -1 (dynamic H/W, proposals, detections) are dynamic
(``Dim.DYNAMIC``: torch.export infers the ranges the network allows, e.g. H/W >= 17 for an FPN).
Where ``torch.export`` cannot capture a module, a TorchScript trace (``model.ts``) stands in and
the build record says why (``fallback_reason``); tracing keeps shapes only as far as the module
reads them through tensor ops, which the verification on the sample photographs checks.

Verification is the ONNX core's (converters/onnx_export.py): per declared output, |artifact -
eager| within the output's tolerance with the scaled floor, on the sample photographs (and, for a
multi-core family, on the inputs the in-process chain gives each core); where the family's core
selects its slots by a top-k (``core_selects``) the decoded detections are matched order-free.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from detserve.families.base import TensorDecl

EXPORTED = "model.pt2"  # torch.export.save
TRACED = "model.ts"  # torch.jit.save of a trace: only where torch.export fails
ARTIFACTS = (EXPORTED, TRACED)


def dynamic_shapes(inputs: Sequence[TensorDecl], fixed_hw: tuple[int, int] | None = None) -> tuple[dict[int, Any], ...]:
    """Per input: the batch and every declared -1 dim dynamic (``images`` keeps a size the spec fixes)."""
    import torch

    dynamic = torch.export.Dim.DYNAMIC
    out = []
    for t in inputs:
        dims = {0: dynamic}
        for i, d in enumerate(t.dims):
            if d < 0 and not (t.name == "images" and fixed_hw is not None):
                dims[i + 1] = dynamic
        out.append(dims)
    return tuple(out)


def _for_signature(module: Any, shapes: tuple[dict[int, Any], ...]) -> tuple[Any, ...]:
    """``dynamic_shapes`` follows ``forward``'s parameters: a ``forward(self, *inputs)`` (R-CNN's RoI
    cores: FPN maps + boxes) takes every input through its one parameter."""
    import inspect

    params = list(inspect.signature(module.forward).parameters.values())
    if len(params) == 1 and params[0].kind is inspect.Parameter.VAR_POSITIONAL:
        return (shapes,)
    return shapes


def export_artifact(
    module: Any, inputs: Sequence[TensorDecl], sample: Sequence[Any], directory: Path, fixed_hw: tuple[int, int] | None = None
) -> dict[str, Any]:
    """Save ``module`` (eval, no grad) into ``directory`` as ``model.pt2``, or ``model.ts`` where
    torch.export refuses it; the record: file, format, torch version, sha256, why it fell back."""
    import torch

    from detserve.hashing import file_sha256

    module = module.eval()
    directory.mkdir(parents=True, exist_ok=True)
    for name in ARTIFACTS:  # a rebuild of the version must not leave the other kind beside it
        (directory / name).unlink(missing_ok=True)
    reason = None
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer / export deprecation chatter
        try:
            program = torch.export.export(
                module, tuple(sample), dynamic_shapes=_for_signature(module, dynamic_shapes(inputs, fixed_hw)), strict=False
            )
            path, fmt = directory / EXPORTED, "torch.export"
            torch.export.save(program, str(path))
        except Exception as e:  # torch.export's refusals come as many types (Unsupported, UserError, guards)
            reason = f"{type(e).__name__}: " + " ".join(str(e).strip().splitlines()[:2])[:400]
            traced = torch.jit.trace(module, tuple(sample), check_trace=False, strict=False)
            path, fmt = directory / TRACED, "torchscript-trace"
            torch.jit.save(traced, str(path))
    return {"file": path.name, "format": fmt, "torch": torch.__version__, "sha256": file_sha256(path), "fallback_reason": reason}


def verify_artifact(
    eager: Any, artifact: Callable[..., Any], step_inputs: Sequence[TensorDecl], outputs: Sequence[TensorDecl],
    samples: Sequence[Sequence[Any]], label: str,
) -> Any:  # fmt: skip
    """Per declared output: the artifact against eager on every sample (the ONNX check's figures and tolerance)."""
    from converters.onnx_export import CoreVerification, OutputError, compare_outputs, merge_errors
    from detserve.runtime.torchcore import run_core

    errors: dict[str, list[OutputError]] = {t.name: [] for t in outputs}
    for args in samples:
        ref = run_core(eager, args)
        got = run_core(artifact, args)
        for t, g, r in zip(outputs, got, ref, strict=True):
            errors[t.name].append(compare_outputs(t.name, g.detach().cpu().numpy(), r.numpy(), t.atol, t.rtol))
    return CoreVerification(
        backend=label,
        atol=max(t.atol for t in outputs),
        rtol=max(t.rtol for t in outputs),
        input_shapes=[tuple(int(s) for s in a[0].shape) for a in samples],
        outputs=[merge_errors(n, e) for n, e in errors.items()],
    )


def artifact_runner(artifact: Callable[..., Any], names: Sequence[str]) -> Callable[[Any], dict[str, Any]]:
    """A ``verify_detections.RunCore`` over the artifact (images as numpy -> outputs by name)."""
    from detserve.runtime.torchcore import run_core

    def run(images: Any) -> dict[str, Any]:
        outs = run_core(artifact, [images])
        return {n: o.numpy() for n, o in zip(names, outs, strict=True)}

    return run


def backend_label(record: dict[str, Any], role: str = "core") -> str:
    import torch

    return f"torch {torch.__version__} {record['format']} ({role})"
