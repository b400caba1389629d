"""Build a TensorRT engine (``model.plan``) from the core ONNX, and check one before it is loaded.

TensorRT is imported lazily (:func:`import_tensorrt`): the rest of detserve, and every CPU test,
runs without it. Everything that does not need a GPU is a plain function here so it can be tested
on a CPU: the optimisation-profile derivation, the ``model.plan.json`` metadata (write, read and
check against the running environment), precision support, and the mapping of ONNX-parser errors
to :class:`~detserve.errors.DetserveError` subclasses.

TensorRT version: the precision options need TensorRT 10.x (``tensorrt-cu13>=10.13.2,<11``).
TensorRT 11 builds every network strongly typed: its ``BuilderFlag`` has no FP16/INT8 and it has
no calibrators, so there fp16/int8 need an ONNX that already carries the types (fp16 weights,
Q/DQ nodes). detserve then builds fp32 and refuses fp16/int8 with :class:`PrecisionUnsupportedError`.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from detserve.errors import DetserveError, SpecError
from detserve.specs import PreprocessSpec

PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "int8")
INPUT_NAME = "images"
TIMING_CACHE_NAME = ".trt_timing_cache"
METADATA_FORMAT = 1
# Smallest padded side of a dynamic-H/W profile: one stride-32 cell. torchvision's resize keeps
# the long side <= max_size, so a very elongated image can have a short side of a few pixels,
# padded to one multiple of size_divisible.
MIN_DYNAMIC_SIDE = 32
INSTALL_HINT = "pip install 'detserve[tensorrt]' (TensorRT 10.x wheels for CUDA 13: tensorrt-cu13>=10.13.2,<11)"


class TensorRTNotInstalledError(DetserveError):
    """The ``tensorrt`` Python package cannot be imported."""


class NoCudaGpuError(DetserveError):
    """No CUDA GPU is visible: engines are built and run on the GPU they target."""


class PrecisionUnsupportedError(DetserveError):
    """The requested precision cannot be built with the installed TensorRT."""


class UnsupportedOpError(DetserveError):
    """The ONNX parser has no importer for an op of the core graph."""


class OnnxParseError(DetserveError):
    """The ONNX parser refused the core graph for another reason than an unsupported op."""


class EngineBuildError(DetserveError):
    """TensorRT parsed the network but could not build an engine."""


class EngineMismatchError(DetserveError):
    """An engine was built for another GPU or TensorRT version (or its metadata is missing)."""


# ---------------------------------------------------------------------------------------------
# Environment
# ---------------------------------------------------------------------------------------------


def import_tensorrt() -> ModuleType:
    """The ``tensorrt`` module, or a clear error naming the install command."""
    try:
        import tensorrt
    except ImportError as e:
        raise TensorRTNotInstalledError(f"TensorRT is not installed ({e})", hint=INSTALL_HINT) from e
    return tensorrt


@dataclass(frozen=True)
class GpuInfo:
    name: str
    compute_capability: str  # "9.0"
    cuda_version: str | None


def require_cuda_gpu(device: int = 0) -> GpuInfo:
    """The GPU engines are built for, read through torch (installed wherever detserve converts)."""
    import torch

    if torch.version.cuda is None:
        raise NoCudaGpuError(
            f"this torch ({torch.__version__}) is a CPU-only build: no CUDA GPU can be used",
            hint="install a CUDA build of torch on a machine with an NVIDIA GPU, or use --target onnxruntime",
        )
    if not torch.cuda.is_available() or torch.cuda.device_count() <= device:
        raise NoCudaGpuError(
            "no CUDA GPU is visible: TensorRT engines are built on, and only run on, the GPU they target",
            hint="run on a machine with an NVIDIA GPU and driver (check nvidia-smi and CUDA_VISIBLE_DEVICES), "
            "or use --target onnxruntime",
        )
    major, minor = torch.cuda.get_device_capability(device)
    return GpuInfo(torch.cuda.get_device_name(device), f"{major}.{minor}", torch.version.cuda)


@dataclass(frozen=True)
class EngineEnvironment:
    """What an engine is tied to: TensorRT's exact version and the GPU (model, compute capability)."""

    tensorrt_version: str
    gpu_name: str
    compute_capability: str


def current_environment() -> EngineEnvironment:
    trt = import_tensorrt()
    gpu = require_cuda_gpu()
    return EngineEnvironment(str(trt.__version__), gpu.name, gpu.compute_capability)


# ---------------------------------------------------------------------------------------------
# Optimisation profile
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# Metadata (model.plan.json)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlanMetadata:
    """How and where an engine was built; checked before the engine is loaded anywhere else."""

    tensorrt_version: str
    gpu_name: str
    compute_capability: str
    precision: str
    profiles: dict[str, dict[str, list[int]]]
    build_seconds: float
    onnx_sha256: str
    variant: str = "core"  # "core" (raw outputs) or "end_to_end_nms" (converters.tensorrt_nms)
    max_batch_size: int = 0
    cuda_version: str | None = None
    timing_cache: str | None = None
    calibration: dict[str, Any] | None = None
    extra: dict[str, Any] | None = None  # variant details (e.g. the NMS settings of an end-to-end engine)
    built_at: str = ""
    format: int = METADATA_FORMAT

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PlanMetadata:
        names = {f.name for f in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING}
        missing = sorted(required - set(data))
        if missing:
            raise EngineMismatchError(f"engine metadata lacks {', '.join(missing)}", hint="rebuild the engine")
        return cls(**{k: v for k, v in data.items() if k in names})

    @property
    def environment(self) -> EngineEnvironment:
        return EngineEnvironment(self.tensorrt_version, self.gpu_name, self.compute_capability)


def metadata_path(plan_path: Path) -> Path:
    return plan_path.with_name(plan_path.name + ".json")


def write_plan_metadata(plan_path: Path, meta: PlanMetadata) -> Path:
    path = metadata_path(plan_path)
    path.write_text(json.dumps(meta.to_dict(), indent=2, sort_keys=True) + "\n")
    return path


def read_plan_metadata(plan_path: Path) -> PlanMetadata:
    path = metadata_path(plan_path)
    if not path.is_file():
        raise EngineMismatchError(
            f"{path.name} is missing: cannot tell which GPU and TensorRT version {plan_path.name} was built for",
            hint="rebuild the engine with detserve (it writes the metadata next to the plan)",
        )
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise EngineMismatchError(f"{path} is not valid JSON: {e}", hint="rebuild the engine") from e
    if not isinstance(data, dict):
        raise EngineMismatchError(f"{path} holds no metadata object", hint="rebuild the engine")
    return PlanMetadata.from_dict(data)


def check_plan_metadata(meta: PlanMetadata, env: EngineEnvironment, same_gpu_model: bool = True) -> None:
    """Refuse an engine built elsewhere, before TensorRT is asked to deserialise it.

    A plan only loads in the TensorRT version that built it, and only runs on GPUs of the compute
    capability it was built for; its tactics were timed on one GPU model, so another model of the
    same capability runs it, possibly slowly (``same_gpu_model=False`` accepts that).
    """
    problems = []
    if meta.tensorrt_version != env.tensorrt_version:
        problems.append(f"TensorRT {meta.tensorrt_version} (this machine has {env.tensorrt_version})")
    if meta.compute_capability != env.compute_capability:
        problems.append(f"compute capability {meta.compute_capability} (this GPU: {env.compute_capability})")
    if same_gpu_model and meta.gpu_name != env.gpu_name:
        problems.append(f"GPU {meta.gpu_name!r} (this GPU: {env.gpu_name!r})")
    if problems:
        raise EngineMismatchError(
            "the engine was built for " + "; ".join(problems),
            hint="rebuild it on this machine (detserve build ... --target tensorrt): "
            "TensorRT engines are specific to the TensorRT version and the GPU they were built on",
        )


def check_plan_compatible(plan_path: Path, same_gpu_model: bool = True) -> PlanMetadata:
    """Read ``model.plan.json`` and compare it with the running TensorRT and GPU."""
    if not plan_path.is_file():
        raise EngineMismatchError(f"engine not found: {plan_path}")
    meta = read_plan_metadata(plan_path)
    check_plan_metadata(meta, current_environment(), same_gpu_model)
    return meta


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
# ONNX parser errors
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParserIssue:
    code: str  # ErrorCode member name, e.g. "UNSUPPORTED_NODE"
    description: str
    node_index: int = -1
    node_name: str = ""
    op: str = ""


def _call(obj: Any, method: str, default: Any) -> Any:
    """Optional ParserError accessors (node_name/node_operator arrived in TensorRT 8.6/10)."""
    fn = getattr(obj, method, None)
    try:
        return fn() if callable(fn) else default
    except Exception:
        return default


def parser_issues(parser: Any) -> list[ParserIssue]:
    """The parser's errors as plain data."""
    issues = []
    for i in range(int(parser.num_errors)):
        err = parser.get_error(i)
        code = str(_call(err, "code", "UNKNOWN")).rsplit(".", 1)[-1]
        issues.append(
            ParserIssue(
                code=code,
                description=str(_call(err, "desc", str(err))),
                node_index=int(_call(err, "node", -1)),
                node_name=str(_call(err, "node_name", "")),
                op=str(_call(err, "node_operator", "")),
            )
        )
    return issues


def onnx_nodes(onnx_path: Path) -> list[tuple[str, str]]:
    """(name, op_type) of every top-level node, to name a node the parser only gives by index."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    return [(n.name, n.op_type) for n in model.graph.node]


def _with_node(issue: ParserIssue, nodes: Sequence[tuple[str, str]]) -> ParserIssue:
    if (issue.node_name and issue.op) or not 0 <= issue.node_index < len(nodes):
        return issue
    name, op = nodes[issue.node_index]
    return dataclasses.replace(issue, node_name=issue.node_name or name, op=issue.op or op)


def _is_unsupported(issue: ParserIssue) -> bool:
    return issue.code.startswith("UNSUPPORTED_NODE") or "No importer registered" in issue.description


def parse_error(
    issues: Sequence[ParserIssue], nodes: Sequence[tuple[str, str]] = (), tensorrt_version: str = ""
) -> DetserveError:
    """The parser's errors as one clear error: which node, which op, what TensorRT said."""
    issues = [_with_node(i, nodes) for i in issues]
    unsupported = [i for i in issues if _is_unsupported(i)]
    shown = unsupported or issues
    parts = [f"node {i.node_name or '#' + str(i.node_index)!r} (op {i.op or '?'}): {i.description}" for i in shown[:5]]
    more = f"; and {len(shown) - 5} more" if len(shown) > 5 else ""
    trt = f"TensorRT {tensorrt_version}" if tensorrt_version else "TensorRT"
    if unsupported:
        ops = sorted({i.op or "?" for i in unsupported})
        return UnsupportedOpError(
            f"{trt} cannot import op {', '.join(ops)}: " + "; ".join(parts) + more,
            hint="serve this detector with --target onnxruntime, or change the export so the op is not needed",
        )
    if not issues:
        return OnnxParseError(f"{trt}'s ONNX parser failed without reporting an error", hint="rerun with a verbose logger")
    return OnnxParseError(f"{trt}'s ONNX parser refused the core: " + "; ".join(parts) + more)


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


def parse_onnx(trt: Any, builder: Any, logger: Any, onnx_path: Path) -> tuple[Any, Any]:
    """The network of the core ONNX; parser errors become UnsupportedOpError / OnnxParseError."""
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10+
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        raise parse_error(parser_issues(parser), onnx_nodes(onnx_path), str(trt.__version__))
    return network, parser


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
