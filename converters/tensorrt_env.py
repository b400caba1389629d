"""What a TensorRT engine is tied to, and the check before one is loaded.

A plan only loads in the TensorRT version that built it and only runs on GPUs of the compute
capability it was built for, so every engine has a ``model.plan.json`` beside it (written by
:mod:`converters.tensorrt_build`) naming both; :func:`check_plan_compatible` compares it with this
machine before TensorRT is asked to deserialise the plan. Also the lazy TensorRT import and the GPU
probe the build and the runners share. Nothing here needs TensorRT to be tested: the metadata is
plain JSON, and the environment is read only when asked.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from detserve.errors import DetserveError

METADATA_FORMAT = 1
INSTALL_HINT = "pip install 'detserve[tensorrt]' (TensorRT 10.x wheels for CUDA 13: tensorrt-cu13>=10.13.2,<11)"


class TensorRTNotInstalledError(DetserveError):
    """The ``tensorrt`` Python package cannot be imported."""


class NoCudaGpuError(DetserveError):
    """No CUDA GPU is visible: engines are built and run on the GPU they target."""


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
