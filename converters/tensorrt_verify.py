"""Verify a TensorRT engine against ONNX Runtime with Polygraphy, per output, per precision.

Polygraphy runs both (``OnnxrtRunner`` on the CPU as the reference, ``TrtRunner`` on the GPU) on
the same batches through ``Comparator.run``; those outputs are judged the way the ONNX Runtime check
judges its own (a fixed absolute tolerance refused real conversions whose detections all matched), by
the family's kind of core (``Family.core_selects``):

- fixed slots (every output position a fixed anchor / grid cell): per output, elementwise,
  ``|trt - ort| <= atol * max(1, max|ort|) + rtol * |ort|`` (``onnx_export.compare_outputs``: the
  floor scales with the output's own magnitude). Polygraphy's own verdict (fixed atol, an element
  fails when beyond *both* tolerances) is recorded in ``backend``, as information.
- slots chosen by a top-k (RT-DETR, D-FINE: near-ties at the cut reorder the queries between
  runtimes): both sides decoded by the family and matched order-free under ``DETECTION_RULES``
  (converters/verify_detections.py); the per-tensor figures are kept beside it as information.

Tolerances (atol, rtol), per precision:
- fp32: 1e-4, 1e-4 for every output — the ONNX Runtime check's; TF32 is off in fp32 engines.
- fp16: 1e-2 relative; absolute 2e-2 for logits (|x| up to ~10) and ctrness, 1e-2 for box
  regressions (|x| ~0.1-1). fp16 keeps ~3 decimal digits per op; a backbone accumulates ~10x that.
- int8: 0.1 relative; absolute 0.5 for logits/ctrness and 0.25 for box regressions. An elementwise
  bound only catches a broken engine here (wrong scales, garbage); whether int8 is accurate
  enough is a detection-level question (mAP on your data), which this check does not answer.

Engines of deformable-attention detectors (RT-DETR, D-FINE: ``GridSample`` in the graph) have been
reported to build, run and return wrong results silently on some TensorRT versions, batch sizes and
typing modes (NVIDIA/TensorRT #4813). The check therefore also runs a batch at the engine's largest
batch size (where those reports fail), and a refusal of such an engine names the option that
avoids the op (:func:`require_engine_ok`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from converters.onnx_export import CoreVerification, OutputError, compare_outputs, merge_errors
from converters.tensorrt_env import check_plan_compatible, import_tensorrt
from converters.tensorrt_profile import INPUT_NAME
from converters.verify_detections import FP32_RULE, DetectionRule, DetectionVerification, match_outputs, require_detections_ok
from detserve.errors import SpecError
from detserve.families.base import TensorDecl

# How an engine of a core that selects its slots is judged, per precision: ONNX Runtime's detections and the
# engine's, matched order-free (converters/verify_detections.py). fp32 (TF32 off) is float32 noise: the ONNX
# Runtime check's rule. fp16 rounds every tensor to ~3 significant digits: its declared logit tolerance (2e-2 to
# 5e-2) moves a sigmoid score by at most a quarter of that, ~1e-2; a box edge moves by ~1e-3 of the image, which
# on a 32-pixel box at 640 is 2 % of its size, so IoU >= 0.9 (compare's "moved" line), not 0.99. int8 catches a
# broken engine only (whether int8 is accurate enough is an mAP question): its logit tolerance of 0.5 gives
# |dscore| <= 0.1 at the steepest point of the sigmoid, boxes IoU >= 0.75. A wrong engine (wrong weights, a
# miscompiled op) moves scores by tenths and boxes by their size, and fails all three.
DETECTION_RULES: dict[str, DetectionRule] = {
    "fp32": FP32_RULE,
    "fp16": DetectionRule(iou_min=0.9, score_tol=1e-2),
    "int8": DetectionRule(iou_min=0.75, score_tol=0.1),
}


def tolerances_for(precision: str, outputs: Sequence[TensorDecl]) -> dict[str, tuple[float, float]]:
    """(atol, rtol) per output at ``precision``, as the family declared them."""
    return {o.name: o.tolerance(precision) for o in outputs}


def cudart_dirs() -> list[Path]:
    """Folders of pip-installed CUDA runtimes (``nvidia/cuda_runtime/lib``, or ``nvidia/cu13/lib``
    as the CUDA 13 wheels that torch pulls lay it out)."""
    import site
    import sys

    roots = [Path(p) for p in [*site.getsitepackages(), *sys.path] if p and Path(p).is_dir()]
    found = []
    for root in dict.fromkeys(roots):
        for lib in (root / "nvidia").glob("*/lib"):
            if any(lib.glob("libcudart.so*")):
                found.append(lib)
    return found


def ensure_cudart_visible() -> None:
    """Polygraphy finds libcudart on LD_LIBRARY_PATH, system paths or ``nvidia/cuda_runtime``; torch's
    CUDA 13 wheels put it in ``nvidia/cu13/lib``, so add such folders to the search list (read by
    Polygraphy's Python code, so setting it in-process is enough)."""
    current = [p for p in os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p]
    extra = [str(d) for d in cudart_dirs() if str(d) not in current]
    if extra:
        os.environ["LD_LIBRARY_PATH"] = os.pathsep.join([*current, *extra])


def _feeds(batches: Sequence[Any]) -> list[dict[str, np.ndarray]]:
    """Polygraphy data-loader items from torch tensors or arrays (CPU, float32, contiguous)."""
    out = []
    for b in batches:
        arr = b.detach().cpu().numpy() if hasattr(b, "detach") else np.asarray(b)
        out.append({INPUT_NAME: np.ascontiguousarray(arr, dtype=np.float32)})
    return out


def compare_runners(
    reference: Any,
    candidate: Any,
    batches: Sequence[Any],
    output_names: Sequence[str],
    tolerances: Mapping[str, tuple[float, float]],
    backend: str,
) -> CoreVerification:
    """Run two Polygraphy runners on the same batches; per-output errors of ``candidate`` vs ``reference``."""
    return compare_feeds(reference, candidate, _feeds(batches), output_names, tolerances, backend)


def compare_feeds(
    reference: Any,
    candidate: Any,
    feeds: Sequence[Mapping[str, np.ndarray]],
    output_names: Sequence[str],
    tolerances: Mapping[str, tuple[float, float]],
    backend: str,
) -> CoreVerification:
    """:func:`compare_runners` on data-loader items of any inputs (name -> array; a multi-input core's
    steps); ``input_shapes`` records each item's first input."""
    polygraphy_ok, pairs = run_pair(reference, candidate, feeds, output_names, tolerances)
    return tensor_errors(pairs, feeds, output_names, tolerances, backend, polygraphy_ok)


Outputs = Mapping[str, Any]  # one runner's outputs for one data-loader item, by name


def run_pair(
    reference: Any,
    candidate: Any,
    feeds: Sequence[Mapping[str, np.ndarray]],
    output_names: Sequence[str],
    tolerances: Mapping[str, tuple[float, float]],
) -> tuple[bool, list[tuple[Outputs, Outputs]]]:
    """Both runners on every feed (Polygraphy's Comparator): Polygraphy's own elementwise verdict, and per
    feed (reference outputs, candidate outputs) -- judged per tensor and, where the core selects, by detections."""
    from polygraphy.comparator import Comparator, SimpleCompareFunc

    results = Comparator.run([reference, candidate], data_loader=[dict(f) for f in feeds])
    compare = SimpleCompareFunc(
        atol={n: tolerances[n][0] for n in output_names},
        rtol={n: tolerances[n][1] for n in output_names},
        check_error_stat="elemwise",
    )
    polygraphy_ok = bool(Comparator.compare_accuracy(results, compare_func=compare))
    return polygraphy_ok, list(zip(results[reference.name], results[candidate.name], strict=True))


def tensor_errors(
    pairs: Sequence[tuple[Outputs, Outputs]],
    feeds: Sequence[Mapping[str, np.ndarray]],
    output_names: Sequence[str],
    tolerances: Mapping[str, tuple[float, float]],
    backend: str,
    polygraphy_ok: bool,
) -> CoreVerification:
    """Per output, the worst error over ``pairs`` under the ONNX Runtime check's rule (onnx_export.compare_outputs:
    ``atol * max(1, max|ref|) + rtol * |ref|``, the floor scaled by the output's own magnitude)."""
    errors: dict[str, list[OutputError]] = {n: [] for n in output_names}
    for ref, got in pairs:
        for n in output_names:
            atol, rtol = tolerances[n]
            errors[n].append(compare_outputs(n, np.asarray(got[n]), np.asarray(ref[n]), atol, rtol))
    return CoreVerification(
        backend=f"{backend} (polygraphy: {'passed' if polygraphy_ok else 'FAILED'})",
        atol=max(a for a, _ in tolerances.values()),  # the loosest; each output has its own
        rtol=max(r for _, r in tolerances.values()),
        input_shapes=[tuple(int(s) for s in next(iter(f.values())).shape) for f in feeds],
        outputs=[merge_errors(n, errs) for n, errs in errors.items()],
    )


def grid_sample_nodes(onnx_path: Path) -> int:
    """How many ``GridSample`` nodes the graph holds (deformable attention decomposed by the exporter)."""
    import onnx

    return sum(1 for n in onnx.load(str(onnx_path), load_external_data=False).graph.node if n.op_type == "GridSample")


GRID_SAMPLE_HINT = (
    "this graph has {n} GridSample node(s): TensorRT has been reported to miscompile deformable attention "
    "silently (NVIDIA/TensorRT #4813). Avoid the op: RT-DETRv2 with decoder_method='discrete' (config.json, or "
    "the rtdetr_v2_tiny configuration) exports no GridSample; or serve this model with --target onnxruntime / "
    "python-onnxruntime. Never deploy it with --no-verify."
)


def require_engine_ok(result: CoreVerification, onnx_path: Path) -> None:
    """Refuse an engine that disagrees with ONNX Runtime; for a GridSample graph, say which option avoids the op."""
    from detserve.errors import VerificationError

    if result.ok:
        return
    n = grid_sample_nodes(onnx_path)
    if not n:
        from converters.onnx_export import require_ok

        require_ok(result)
    bad = "; ".join(f"{o.name} max abs {o.max_abs:.3e} (rel {o.max_rel:.3e})" for o in result.outputs if not o.ok)
    raise VerificationError(f"TensorRT engine disagrees with ONNX Runtime: {bad}", hint=GRID_SAMPLE_HINT.format(n=n))


def with_full_batch(batches: Sequence[Any], max_batch_size: int) -> list[Any]:
    """``batches`` plus one of the engine's largest batch size (the given images repeated), if none is that large.

    Silent wrong results of some engines show only at larger batches (NVIDIA/TensorRT #4813, RT-DETR
    at batch > 1); a check at batch 1-2 alone would pass them.
    """
    items = list(batches)
    if not items or max_batch_size <= max(int(b.shape[0]) for b in items):
        return items
    same = [b for b in items if tuple(b.shape[1:]) == tuple(items[0].shape[1:])]
    rows = [b[i : i + 1] for b in same for i in range(int(b.shape[0]))]
    picked = [rows[i % len(rows)] for i in range(max_batch_size)]
    if hasattr(picked[0], "detach"):  # torch tensors
        import torch

        return [*items, torch.cat(picked)]
    return [*items, np.concatenate([np.asarray(r) for r in picked])]


def onnx_output_names(onnx_path: Path) -> list[str]:
    import onnx

    return [o.name for o in onnx.load(str(onnx_path), load_external_data=False).graph.output]


@dataclass(frozen=True)
class EnginePair:
    """What both checks of one engine share: the two runners, the outputs and their tolerances."""

    reference: Any  # Polygraphy runner: ONNX Runtime on the CPU
    candidate: Any  # Polygraphy runner: the engine (TrtRunner; tests pass a stand-in)
    names: list[str]
    tolerances: dict[str, tuple[float, float]]
    backend: str
    max_batch_size: int


def trt_runner(plan_path: Path) -> Any:
    import_tensorrt()
    ensure_cudart_visible()
    from polygraphy.backend.common import BytesFromPath
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    return TrtRunner(EngineFromBytes(BytesFromPath(str(plan_path))), name="tensorrt")


def engine_pair(
    onnx_path: Path, plan_path: Path, precision: str, outputs: Sequence[TensorDecl], candidate: Any = None
) -> EnginePair:
    """The engine's metadata is checked against this machine first, so an engine built elsewhere
    fails with :class:`~converters.tensorrt_env.EngineMismatchError`, not inside TensorRT."""
    meta = check_plan_compatible(plan_path)
    if meta.precision != precision:
        raise SpecError(f"{plan_path.name} is a {meta.precision} engine; it cannot be checked with {precision} tolerances")
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx

    names = onnx_output_names(onnx_path)
    declared = [o for o in outputs if o.name in names]
    if len(declared) != len(names):
        raise SpecError(f"{onnx_path.name} gives {names}; the family declares {[o.name for o in outputs]}")
    return EnginePair(
        reference=OnnxrtRunner(SessionFromOnnx(str(onnx_path), providers=["cpu"]), name="onnxruntime"),
        candidate=trt_runner(plan_path) if candidate is None else candidate,
        names=names,
        tolerances=tolerances_for(precision, declared),
        backend=f"tensorrt {meta.tensorrt_version} {precision} on {meta.gpu_name} vs onnxruntime",
        max_batch_size=meta.max_batch_size,
    )


def verify_tensorrt(
    onnx_path: Path,
    plan_path: Path,
    batches: Sequence[Any],
    precision: str,
    outputs: Sequence[TensorDecl],
    candidate: Any = None,
) -> CoreVerification:
    """TensorRT engine vs ONNX Runtime (CPU) on ``batches`` ([N, 3, H, W] each), per tensor with ``precision``'s
    tolerances (the raw-tensor figures; :func:`verify_engine` is the build's check)."""
    pair = engine_pair(onnx_path, plan_path, precision, outputs, candidate)
    if pair.max_batch_size:
        batches = with_full_batch(batches, pair.max_batch_size)
    return compare_runners(pair.reference, pair.candidate, batches, pair.names, pair.tolerances, pair.backend)


def engine_groups(items: Sequence[Any], max_batch_size: int) -> list[list[Any]]:
    """The batches an engine is checked on: every sample alone, two of one size together, and that size's
    samples cycled to the engine's largest batch (where #4813's wrong results show, :func:`with_full_batch`)."""
    groups = [[it] for it in items]
    same = [it for it in items if it.padded_hw == items[0].padded_hw] if items else []
    for n in sorted({min(2, max_batch_size), max_batch_size}):
        if n > 1 and same:
            groups.append([same[i % len(same)] for i in range(n)])
    return groups


def engine_detections(
    family: Any,
    spec: Any,
    groups: Sequence[Sequence[Any]],
    pairs: Sequence[tuple[Outputs, Outputs]],
    backend: str,
    precision: str,
) -> DetectionVerification:
    """Every image of every batch decoded from ONNX Runtime's and the engine's outputs, matched under ``precision``'s rule."""
    cases = [
        (item, {n: np.asarray(v)[i : i + 1] for n, v in ref.items()}, {n: np.asarray(v)[i : i + 1] for n, v in got.items()})
        for group, (ref, got) in zip(groups, pairs, strict=True)
        for i, item in enumerate(group)
    ]
    return match_outputs(family, spec, cases, backend, DETECTION_RULES[precision], against="ONNX Runtime")


def verify_engine(
    family: Any,
    spec: Any,
    onnx_path: Path,
    plan_path: Path,
    items: Sequence[Any],
    precision: str,
    outputs: Sequence[TensorDecl],
    candidate: Any = None,
) -> dict[str, Any]:
    """The build's check of a single-core engine on the preprocessed samples (``runtime.preprocess.Preprocessed``):
    per tensor where the core's slots are fixed; by decoded detections where it selects them
    (``family.core_selects``), the per-tensor figures kept as information. Raises when it fails; returns the record."""
    pair = engine_pair(onnx_path, plan_path, precision, outputs, candidate)
    groups = engine_groups(items, pair.max_batch_size or 1)
    feeds = [{INPUT_NAME: np.stack([np.asarray(it.tensor, dtype=np.float32) for it in g])} for g in groups]
    polygraphy_ok, pairs = run_pair(pair.reference, pair.candidate, feeds, pair.names, pair.tolerances)
    tensors = tensor_errors(pairs, feeds, pair.names, pair.tolerances, pair.backend, polygraphy_ok)
    if not family.core_selects(spec):
        require_engine_ok(tensors, onnx_path)
        return tensors.to_dict()
    detections = engine_detections(family, spec, groups, pairs, pair.backend, precision)
    n = grid_sample_nodes(onnx_path)
    require_detections_ok(detections, "TensorRT engine", GRID_SAMPLE_HINT.format(n=n) if n else "")
    return {**tensors.to_dict(), "ok": detections.ok, "tensors_ok": tensors.ok, "judged_by": "detections",
            "detections": detections.to_dict()}  # fmt: skip
