"""The Triton server that ships inside the ``nvidia-pytriton`` wheel: its binary, backends and environment.

Two things make that binary serve our python-backend models (both checked on this machine kind):
- a backend directory holding the python backend *and* the stub built for the running Python;
- the stub runs Python in isolated mode (PYTHONPATH is ignored) and finds its prefix through the
  ``python3`` on PATH: with this interpreter's ``bin`` first on PATH it uses this virtualenv's
  site-packages (torch, onnxruntime, detserve). Without that it picks the base interpreter's
  numpy, and BYTES inputs arrive corrupted. The interpreter's own libpython goes first on
  LD_LIBRARY_PATH so the stub loads the same libpython as the interpreter.

Because the stub's Python is isolated, ``PYTHONDONTWRITEBYTECODE`` does not reach it either: it
wrote ``__pycache__`` into every python model's version directory, and in explicit model control
Triton then saw the model as modified and reloaded it (with its dependants) on the next load. The
``python3`` first on the stubs' PATH is therefore a private prefix (``stub_prefix``) whose
``site-packages`` holds one ``.pth`` file: it turns bytecode writing off and adds this
interpreter's site-packages.
"""

from __future__ import annotations

import os
import sys
import sysconfig
from pathlib import Path

from detserve.cachedir import cache_directory
from detserve.errors import ServerError

# never handed to tritonserver, nginx or the stubs
SECRET_VARIABLES = ("DETSERVE_ADMIN_KEY", "DETSERVE_ADMIN_KEY_FILE")


def pytriton_root() -> Path:
    try:
        import pytriton
    except ImportError as e:
        raise ServerError("nvidia-pytriton is not installed", hint="pip install 'detserve[server]'") from e
    root = Path(pytriton.__file__).parent / "tritonserver"
    if not (root / "bin" / "tritonserver").is_file():
        raise ServerError(f"no tritonserver binary under {root}")
    return root


def backend_directory() -> Path:
    """A backend directory with the python backend and the stub for this Python (symlinks, cached)."""
    root = pytriton_root()
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / py / "triton_python_backend_stub"
    if not stub.is_file():
        raise ServerError(f"nvidia-pytriton ships no python backend stub for Python {py}")
    target = cache_directory() / f"backends-py{py}" / "python"
    target.mkdir(parents=True, exist_ok=True)
    sources = {
        "libtriton_python.so": root / "backends" / "python" / "libtriton_python.so",
        "triton_python_backend_utils.py": root / "backends" / "python" / "triton_python_backend_utils.py",
        "triton_python_backend_stub": stub,
    }
    for name, src in sources.items():
        link = target / name
        if not link.exists() or link.resolve() != src.resolve():
            link.unlink(missing_ok=True)
            link.symlink_to(src)
    return target.parent


def stub_prefix() -> Path:
    """A private Python prefix for the stubs: this interpreter, bytecode writing off (module docstring)."""
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    root = cache_directory() / f"stub-prefix-py{py}"
    (root / "bin").mkdir(parents=True, exist_ok=True)
    link = root / "bin" / "python3"
    if not link.is_symlink() or os.readlink(link) != sys.executable:
        link.unlink(missing_ok=True)
        link.symlink_to(sys.executable)
    home = sysconfig.get_config_var("BINDIR") or str(Path(sys.executable).parent)
    _write_if_changed(root / "pyvenv.cfg", f"home = {home}\ninclude-system-site-packages = false\n")
    site_dir = root / "lib" / f"python{py}" / "site-packages"
    site_dir.mkdir(parents=True, exist_ok=True)
    import site

    dirs = [d for d in site.getsitepackages() if Path(d).is_dir()]
    # one line: site.py executes .pth lines that start with "import"; addsitedir also runs the
    # .pth files found there (this virtualenv's editable installs)
    # (no comprehension: site.py exec()s the line, a comprehension's scope would not see ``site``)
    pth = f"import sys, site; sys.dont_write_bytecode = True; list(map(site.addsitedir, {dirs!r}))\n"
    _write_if_changed(site_dir / "detserve-stub.pth", pth)
    return root


def _write_if_changed(path: Path, text: str) -> None:
    if not path.is_file() or path.read_text() != text:
        path.write_text(text)


def server_environment(embedded: bool = True) -> dict[str, str]:
    """tritonserver's environment; ``embedded``: the nvidia-pytriton binary and its stub set-up (module docstring).

    Either binary gets the malloc settings and loses the admin-key variables (the stubs run user
    model code: the key stays in this process).
    """
    env = dict(os.environ)
    if embedded:
        paths = [str(stub_prefix() / "bin"), str(Path(sys.executable).parent), env.get("PATH", "")]
        env["PATH"] = os.pathsep.join(paths)
        libs = [sysconfig.get_config_var("LIBDIR") or "", str(pytriton_root().parent.parent / "nvidia_pytriton.libs")]
        env["LD_LIBRARY_PATH"] = os.pathsep.join([p for p in libs if p] + [env.get("LD_LIBRARY_PATH", "")])
        env.pop("PYTHONPATH", None)
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # for any non-isolated Python Triton starts; the stubs: stub_prefix
    # glibc malloc in tritonserver (and the stubs, which inherit this): a large request arrives as
    # many gRPC slices below the dynamic mmap threshold, and their freed chunks stayed in the heap
    # (tritonserver +250 MiB after 4 concurrent 100 MB requests, released only by malloc_trim).
    # A fixed 64 KiB threshold maps those slices and returns them on free; the small trim threshold
    # gives back the heap's free top. An operator's own values win.
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    env.setdefault("MALLOC_TRIM_THRESHOLD_", "65536")
    # torch's OpenMP workers in the python stubs busy-wait after every parallel region by default;
    # the stubs run side by side on few cores, so that spinning took the CPU the other stages needed
    # (pre-processing with its 2 torch threads: 45 CPU ms per image instead of 6 on 2 cores,
    # docs/performance.md). Passive waiting sleeps at once. An operator's own value wins.
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # onnxruntime's telemetry (device id + event database in $HOME, events queued for Microsoft's
    # collector) off in the core stubs too; detserve/__init__.py says why. An operator's value wins.
    env.setdefault("ORT_DISABLE_TELEMETRY", "1")
    for var in SECRET_VARIABLES:
        env.pop(var, None)
    return env
