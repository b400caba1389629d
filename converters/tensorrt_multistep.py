"""The TensorRT target for the cores of a multi-step family (two-stage R-CNN: ``core``, ``roi_core``, ``mask_core``).

Each core step becomes its own engine (``model.plan`` + ``model.plan.json`` beside its ``model.onnx``),
built with one optimisation profile that covers every input the step can get, and verified against
ONNX Runtime per declared output with Polygraphy on the inputs it really gets: the sample photographs
run through the whole chain in-process (:func:`converters.multistep.run_chain`), plus one batch at the
engine's largest batch size.

Profiles (:func:`step_profiles`), batch 1..max_batch_size (opt: max_batch_size) for every input:

- ``images``: the single-core profile (:func:`converters.tensorrt_profile.derive_profile`);
- a feature map ``[C, -1, -1]``: the image profile's padded H/W over the map's stride (measured on
  the sample photographs: padded size / map size, a power of two), rounded up as a stride-2
  convolution does -- so every image the preprocessing can give has its maps inside the profile;
- a fixed dim (proposals ``[post_nms_top_n, 4]``): that size;
- any other ``-1`` (the final detections the mask core gets, ``[-1, 4]``/``[-1]``): 1 .. ``max_rows``
  (default: the larger of ``detections_per_img`` and ``rpn_post_nms_top_n``), opt ``detections_per_img``.
  A request asking for more final detections than that (``max_det`` above it, with that many
  detections) is refused by the engine for that batch; the limit is in ``model.plan.json``.

RoIAlign: the export emits ONNX ``RoiAlign`` (opset 16+) with ``coordinate_transformation_mode``
``output_half_pixel`` (torchvision's ``aligned=False``, the pooler's), ``sampling_ratio`` 2 and
``mode`` avg; TensorRT 10's ONNX parser imports it as the ``ROIAlign_TRT`` plugin (version 2 since
TensorRT 10.1), so the standard plugins are registered before parsing and before deserialising.
int8 is refused here (calibration would need batches of every input).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from converters.tensorrt_profile import ShapeRange, derive_profile
from detserve.errors import SpecError
from detserve.families.base import StepDecl, TensorDecl
from detserve.specs import PreprocessSpec

IMAGES = "images"


def is_feature_map(t: TensorDecl) -> bool:
    """A [C, H, W] map whose H/W follow the image (FPN levels), as opposed to a count of rows."""
    return len(t.dims) == 3 and t.dims[0] > 0 and t.dims[1:] == (-1, -1)


def measure_strides(images: Any, inputs: Sequence[TensorDecl], args: Sequence[Any]) -> dict[str, int]:
    """Each feature-map input's stride: the padded image side over the map's, as a power of two."""
    h = int(images.shape[2])
    out = {}
    for t, a in zip(inputs, args, strict=True):
        if is_feature_map(t):
            out[t.name] = 2 ** round(math.log2(h / int(a.shape[2])))
    return out


def step_profiles(
    step: StepDecl,
    pre: PreprocessSpec,
    strides: dict[str, int],
    max_batch_size: int,
    max_rows: int,
    opt_rows: int,
) -> dict[str, ShapeRange]:
    """min/opt/max shape of every input of a core step (see the module docstring)."""
    image = derive_profile(pre, max_batch_size)
    if not 1 <= opt_rows <= max_rows:
        raise SpecError(f"rows: opt {opt_rows} must be in [1, {max_rows}]")
    out: dict[str, ShapeRange] = {}
    for t in step.inputs:
        if t.name == IMAGES:
            out[t.name] = image
            continue
        if is_feature_map(t):
            if t.name not in strides:
                raise SpecError(f"{step.role}: no stride measured for feature map {t.name!r}")
            s = strides[t.name]
            shapes = [
                (n, t.dims[0], -(-int(r[2]) // s), -(-int(r[3]) // s))
                for n, r in zip((1, max_batch_size, max_batch_size), (image.min, image.opt, image.max), strict=True)
            ]
            out[t.name] = ShapeRange(*shapes)
            continue
        dims = [(d, d, d) if d > 0 else (1, opt_rows, max_rows) for d in t.dims]
        out[t.name] = ShapeRange(
            (1, *(d[0] for d in dims)), (max_batch_size, *(d[1] for d in dims)), (max_batch_size, *(d[2] for d in dims))
        )
    return out


def check_within(step: StepDecl, profiles: dict[str, ShapeRange], args: Sequence[Any]) -> None:
    """Refuse a profile that does not hold a real input of the step (before the slow engine build)."""
    for t, a in zip(step.inputs, args, strict=True):
        shape, r = tuple(int(x) for x in a.shape), profiles[t.name]
        if len(shape) != len(r.min) or not all(lo <= x <= hi for lo, x, hi in zip(r.min, shape, r.max, strict=True)):
            raise SpecError(f"{step.role}: input {t.name} of shape {shape} lies outside its profile {r.min}..{r.max}")


def default_rows(spec: Any) -> tuple[int, int]:
    """(max, opt) rows of a detections input: see the module docstring."""
    opt = int(spec.detections_per_img)
    return max(opt, int(getattr(spec, "rpn_post_nms_top_n", opt))), opt


def feeds_of(step: StepDecl, samples: Sequence[Sequence[Any]], max_batch_size: int) -> list[dict[str, np.ndarray]]:
    """Polygraphy data-loader items of a step's real inputs, plus one batch of ``max_batch_size``
    (the largest sample's rows cycled) where none is that large: silent engine errors show at large batches."""

    def arr(a: Any) -> np.ndarray:
        return np.ascontiguousarray(a.detach().cpu().numpy() if hasattr(a, "detach") else np.asarray(a))

    feeds = [{t.name: arr(a) for t, a in zip(step.inputs, args, strict=True)} for args in samples]
    feeds = [f for f in feeds if next(iter(f.values())).shape[0] <= max_batch_size]
    if not feeds:
        raise SpecError(f"{step.role}: no sample batch fits max_batch_size {max_batch_size}")
    biggest = max(feeds, key=lambda f: next(iter(f.values())).shape[0])
    n = next(iter(biggest.values())).shape[0]
    if n < max_batch_size:
        idx = np.arange(max_batch_size) % n
        feeds.append({k: np.ascontiguousarray(v[idx]) for k, v in biggest.items()})
    return feeds


def verify_step_engine(
    step: StepDecl,
    onnx_path: Path,
    plan_path: Path,
    feeds: Sequence[dict[str, np.ndarray]],
    precision: str,
    candidate: Any = None,
) -> Any:
    """The step's engine vs ONNX Runtime (CPU) per declared output, at ``precision``'s tolerances.

    ``candidate``: the Polygraphy runner of the engine (default: ``TrtRunner`` on the plan; tests
    pass a stand-in). The engine's metadata is checked against this machine first.
    """
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx

    from converters.tensorrt_env import check_plan_compatible
    from converters.tensorrt_verify import compare_feeds, onnx_output_names, tolerances_for

    meta = check_plan_compatible(plan_path)
    if meta.precision != precision:
        raise SpecError(f"{plan_path.name} is a {meta.precision} engine; it cannot be checked with {precision} tolerances")
    names = onnx_output_names(onnx_path)
    if names != [t.name for t in step.outputs]:
        raise SpecError(f"{onnx_path.name} gives {names}; the family declares {[t.name for t in step.outputs]}")
    if candidate is None:
        candidate = _trt_runner(plan_path)
    reference = OnnxrtRunner(SessionFromOnnx(str(onnx_path), providers=["cpu"]), name="onnxruntime")
    backend = f"tensorrt {meta.tensorrt_version} {precision} on {meta.gpu_name} vs onnxruntime ({step.role})"
    return compare_feeds(reference, candidate, feeds, names, tolerances_for(precision, step.outputs), backend)


def _trt_runner(plan_path: Path) -> Any:
    from converters.tensorrt_env import import_tensorrt
    from converters.tensorrt_verify import ensure_cudart_visible

    trt = import_tensorrt()
    trt.init_libnvinfer_plugins(trt.Logger(trt.Logger.WARNING), "")  # ROIAlign_TRT must be registered to deserialise
    ensure_cudart_visible()
    from polygraphy.backend.common import BytesFromPath
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    return TrtRunner(EngineFromBytes(BytesFromPath(str(plan_path))), name="tensorrt")


def roi_align_nodes(onnx_path: Path) -> list[dict[str, Any]]:
    """The ``RoiAlign`` nodes of a graph and their attributes (recorded beside each engine)."""
    import onnx

    out = []
    for node in onnx.load(str(onnx_path), load_external_data=False).graph.node:
        if node.op_type == "RoiAlign":
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            out.append({k: v.decode() if isinstance(v, bytes) else v for k, v in attrs.items()})
    return out


def build_step_engines(
    steps: Sequence[StepDecl],
    cores: dict[str, dict[str, Any]],
    pre: PreprocessSpec,
    spec: Any,
    max_batch_size: int,
    precision: str,
    timing_cache: Path | None,
    verify: bool,
    candidate: Callable[[Path], Any] | None = None,
) -> dict[str, dict[str, Any]]:
    """``model.plan`` beside every core step's ``model.onnx`` (``cores``: converters.multistep.build_cores's
    result, with each role's sample inputs); per role the engine's metadata and its verification."""
    from converters.onnx_export import require_ok
    from converters.tensorrt_build import BuildOptions, build_engine

    images = cores["core"]["samples"][0][0]
    max_rows, opt_rows = default_rows(spec)
    out: dict[str, dict[str, Any]] = {}
    for step in steps:
        if step.kind != "core":
            continue
        onnx_path, samples = cores[step.role]["onnx"], cores[step.role]["samples"]
        strides = measure_strides(images, step.inputs, samples[0])
        profiles = step_profiles(step, pre, strides, max_batch_size, max_rows, opt_rows)
        for args in samples:  # the inputs it really gets lie inside the profile (a wrong stride would not)
            check_within(step, profiles, args)
        plan = onnx_path.with_name("model.plan")
        extra = {"step": step.role, "roi_align": roi_align_nodes(onnx_path), "strides": strides}
        opts = BuildOptions(precision=precision, timing_cache=timing_cache, profiles=profiles, load_plugins=True, extra=extra)
        meta = build_engine(onnx_path, plan, pre, max_batch_size, opts)
        verification = None
        if verify:
            feeds = feeds_of(step, samples, max_batch_size)
            result = verify_step_engine(step, onnx_path, plan, feeds, precision, candidate(plan) if candidate else None)
            require_ok(result)
            verification = result.to_dict()
        out[step.role] = {"engine": meta.to_dict(), "verification": verification}
    return out
