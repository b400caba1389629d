"""Build the cores of a multi-core family (``Family.steps``: two-stage R-CNN) into a repository.

The generic preprocessing step, then the family's declared steps in order: each ``core`` step is
its own exported ONNX (several inputs: FPN maps + boxes), verified against PyTorch on the inputs
it really gets -- the sample photographs run through the whole chain in-process
(:func:`run_chain`) -- and each ``python`` step runs the family's torch code in the python step
model (detserve.runtime.backend.step_model). The ensemble wires them by tensor name.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from detserve.errors import SpecError
from detserve.families.base import Family, StepDecl, TensorDecl
from detserve.specs import PreprocessSpec, RequestControls

OPSET = 17


def run_chain(
    family: Family, model: Any, spec: Any, images: Any, info: Any, controls: Sequence[RequestControls]
) -> tuple[dict[str, Any], dict[str, list[Any]]]:
    """Every tensor of the served chain, computed in-process (cores as torch modules), and each core's inputs."""
    import torch

    from detserve.runtime.outputs import stack_rows

    tensors: dict[str, Any] = {"images": images, "image_info": info}
    core_inputs: dict[str, list[Any]] = {}
    for step in family.steps(spec):
        args = [tensors[t.name] for t in step.inputs]
        if step.kind == "core":
            core_inputs[step.role] = args
            with torch.no_grad():
                out = family.step_module(model, spec, step.role)(*args)
            out = (out,) if isinstance(out, torch.Tensor) else tuple(out)
            tensors.update({t.name: o for t, o in zip(step.outputs, out, strict=True)})
        else:
            raw = {t.name: a for t, a in zip(step.inputs, args, strict=True) if t.name != "image_info"}
            rows = family.run_step(spec, step.role, raw, info, controls)
            tensors.update({t.name: torch.from_numpy(stack_rows([r[t.name] for r in rows])) for t in step.outputs})
    return tensors, core_inputs


def verification_inputs(pre: PreprocessSpec) -> list[tuple[Any, Any]]:
    """(images, image_info) batches of the sample photographs: three alone, and two of one size together."""
    import torch

    from detserve.runtime.preprocess import preprocess
    from detserve.runtime.samples import sample_images

    items = [preprocess(img, pre) for img in sample_images()]
    batches = [[p] for p in items[:3]]
    same = [p for p in items if p.padded_hw == items[0].padded_hw]
    batches.append((same * 2)[:2])
    return [(torch.stack([p.tensor for p in b]), torch.from_numpy(np.stack([p.info() for p in b]))) for b in batches]


def export_step(module: Any, step: StepDecl, sample: Sequence[Any], path: Path) -> Path:
    """Export one core step: declared input/output names, every -1 dim (and the batch) dynamic; fold constants; check."""
    import torch

    def axes(t: TensorDecl) -> dict[int, str]:
        return {0: "batch", **{i + 1: f"{t.name}_{i + 1}" for i, d in enumerate(t.dims) if d < 0}}

    dynamic = {t.name: axes(t) for t in (*step.inputs, *step.outputs)}
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's tracer warnings
        torch.onnx.export(
            module.eval(),
            tuple(sample),
            str(path),
            input_names=[t.name for t in step.inputs],
            output_names=[t.name for t in step.outputs],
            dynamic_axes=dynamic,
            opset_version=OPSET,
            dynamo=False,
        )
    from converters.onnx_export import fold_and_check

    return fold_and_check(path)


def verify_step(module: Any, step: StepDecl, onnx_path: Path, samples: Sequence[Sequence[Any]]) -> Any:
    """ONNX Runtime vs PyTorch on the inputs the step really gets, per declared output and tolerance."""
    import onnxruntime as ort
    import torch

    from converters.onnx_export import CoreVerification, OutputError, compare_outputs, merge_errors

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    errors: dict[str, list[OutputError]] = {t.name: [] for t in step.outputs}
    for args in samples:
        with torch.no_grad():
            out = module(*args)
        ref = [t.numpy() for t in ((out,) if isinstance(out, torch.Tensor) else out)]
        feed = {t.name: np.ascontiguousarray(a.numpy()) for t, a in zip(step.inputs, args, strict=True)}
        got = session.run([t.name for t in step.outputs], feed)
        for t, g, r in zip(step.outputs, got, ref, strict=True):
            errors[t.name].append(compare_outputs(t.name, g, r, t.atol, t.rtol))
    merged = [merge_errors(n, e) for n, e in errors.items()]
    return CoreVerification(
        backend=f"onnxruntime {ort.__version__} ({step.role})",
        atol=max(t.atol for t in step.outputs),
        rtol=max(t.rtol for t in step.outputs),
        input_shapes=[tuple(int(s) for s in a[0].shape) for a in samples],
        outputs=merged,
    )


def chain_samples(
    family: Family, model: Any, spec: Any, pre: PreprocessSpec, steps: Sequence[StepDecl]
) -> dict[str, list[list[Any]]]:
    """Per core role, the inputs it gets when the sample photographs run through the chain in-process."""
    defaults = RequestControls(spec.score_thresh, spec.nms_thresh, spec.detections_per_img)
    samples: dict[str, list[list[Any]]] = {}
    for images, info in verification_inputs(pre):
        _, inputs = run_chain(family, model, spec, images, info, [defaults] * int(images.shape[0]))
        for role, args in inputs.items():
            samples.setdefault(role, []).append(args)
    for step in steps:
        if step.kind == "core" and step.role not in samples:
            raise SpecError(f"core step {step.role!r} got no inputs from the sample photographs")
    return samples


def trace_sample(samples: Sequence[Sequence[Any]]) -> Sequence[Any]:
    """The sample an export traces: a batch of two where there is one (a batch of one can specialise the batch)."""
    return next((s for s in samples if s[0].shape[0] == 2), samples[0])


def build_torch_cores(
    family: Family, model: Any, spec: Any, pre: PreprocessSpec, steps: Sequence[StepDecl], version_dir: Any, verify: bool
) -> dict[str, Any]:
    """The python-torch target: every core step saved as a torch artifact (converters/torch_export.py) in
    ``version_dir(role)``, verified against eager on the inputs the chain gives it; per role the
    artifact's record and the verification."""
    from converters.onnx_export import require_ok
    from converters.torch_export import backend_label, export_artifact, verify_artifact
    from detserve.runtime.torchcore import load_core

    samples = chain_samples(family, model, spec, pre, steps)
    out: dict[str, Any] = {}
    for step in steps:
        if step.kind != "core":
            continue
        module = family.step_module(model, spec, step.role)
        record = export_artifact(
            module, step.inputs, trace_sample(samples[step.role]), version_dir(step.role), pre.fixed_input_hw
        )
        result = None
        if verify:
            artifact = load_core(version_dir(step.role) / record["file"])
            result = verify_artifact(
                module, artifact, step.inputs, step.outputs, samples[step.role], backend_label(record, step.role)
            )
            require_ok(result)
            result = result.to_dict()
        out[step.role] = {"artifact": record, "verification": result}
    return out


def build_cores(
    family: Family, model: Any, spec: Any, pre: PreprocessSpec, steps: Sequence[StepDecl], version_dir: Any, verify: bool
) -> dict[str, Any]:
    """Export (and verify) every core step into ``version_dir(role)/model.onnx``; per role the ONNX path,
    the verification and the sample inputs (the chain's on the sample photographs)."""
    from converters.onnx_export import require_ok

    samples = chain_samples(family, model, spec, pre, steps)
    checks: dict[str, Any] = {}
    for step in steps:
        if step.kind != "core":
            continue
        module = family.step_module(model, spec, step.role)
        trace = trace_sample(samples[step.role])
        path = export_step(module, step, trace, version_dir(step.role) / "model.onnx")
        result = None
        if verify:
            result = verify_step(module, step, path, samples[step.role])
            require_ok(result)
            result = result.to_dict()
        # the inputs it really got: the TensorRT target builds its profiles from, and verifies on, them
        checks[step.role] = {"onnx": path, "verification": result, "samples": samples[step.role]}
    return checks
