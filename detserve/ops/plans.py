"""TensorRT engines in a repository checked against the server's TensorRT before Triton loads them.

A plan deserialises only in the TensorRT version that built it. Triton's own refusal is a line deep
in its log ("Serialization assertion ... failed", "version tag does not match") and the model simply
never becomes ready; with NGC's 24.10 image (TensorRT 10.5) and detserve's ``tensorrt`` extra
(TensorRT >= 10.13.2) that is what every engine built outside the image would meet. ``detserve
serve`` (and the container's entrypoint, which runs it) therefore reads each engine's recorded
version -- ``model.plan.json`` (converters/tensorrt_env.py), else the TensorRT of the version's
``build.json`` tools -- and the version of the ``libnvinfer`` the server would load, and refuses to
start on a mismatch with one message naming both. Plain files only: no TensorRT import, no GPU.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from detserve.errors import ServerError

# where Triton's tensorrt backend finds libnvinfer: its backend folder, LD_LIBRARY_PATH, then the
# system's library folders (NGC images install TensorRT's .deb into /usr/lib/x86_64-linux-gnu)
SYSTEM_LIBRARY_DIRS = (Path("/usr/lib/x86_64-linux-gnu"), Path("/usr/lib/aarch64-linux-gnu"), Path("/usr/local/tensorrt/lib"))
_LIBNVINFER = re.compile(r"^libnvinfer\.so\.(\d+(?:\.\d+)*)$")
_TOOLS = ("tensorrt", "tensorrt-cu13", "tensorrt-cu12")


@dataclass(frozen=True)
class PlanRecord:
    """One engine of the repository and the TensorRT version it was built with (None: not recorded)."""

    model: str
    version: str
    plan: Path
    tensorrt_version: str | None


@dataclass(frozen=True)
class ServingTensorRT:
    version: str
    library: Path


def repository_plans(repository: Path) -> list[PlanRecord]:
    """Every ``<model>/<version>/model.plan`` with the TensorRT version its records name."""
    found = []
    for plan in sorted(repository.glob("*/*/model.plan")):
        version_dir = plan.parent
        found.append(PlanRecord(version_dir.parent.name, version_dir.name, plan, _recorded_version(plan)))
    return found


def _read_json(path: Path) -> dict[str, object]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _recorded_version(plan: Path) -> str | None:
    meta = _read_json(plan.with_name(plan.name + ".json"))
    if isinstance(meta.get("tensorrt_version"), str):
        return str(meta["tensorrt_version"])
    tools = _read_json(plan.parent / "build.json").get("tools")
    if isinstance(tools, dict):
        for dist in _TOOLS:
            if isinstance(tools.get(dist), str):
                return str(tools[dist])
    return None


def serving_tensorrt(backend_directory: Path | None, library_dirs: tuple[Path, ...] | None = None) -> ServingTensorRT | None:
    """The ``libnvinfer.so.X.Y.Z`` the server's tensorrt backend would load, the first folder that has one."""
    dirs: list[Path] = []
    if backend_directory is not None:
        dirs.append(backend_directory / "tensorrt")
    if library_dirs is None:
        dirs += [Path(p) for p in os.environ.get("LD_LIBRARY_PATH", "").split(":") if p]
        dirs += SYSTEM_LIBRARY_DIRS
    else:
        dirs += library_dirs
    for folder in dirs:
        try:
            names = [p.name for p in folder.iterdir()]
        except OSError:
            continue
        versions = [(m.group(1), folder / m.group(0)) for m in map(_LIBNVINFER.match, names) if m]
        if versions:  # the most precise name: libnvinfer.so.10.5.0 rather than its libnvinfer.so.10 link
            version, library = max(versions, key=lambda v: v[0].count("."))
            return ServingTensorRT(version, library)
    return None


def same_release(recorded: str, serving: str) -> bool:
    """``10.13.2.6`` (TensorRT's Python version, 4 parts) against ``10.13.2`` (a library file name, 3 parts):
    compared on the parts both have, at least major.minor.patch."""
    a, b = recorded.split("."), serving.split(".")
    n = min(len(a), len(b))
    return n >= 3 and a[:n] == b[:n]


def check_plans(repository: Path, serving: ServingTensorRT | None) -> list[PlanRecord]:
    """Refuse to serve engines that this server's TensorRT cannot deserialise (module docstring)."""
    plans = repository_plans(repository)
    if not plans:
        return plans
    where = ", ".join(f"{p.model} version {p.version}" for p in plans[:3]) + (" ..." if len(plans) > 3 else "")
    if serving is None:
        raise ServerError(
            f"the repository holds TensorRT engines ({where}), but this server has no TensorRT: the embedded "
            "tritonserver (nvidia-pytriton) has no tensorrt backend, and beside another one no libnvinfer.so.* was found "
            "(its backends' tensorrt folder, LD_LIBRARY_PATH, the system's library folders)",
            hint="serve them with the detserve-triton image (NGC Triton, TensorRT inside; docs/deployment.md), or rebuild "
            "with --target python-onnxruntime / onnxruntime for a server without TensorRT such as the embedded one",
        )
    for p in plans:
        if p.tensorrt_version is None:
            raise ServerError(
                f"{p.model} version {p.version}: {p.plan.name} has no record of the TensorRT version that built it "
                f"(no {p.plan.name}.json, no tensorrt in build.json); this server's TensorRT is {serving.version}",
                hint="rebuild the engine with detserve (it records the version next to the plan)",
            )
        if not same_release(p.tensorrt_version, serving.version):
            raise ServerError(
                f"{p.model} version {p.version}: its engine was built with TensorRT {p.tensorrt_version}, but this server's "
                f"TensorRT is {serving.version} ({serving.library}); a plan only deserialises in the TensorRT that built it",
                hint=f"rebuild the engine with TensorRT {serving.version} (inside the serving image: docker build --target "
                "engine-builder, docs/deployment.md), or serve it with an image whose TensorRT is "
                f"{p.tensorrt_version}",
            )
    return plans
