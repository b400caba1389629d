"""detserve's per-user cache: files it generates next to an install it must not write into.

Foundation layer (imports only ``detserve.errors``): the server's helpers (ops) and the YOLO
family (ultralytics' settings) both keep files here, and a family may not import ops.

The python backend directory (symlinks) and the stubs' private prefix used to go into
``sys.prefix``, which fails on a read-only or system-wide install. They go to
``$XDG_CACHE_HOME/detserve`` (default ``~/.cache/detserve``), 0700, one subdirectory per
interpreter prefix: two virtualenvs must not repoint each other's symlinks under a running server.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

from detserve.errors import ServerError


def cache_directory() -> Path:
    """``<cache>/detserve/<hash of sys.prefix>``, created 0700; a clear error if it cannot be written."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "detserve"
    path = base / hashlib.sha256(sys.prefix.encode()).hexdigest()[:12]
    try:
        for d in (base, path):
            d.mkdir(mode=0o700, parents=d is base, exist_ok=True)
        probe = path / ".write-test"
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise ServerError(
            f"detserve's cache directory {path} is not writable: {e}",
            hint="set XDG_CACHE_HOME to a directory you can write (detserve keeps the python backend files there)",
        ) from e
    return path
