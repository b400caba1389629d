"""mmcv without its compiled ops: the stand-in ``mmcv._ext`` and mmcv's own soft-NMS built alone.

``mmcv-lite`` (the only mmcv 2.1 that installs in seconds) ships no ``mmcv._ext``, yet
``import mmdet.models`` loads it (``mmcv.ops``). A full mmcv build takes ~9 minutes and needs
patches for torch 2.14. CenterNet and CornerNet call no compiled op in their networks (corner
pooling is pure torch), so :func:`mmcv_ready` registers a stand-in module under that name before
mmcv is first imported: every op name resolves (mmcv asserts they exist at import) to a function
that raises if called -- except ``softnms``/``nms``, which CornerNet's reference post-processing
calls: those are mmcv's own CPU code (``mmcv/ops/csrc/pytorch/cpu/nms.cpp`` of the mmcv 2.1.0 sdist,
sha256 below), compiled by :func:`build_softnms` (scripts/setup.sh, ~30 s) into detserve's cache
directory. The reference side only: the serving runtime imports none of this.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import sys
import tarfile
import types
from pathlib import Path
from typing import Any

from detserve.errors import DetserveError

SDIST = "mmcv-2.1.0.tar.gz"
SDIST_SHA256 = "d387bcab66b467479b6660310e23746cfc79c6e57acf04094680adb499a5cd3f"
_SOURCES = (
    "mmcv/ops/csrc/pytorch/cpu/nms.cpp",  # nms_cpu / softnms_cpu: the code mmdet's reference runs
    "mmcv/ops/csrc/pytorch/nms.cpp",  # the dispatch wrappers (softnms -> softnms_impl -> CPU)
    "mmcv/ops/csrc/common/pytorch_cpp_helper.hpp",
    "mmcv/ops/csrc/common/pytorch_device_registry.hpp",
)
# mmcv's pybind.cpp binds these with keyword names (mmcv/ops/nms.py calls them by keyword)
_BINDING = """#include <torch/extension.h>
#include "pytorch_cpp_helper.hpp"
Tensor nms(Tensor boxes, Tensor scores, float iou_threshold, int offset);
Tensor softnms(Tensor boxes, Tensor scores, Tensor dets, float iou_threshold, float sigma, float min_score, int method,
               int offset);
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("nms", &nms, "nms (CPU)", py::arg("boxes"), py::arg("scores"), py::arg("iou_threshold"), py::arg("offset"));
  m.def("softnms", &softnms, "softnms (CPU)", py::arg("boxes"), py::arg("scores"), py::arg("dets"),
        py::arg("iou_threshold"), py::arg("sigma"), py::arg("min_score"), py::arg("method"), py::arg("offset"));
}
"""
_NAME = "detserve_mmcv_nms"


def extension_dir() -> Path:
    from detserve.cachedir import cache_directory

    return cache_directory() / "mmcv-2.1.0-nms"


def build_softnms(sdist: Path) -> Path:
    """Compile mmcv 2.1.0's CPU ``nms``/``softnms`` from its sdist into the cache directory; the module's path."""
    data = Path(sdist).read_bytes()
    if hashlib.sha256(data).hexdigest() != SDIST_SHA256:
        raise DetserveError(f"{sdist} is not mmcv 2.1.0's sdist (sha256 differs)", hint=f"expected sha256 {SDIST_SHA256}")
    out = extension_dir()
    src = out / "src"
    src.mkdir(parents=True, exist_ok=True)
    with tarfile.open(sdist) as tar:
        for name in _SOURCES:
            member = tar.extractfile(f"mmcv-2.1.0/{name}")
            assert member is not None
            (src / Path(name).name.replace("nms.cpp", "cpu_nms.cpp" if "/cpu/" in name else "nms.cpp")).write_bytes(member.read())
    (src / "binding.cpp").write_text(_BINDING)
    from torch.utils import cpp_extension

    build = out / "build"
    build.mkdir(exist_ok=True)
    module = cpp_extension.load(
        _NAME,
        [str(src / "cpu_nms.cpp"), str(src / "nms.cpp"), str(src / "binding.cpp")],
        extra_cflags=["-O3", "-std=c++20"],  # torch 2.14's headers need C++20
        extra_include_paths=[str(src)],
        build_directory=str(build),
        verbose=False,
    )
    return Path(module.__file__)


def _load_softnms() -> Any:
    """The compiled module, or None when set-up has not built it."""
    path = extension_dir() / "build" / f"{_NAME}.so"
    if not path.is_file():
        return None
    import torch  # noqa: F401 - the extension links against torch's libraries, loaded first

    spec = importlib.util.spec_from_file_location(_NAME, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _missing(name: str) -> Any:
    def op(*args: Any, **kwargs: Any) -> Any:
        raise DetserveError(
            f"mmcv op {name!r} is a compiled op that detserve does not build (mmcv-lite has none)",
            hint="detserve's mmdet family supports detectors whose networks are pure torch (CenterNet, CornerNet); "
            "soft-NMS/NMS are built by scripts/setup.sh",
        )

    return op


def _compiled(name: str) -> Any:
    """``softnms``/``nms``: the compiled module's function, loaded at the first call (mmcv only checks it exists)."""

    def op(*args: Any, **kwargs: Any) -> Any:
        ext = _load_softnms()
        if ext is None:
            raise DetserveError(
                f"mmcv's {name} CPU extension is not built",
                hint="run scripts/setup.sh (it compiles mmcv 2.1.0's nms.cpp into detserve's cache directory)",
            )
        return getattr(ext, name)(*args, **kwargs)

    return op


class _StandIn(types.ModuleType):
    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return _compiled(name) if name in ("nms", "softnms") else _missing(name)


def mmcv_ready() -> None:
    """Register the stand-in ``mmcv._ext`` (unless a real one is importable) before mmcv's ops load."""
    if "mmcv._ext" in sys.modules:
        return
    if importlib.util.find_spec("mmcv") is None:
        raise DetserveError(
            "mmdet is not installed", hint="run scripts/setup.sh (it installs the mmdet extra with the pinned versions)"
        )
    try:
        real = importlib.util.find_spec("mmcv._ext")
    except ImportError:
        real = None
    if real is None:
        stand_in = _StandIn("mmcv._ext")
        # no loader: mmengine's mmcv_full_available() then says False (it asks pkgutil for one)
        stand_in.__spec__ = importlib.machinery.ModuleSpec("mmcv._ext", None)
        sys.modules["mmcv._ext"] = stand_in


def softnms_available() -> bool:
    return (extension_dir() / "build" / f"{_NAME}.so").is_file()


if __name__ == "__main__":  # scripts/setup.sh: python -m detserve.families.mmdet.zoo SDIST
    build_softnms(Path(sys.argv[1]))
