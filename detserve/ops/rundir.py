"""The base of detserve's private runtime and state directories, where no other user can pre-create it.

Why: the base used to be ``<tmp>/detserve-<uid>`` when XDG_RUNTIME_DIR was unset, and any
local user can create that name in the shared temporary directory first: root's server then refused
to start. So root uses ``/run/detserve`` (/run is writable by root only); another user
``$XDG_RUNTIME_DIR/detserve`` (its own 0700 directory); only without either the temporary directory,
where a directory someone else made is refused with a clear error before anything is created.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

from detserve.errors import ServerError

ROOT_BASE = Path("/run/detserve")


def _candidates() -> list[Path]:
    out = []
    if os.geteuid() == 0 and ROOT_BASE.parent.is_dir():
        out.append(ROOT_BASE)
    xdg = os.environ.get("XDG_RUNTIME_DIR", "")
    if xdg and os.path.isdir(xdg) and os.access(xdg, os.W_OK | os.X_OK):
        out.append(Path(xdg) / "detserve")
    out.append(Path(tempfile.gettempdir()) / f"detserve-{os.getuid()}")
    return out


def check_private(path: Path) -> None:
    """Refuse ``path`` unless it is a real directory of this user that nobody else can use (0700 or less)."""
    st = os.lstat(path)
    # group search only (0o010) is allowed: the gate's workers traverse to their sockets (gate.private_directory)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o067:
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a directory"
        raise ServerError(
            f"{path} is not a private directory of this user ({kind}, owner uid {st.st_uid}, mode {st.st_mode & 0o777:o});"
            " another user may have created it",
            hint="remove it, or set XDG_RUNTIME_DIR to a directory only you can write",
        )


def private_base() -> Path:
    """This user's private base directory (created 0700 on first use): see the module docstring."""
    candidates = _candidates()
    for i, path in enumerate(candidates):
        try:
            path.mkdir(mode=0o700)  # not exist_ok: a directory that exists is checked, never trusted
        except FileExistsError:
            pass
        except OSError as e:
            if i + 1 < len(candidates):
                continue  # e.g. /run read-only in a container: the next candidate
            raise ServerError(f"cannot create detserve's runtime directory {path}: {e}", hint="set XDG_RUNTIME_DIR") from e
        check_private(path)
        return path
    raise AssertionError("unreachable: the temporary directory is always a candidate")
