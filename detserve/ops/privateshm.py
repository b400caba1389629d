"""A private /dev/shm for tritonserver and its python stubs: clients' data stays the server user's.

Every python stub exchanges its requests' tensors (clients' images) with tritonserver through a
16 MiB region in /dev/shm. Boost creates those regions 0644 whatever the umask, and each stub's
argv (readable by every local user) names its region: on a shared /dev/shm any local user could
read any client's image, even after its request finished.

So tritonserver starts in a mount namespace of its own with a fresh tmpfs on /dev/shm (0700,
owned by the server's user); its stubs inherit it. ``wrap`` turns tritonserver's command into
``unshare ... -- python -I -c HELPER SIZE tritonserver ...``: unshare and the helper each exec the
next program in the same process, so the pid detserve records is tritonserver's (no ``--fork``).

- as root: ``unshare --mount --propagation private`` (nothing mounted inside reaches the host);
- as another user: an unprivileged user + mount namespace (``--user --map-current-user``, the same
  uid inside), where the kernel allows one; ``--keep-caps`` lets the helper mount, and it clears
  the ambient capabilities before it execs tritonserver, so tritonserver and the stubs run without
  any capability, as before;
- where neither works (a container without CAP_SYS_ADMIN and without user namespaces), the server
  runs on the shared /dev/shm and a warning names the exposure; in a container /dev/shm is the
  pod's own, so only the pod's processes share it.

``DETSERVE_DEV_SHM`` chooses: ``private`` (the default: private where possible, else the warning),
``require`` (refuse to start without it) or ``host`` (the shared /dev/shm, e.g. for sidecar clients
that register system shared memory by name; warned). The tmpfs dies with the last process of the
namespace: a SIGKILLed server leaves nothing. Its size limit is the host /dev/shm's (pages are only
used when written; the python backend grows regions to fit large inputs).

Only the server's user (and root) can look inside, through ``/proc/<tritonserver pid>/root/dev/shm``
(``shm_directory``): the janitor, ``regions()`` and clients that register system shared memory
(``ServerRegion``) use that path.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import logging
import mmap
import os
import shutil
import subprocess
import sys
from pathlib import Path

from detserve.errors import ServerError

SHM_DIR = Path("/dev/shm")
ENV_VAR = "DETSERVE_DEV_SHM"

log = logging.getLogger(__name__)

# Runs as ``python -I -c HELPER SIZE COMMAND...`` inside the new namespace: mount, drop ambient caps, exec.
HELPER = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
MS_NOSUID, MS_NODEV = 2, 4
options = ("mode=0700,size=" + sys.argv[1]).encode()
if libc.mount(b"detserve-shm", b"/dev/shm", b"tmpfs", MS_NOSUID | MS_NODEV, options) != 0:
    sys.stderr.write("detserve: cannot mount a private /dev/shm: " + os.strerror(ctypes.get_errno()) + "\\n")
    sys.exit(126)
PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 47, 4
libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
os.execvp(sys.argv[2], sys.argv[2:])
"""


class Isolation(enum.Enum):
    """How tritonserver's /dev/shm is kept from other users."""

    ROOT_NAMESPACE = "mount namespace (root)"
    USER_NAMESPACE = "user + mount namespace"
    SHARED = "shared /dev/shm"


def _unshare_flags(isolation: Isolation) -> list[str]:
    if isolation is Isolation.ROOT_NAMESPACE:
        return ["--mount", "--propagation", "private"]
    return ["--user", "--map-current-user", "--keep-caps", "--mount", "--propagation", "private"]


def _prefix(isolation: Isolation, size: str) -> list[str]:
    unshare = shutil.which("unshare") or "unshare"
    return [unshare, *_unshare_flags(isolation), "--", sys.executable, "-I", "-c", HELPER, size]


def tmpfs_size() -> str:
    """The host /dev/shm's size limit, in bytes (the operator's or the system's choice), else half the RAM."""
    try:
        st = os.statvfs(SHM_DIR)
        return str(st.f_blocks * st.f_frsize) if st.f_blocks else "50%"
    except OSError:
        return "50%"


@functools.cache
def available() -> Isolation:
    """The isolation this process can give tritonserver: tried once (a throw-away namespace running ``true``)."""
    candidates = [Isolation.ROOT_NAMESPACE] if os.geteuid() == 0 else [Isolation.USER_NAMESPACE]
    for isolation in candidates:
        if shutil.which("unshare") is None:
            break
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            probe = subprocess.run([*_prefix(isolation, "1m"), "true"], capture_output=True, timeout=30)
            if probe.returncode == 0:
                return isolation
            log.debug("no %s: %s", isolation.value, probe.stderr.decode(errors="replace").strip())
    return Isolation.SHARED


def chosen() -> Isolation:
    """The isolation to use now: ``DETSERVE_DEV_SHM`` (module docstring) and what the kernel allows."""
    wanted = os.environ.get(ENV_VAR, "private")
    if wanted not in ("private", "require", "host"):
        raise ServerError(f"{ENV_VAR}={wanted!r} is not a choice", hint="private (default), require or host")
    if wanted == "host":
        log.warning(
            "%s=host: tritonserver shares /dev/shm; every local user can read the clients' images in its python stubs' regions",
            ENV_VAR,
        )
        return Isolation.SHARED
    isolation = available()
    if isolation is Isolation.SHARED:
        if wanted == "require":
            raise ServerError(
                "cannot give tritonserver a private /dev/shm (no mount namespace for this user)",
                hint=f"run as root, allow unprivileged user namespaces, or set {ENV_VAR}=private to accept the exposure",
            )
        log.warning(
            "cannot give tritonserver a private /dev/shm (no mount or user namespace allowed here): every local "
            "user can read the clients' images in its python stubs' regions (/dev/shm/detserve-*)"
        )
    return isolation


def wrap(command: list[str]) -> list[str]:
    """tritonserver's ``command`` started in a private /dev/shm where possible (module docstring); same pid."""
    isolation = chosen()
    if isolation is Isolation.SHARED:
        return list(command)
    return [*_prefix(isolation, tmpfs_size()), *command]


def shm_directory(pid: int | None) -> Path:
    """Where process ``pid`` sees /dev/shm, as a path this process can open.

    Its private tmpfs through ``/proc/<pid>/root`` when it lives in another mount namespace (only its
    user and root may follow that link); /dev/shm when it shares ours, is gone or cannot be read.
    """
    if pid is None:
        return SHM_DIR
    try:
        if os.stat(f"/proc/{pid}/ns/mnt").st_ino == os.stat("/proc/self/ns/mnt").st_ino:
            return SHM_DIR
    except OSError:
        return SHM_DIR
    return Path(f"/proc/{pid}/root/dev/shm")


class ServerRegion:
    """A client's system shared-memory region that tritonserver can open by name: a file in the
    server's /dev/shm (``shm_directory(server pid)``), created 0600 by the server's user or root.

    What ``tritonclient.utils.shared_memory.create_shared_memory_region`` does with ``shm_open``, but
    in the server's /dev/shm, which a private namespace hides from ``shm_open`` in the client.
    Register it with ``register_system_shared_memory(name, key, size)``.
    """

    def __init__(self, directory: Path, name: str, size: int) -> None:
        if "/" in name or not name:
            raise ServerError(f"invalid shared-memory region name {name!r}")
        self.path, self.name, self.key, self.size = directory / name, name, f"/{name}", size
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.ftruncate(fd, size)
            self._map = mmap.mmap(fd, size)
        except BaseException:
            os.close(fd)
            self.path.unlink(missing_ok=True)
            raise
        os.close(fd)

    def write(self, data: bytes, offset: int = 0) -> None:
        if offset + len(data) > self.size:
            raise ServerError(f"{len(data)} bytes at offset {offset} do not fit the {self.size}-byte region {self.name}")
        self._map[offset : offset + len(data)] = data

    def close(self) -> None:
        with contextlib.suppress(ValueError):
            self._map.close()
        self.path.unlink(missing_ok=True)
