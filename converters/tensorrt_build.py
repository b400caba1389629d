"""Build a TensorRT engine (``model.plan``) from the core ONNX.

TensorRT is imported lazily (:func:`~converters.tensorrt_env.import_tensorrt`): the rest of detserve,
and every CPU test, runs without it. The build is split by responsibility:
:mod:`converters.tensorrt_profile` derives the input shapes from the preprocessing,
:mod:`converters.tensorrt_parse` turns the ONNX into a network (and parser errors into clear ones),
:mod:`converters.tensorrt_env` writes and checks ``model.plan.json``; this module holds the precision
options, the timing cache and :func:`build_engine`, which ties them together.

TensorRT version: the precision options need TensorRT 10.x (``tensorrt-cu13>=10.13.2,<11``).
TensorRT 11 builds every network strongly typed: its ``BuilderFlag`` has no FP16/INT8 and it has
no calibrators, so there fp16/int8 need an ONNX that already carries the types (fp16 weights,
Q/DQ nodes). detserve then builds fp32 and refuses fp16/int8 with :class:`PrecisionUnsupportedError`.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from converters.tensorrt_env import GpuInfo, PlanMetadata, import_tensorrt, require_cuda_gpu, write_plan_metadata
from converters.tensorrt_parse import parse_onnx
from converters.tensorrt_profile import INPUT_NAME, ShapeRange, calibration_shape, derive_profile
from detserve.errors import DetserveError, SpecError
from detserve.specs import PreprocessSpec

PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "int8")
TIMING_CACHE_NAME = ".trt_timing_cache"


class PrecisionUnsupportedError(DetserveError):
    """The requested precision cannot be built with the installed TensorRT."""


class EngineBuildError(DetserveError):
    """TensorRT parsed the network but could not build an engine."""


# ---------------------------------------------------------------------------------------------
# Precision
# ---------------------------------------------------------------------------------------------


def validate_precision(precision: str, calibration_images: Path | None) -> None:
    """Argument checks that need no TensorRT (so a CPU machine reports them too)."""
    if precision not in PRECISIONS:
        raise SpecError(f"unknown precision {precision!r}", hint=f"choose one of: {', '.join(PRECISIONS)}")
    if precision == "int8" and calibration_images is None:
        raise SpecError(
            "int8 needs calibration images (--calibration-images DIR)",
            hint="a few hundred representative photos; `detserve samples DIR` writes a handful for a smoke test",
        )
    if precision != "int8" and calibration_images is not None:
        raise SpecError(f"--calibration-images is only used with --precision int8, not {precision}")


def check_precision_supported(trt: Any, precision: str) -> None:
    """fp16/int8 are builder flags (and int8 a calibrator) of TensorRT 10; TensorRT 11 dropped them."""
    flags = trt.BuilderFlag
    needs = {"fp16": ["FP16"], "int8": ["INT8"]}.get(precision, [])
    missing = [f for f in needs if not hasattr(flags, f)]
    if precision == "int8" and not hasattr(trt, "IInt8EntropyCalibrator2"):
        missing.append("IInt8EntropyCalibrator2")
    if missing:
        raise PrecisionUnsupportedError(
            f"TensorRT {trt.__version__} cannot build {precision} from an fp32 ONNX (it has no {', '.join(missing)}: "
            "networks are strongly typed)",
            hint="install TensorRT 10.x (tensorrt-cu13>=10.13.2,<11) for fp16/int8, or build fp32",
        )


def apply_precision(trt: Any, config: Any, precision: str, calibrator: Any = None) -> None:
    """fp32 is strict fp32: TF32 (on by default in TensorRT) is cleared so the 1e-4 check holds."""
    if hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)
    if precision in ("fp16", "int8"):
        # int8 keeps fp16 enabled too: layers TensorRT cannot quantise then run in fp16, not fp32
        config.set_flag(trt.BuilderFlag.FP16)
    if precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)
        config.int8_calibrator = calibrator


# ---------------------------------------------------------------------------------------------
# Timing cache
# ---------------------------------------------------------------------------------------------


def default_timing_cache(repository: Path) -> Path:
    """Next to the repository's models: one cache shared by every build into it."""
    return repository / TIMING_CACHE_NAME


def attach_timing_cache(trt: Any, config: Any, path: Path | None) -> bool:
    """Load the cache file into the builder config; False when it was absent or made for another GPU/TensorRT."""
    if path is None:
        return False
    data = path.read_bytes() if path.is_file() else b""
    cache = config.create_timing_cache(data)
    if config.set_timing_cache(cache, False):
        return bool(data)
    # a cache from another device/version: start a fresh one (it is overwritten after the build)
    config.set_timing_cache(config.create_timing_cache(b""), False)
    return False


def save_timing_cache(config: Any, path: Path | None) -> None:
    if path is None:
        return
    data = bytes(memoryview(config.get_timing_cache().serialize()))
    _atomic_write(path, data)


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


# ---------------------------------------------------------------------------------------------
# Build
# ---------------------------------------------------------------------------------------------

# (trt, network) -> objects to keep alive until the build ends (TensorRT does not copy weights
# given as numpy arrays before build_serialized_network)
NetworkHook = Callable[[Any, Any], Any]


@dataclass
class BuildOptions:
    precision: str = "fp32"
    timing_cache: Path | None = None
    calibration_images: Path | None = None
    calibration_cache: Path | None = None  # default: calibration.cache next to the plan
    workspace_bytes: int | None = None
    opt_batch: int | None = None
    variant: str = "core"
    extend_network: NetworkHook | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # recorded as the metadata's ``extra``
    # a core with several inputs (the steps of a multi-step family, converters.tensorrt_multistep):
    # one shape range per input name instead of the ``images`` profile derived from the preprocessing
    profiles: dict[str, ShapeRange] | None = None
    # register TensorRT's standard plugins before parsing (the ONNX parser imports RoiAlign as ROIAlign_TRT)
    load_plugins: bool = False


def _add_profile(builder: Any, config: Any, shapes: ShapeRange | dict[str, ShapeRange], calibration: bool = False) -> Any:
    profile = builder.create_optimization_profile()
    for name, shape in (shapes if isinstance(shapes, dict) else {INPUT_NAME: shapes}).items():
        profile.set_shape(name, shape.min, shape.opt, shape.max)
    if calibration:
        config.set_calibration_profile(profile)
    else:
        config.add_optimization_profile(profile)
    return profile


def _calibrator(
    trt: Any, onnx_path: Path, plan_path: Path, pre: PreprocessSpec, shapes: ShapeRange, opts: BuildOptions
) -> tuple[Any, dict[str, Any]]:
    from converters.tensorrt_calibration import CalibrationCache, load_calibration_batches, make_calibrator
    from detserve.hashing import file_sha256

    assert opts.calibration_images is not None  # validate_precision
    shape = calibration_shape(shapes)
    files, batches = load_calibration_batches(opts.calibration_images, pre, shape)
    cache_path = opts.calibration_cache or plan_path.with_name("calibration.cache")
    cache = CalibrationCache.for_inputs(cache_path, file_sha256(onnx_path), files, shape)
    info = {
        "images": len(files),
        "folder": str(opts.calibration_images),
        "batch_shape": list(shape),
        "batches": len(batches),
        "cache": str(cache_path),
        "cache_reused": cache.read() is not None,
        "algorithm": "IInt8EntropyCalibrator2",
    }
    return make_calibrator(trt, batches, cache), info


def build_engine(
    onnx_path: Path, plan_path: Path, pre: PreprocessSpec, max_batch_size: int, opts: BuildOptions | None = None
) -> PlanMetadata:
    """Build ``plan_path`` (+ ``model.plan.json``) from the core ONNX on this machine's GPU."""
    opts = opts or BuildOptions()
    validate_precision(opts.precision, opts.calibration_images)
    if opts.profiles is not None and opts.precision == "int8":
        raise SpecError(
            "int8 needs calibration batches of every input; a core with several inputs has none",
            hint="build these cores with --precision fp32 or fp16",
        )
    trt = import_tensorrt()
    gpu = require_cuda_gpu()
    check_precision_supported(trt, opts.precision)
    shapes = derive_profile(pre, max_batch_size, opts.opt_batch)
    profiles = {INPUT_NAME: shapes} if opts.profiles is None else dict(opts.profiles)
    logger = trt.Logger(trt.Logger.WARNING)
    if opts.load_plugins:
        trt.init_libnvinfer_plugins(logger, "")
    builder = trt.Builder(logger)
    network, _parser = parse_onnx(trt, builder, logger, onnx_path)
    keepalive = opts.extend_network(trt, network) if opts.extend_network else None
    config = builder.create_builder_config()
    if opts.workspace_bytes:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, opts.workspace_bytes)
    _add_profile(builder, config, profiles)
    calibrator, calibration = None, None
    if opts.precision == "int8":
        calibrator, calibration = _calibrator(trt, onnx_path, plan_path, pre, shapes, opts)
        cal_shape = calibration_shape(shapes)
        _add_profile(builder, config, ShapeRange(cal_shape, cal_shape, cal_shape), calibration=True)
    apply_precision(trt, config, opts.precision, calibrator)
    cache_hit = attach_timing_cache(trt, config, opts.timing_cache)
    started = time.monotonic()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.monotonic() - started
    del keepalive
    if serialized is None:
        raise EngineBuildError(
            f"TensorRT {trt.__version__} could not build a {opts.precision} engine from {onnx_path.name}",
            hint="the TensorRT log above says why (out of memory: lower --max-batch-size)",
        )
    save_timing_cache(config, opts.timing_cache)
    _atomic_write(plan_path, bytes(memoryview(serialized)))
    meta = _metadata(trt, gpu, onnx_path, profiles, seconds, opts, max_batch_size, calibration, cache_hit)
    write_plan_metadata(plan_path, meta)
    return meta


def _metadata(
    trt: Any,
    gpu: GpuInfo,
    onnx_path: Path,
    profiles: dict[str, ShapeRange],
    seconds: float,
    opts: BuildOptions,
    max_batch_size: int,
    calibration: dict[str, Any] | None,
    timing_cache_hit: bool,
) -> PlanMetadata:
    from detserve.hashing import file_sha256

    return PlanMetadata(
        tensorrt_version=str(trt.__version__),
        gpu_name=gpu.name,
        compute_capability=gpu.compute_capability,
        precision=opts.precision,
        profiles={name: shape.to_dict() for name, shape in profiles.items()},
        build_seconds=round(seconds, 2),
        onnx_sha256=file_sha256(onnx_path),
        variant=opts.variant,
        max_batch_size=max_batch_size,
        cuda_version=gpu.cuda_version,
        timing_cache=(f"{opts.timing_cache} ({'reused' if timing_cache_hit else 'new'})" if opts.timing_cache else None),
        calibration=calibration,
        extra=dict(opts.extra) or None,
        built_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    )
