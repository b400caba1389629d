"""The python backend's shared-memory regions and stub processes: each server cleans up its own.

Every python stub talks to tritonserver through one region in /dev/shm named
``<shm-region-prefix-name><uuid>``; the stub's argv names it (argv[2]). Triton's default prefix,
``triton_python_backend_shm_region_``, is the same for every server on the host, so a region says
nothing about who owns it. Checked with the 2.51 binary (16 MB per region with our shm sizes):

- a graceful stop removes the regions, and so does a stub reload once Triton unloads the old
  instances; but when the whole process group dies by SIGKILL (OOM killer, ``stop``'s SIGKILL
  after the exit timeout) every region stays until someone removes it;
- stubs whose tritonserver was SIGKILLed exit by themselves unless they are stopped or stuck:
  then they keep running, orphaned, with their regions mapped.

So each server start gets its own prefix (``detserve-<uid>-<token>-``), recorded in a state file
(tritonserver's pid, its start time in clock ticks, the prefix) in a per-user 0700 directory.
``release`` removes that prefix's regions and kills that prefix's stubs when the server has stopped;
``clean_dead_servers`` (at every start) does the same for each recorded server that is dead (pid
gone, or reused by a process with another start time). Only regions and processes of this user
whose name carries a recorded prefix are touched: never another live server's, never another
user's. ``StubJanitor`` handles stubs replaced by a reload while the server runs.

The regions live in tritonserver's private /dev/shm when it has one (privateshm.py): they are found
through ``/proc/<pid>/root/dev/shm`` of tritonserver or of a stub of the prefix (an orphaned stub
keeps the namespace, and its tmpfs, alive), and on the host's /dev/shm for a server that shares it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

from detserve.errors import ServerError
from detserve.ops.privateshm import SHM_DIR, shm_directory

PREFIX_OPTION = "shm-region-prefix-name"
STUB_BINARY = "triton_python_backend_stub"
RETIRE_GRACE_S = 30.0  # a replaced stub may finish its in-flight requests this long

log = logging.getLogger(__name__)


def new_prefix() -> str:
    return f"detserve-{os.getuid()}-{secrets.token_hex(6)}-"


def prefix_args(prefix: str) -> list[str]:
    return [f"--backend-config=python,{PREFIX_OPTION}={prefix}"]


def state_directory() -> Path:
    """Where server records go: ``<private base>/servers``, 0700 (the base: detserve/ops/rundir.py)."""
    from detserve.ops.rundir import private_base

    path = private_base() / "servers"
    try:
        path.mkdir(mode=0o700, exist_ok=True)
    except OSError as e:
        raise ServerError(f"cannot create detserve's runtime directory {path}: {e}", hint="set XDG_RUNTIME_DIR") from e
    return path


def process_start(pid: int) -> int | None:
    """The start time of ``pid`` in clock ticks since boot (/proc/<pid>/stat field 22); None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat[stat.rindex(")") + 2 :].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _owned_by_me(path: Path) -> bool:
    try:
        return os.lstat(path).st_uid == os.getuid()
    except OSError:
        return False


def stub_processes(prefix: str) -> dict[int, str]:
    """This user's running stub processes whose region starts with ``prefix``: {pid: process state letter}."""
    found: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or not _owned_by_me(Path(f"/proc/{entry}")):
            continue
        try:
            args = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue  # gone meanwhile
        if len(args) > 2 and args[0].endswith(STUB_BINARY.encode()) and args[2].decode(errors="replace").startswith(prefix):
            found[int(entry)] = stat[stat.rindex(")") + 2]
    return found


def _directories(prefix: str, pids: tuple[int, ...]) -> list[Path]:
    """The /dev/shm directories where ``prefix``'s regions may be: the host's, and the private one of
    each given live process and of each stub of ``prefix`` (privateshm.py), each tmpfs once."""
    out: dict[tuple[int, int], Path] = {}
    for pid in (None, *pids, *stub_processes(prefix)):
        directory = shm_directory(pid)
        with contextlib.suppress(OSError):
            st = os.stat(directory)
            out.setdefault((st.st_dev, st.st_ino), directory)
    return list(out.values())


def regions(prefix: str, pids: tuple[int, ...] = ()) -> dict[str, int]:
    """This user's regions whose name starts with ``prefix``: {name: bytes allocated}.

    They are in tritonserver's private /dev/shm (``pids``: tritonserver's pid, when known) or, for a
    server on the shared one, in /dev/shm; a stub of ``prefix`` still running keeps its private
    /dev/shm alive after tritonserver is gone, and is found by its argv.
    """
    out: dict[str, int] = {}
    for directory in _directories(prefix, pids):
        with contextlib.suppress(OSError):
            for path in directory.iterdir():
                if path.name.startswith(prefix):
                    with contextlib.suppress(OSError):
                        st = os.lstat(path)
                        if st.st_uid == os.getuid():
                            out[path.name] = st.st_blocks * 512
    return out


def unlink_region(name: str, directory: Path = SHM_DIR) -> bool:
    """Remove one region of this user (a name only, never a path) from ``directory``; False if it was not there or not ours."""
    path = directory / Path(name).name
    if not _owned_by_me(path):
        return False
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
        return True
    return False


def unlink_regions(prefix: str, pids: tuple[int, ...] = ()) -> int:
    """Remove every region of ``prefix`` wherever it is (``regions``): the bytes they held."""
    freed = 0
    for directory in _directories(prefix, pids):
        with contextlib.suppress(OSError):
            for path in directory.iterdir():
                if path.name.startswith(prefix):
                    with contextlib.suppress(OSError):
                        size = os.lstat(path).st_blocks * 512
                        if unlink_region(path.name, directory):
                            freed += size
    return freed


@dataclass
class ServerShm:
    """The regions and stubs of one tritonserver start, identified by its prefix."""

    prefix: str = field(default_factory=new_prefix)
    pid: int | None = None
    start: int | None = None

    @property
    def record_path(self) -> Path:
        return state_directory() / f"{self.prefix.rstrip('-')}.json"

    def args(self) -> list[str]:
        return prefix_args(self.prefix)

    def record(self, pid: int) -> None:
        """Write the state file of the running server (atomic: a reader sees all of it or nothing)."""
        self.pid, self.start = pid, process_start(pid)
        path = self.record_path
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"pid": self.pid, "start": self.start, "prefix": self.prefix}))
        os.replace(tmp, path)

    def alive(self) -> bool:
        return self.pid is not None and self.start is not None and process_start(self.pid) == self.start

    def release(self) -> tuple[int, int]:
        """Remove this server's regions, kill its remaining stubs, remove its record: (stubs killed, bytes freed).

        Regions first: a private /dev/shm can be reached only through a live process of its namespace
        (the stubs killed next may be the last ones); it dies with them anyway.
        """
        freed = unlink_regions(self.prefix, (self.pid,) if self.alive() and self.pid is not None else ())
        killed = 0
        for pid, state in stub_processes(self.prefix).items():
            if state != "Z":
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                    killed += 1
        with contextlib.suppress(FileNotFoundError):
            self.record_path.unlink()
        if killed or freed:
            log.warning("server %s: killed %d stale python stub(s), freed %d bytes of /dev/shm", self.prefix, killed, freed)
        return killed, freed


def check_extra_args(extra_args: list[str]) -> None:
    if any(PREFIX_OPTION in a for a in extra_args):
        raise ServerError(
            f"--backend-config=python,{PREFIX_OPTION}=... is set by detserve",
            hint="leave it out: each server gets its own prefix so that its /dev/shm regions can be cleaned up",
        )


def recorded_servers() -> list[ServerShm]:
    """The servers recorded in this user's state directory (a broken record counts as a dead server)."""
    out = []
    for path in sorted(state_directory().glob("*.json")):
        try:
            data = json.loads(path.read_text())
            server = ServerShm(str(data["prefix"]), int(data["pid"]), data["start"])
        except (OSError, ValueError, KeyError, TypeError):
            server = ServerShm(path.stem + "-")
        if server.record_path == path:  # the file name is derived from the prefix: nothing else is touched
            out.append(server)
    return out


def clean_dead_servers() -> list[tuple[str, int, int]]:
    """Release every recorded server that is no longer running: [(prefix, stubs killed, bytes freed)]."""
    cleaned = []
    for server in recorded_servers():
        if not server.alive():
            cleaned.append((server.prefix, *server.release()))
    return cleaned


def prepare(extra_args: list[str], prefix: str) -> ServerShm:
    """Before a start: refuse a prefix set by hand, clean up after dead servers, claim ``prefix``."""
    check_extra_args(extra_args)
    clean_dead_servers()
    if any(s.prefix == prefix for s in recorded_servers()):
        raise ServerError(
            "a server started from these ServerOptions is still running", hint="stop it first, or use new ServerOptions"
        )
    return ServerShm(prefix)


def release(server: ServerShm | None) -> None:
    if server is not None:
        server.release()


def stub_region(args: list[str]) -> str | None:
    """The region named in a stub's argv (stub, model.py, region, ...), else None."""
    return args[2] if len(args) > 2 and args[0].endswith(STUB_BINARY) else None


class StubJanitor:
    """After a stub reload: the replaced stubs' regions go, and a replaced stub still running after
    ``grace_s`` is killed (a live stub of the old instances beside its replacements holds ~1 GB)."""

    def __init__(self, grace_s: float | None = None, server_pid: int | None = None) -> None:
        self.grace_s = RETIRE_GRACE_S if grace_s is None else grace_s
        self.server_pid = server_pid  # whose /dev/shm holds the regions (privateshm.py); None: /dev/shm
        self.seen: dict[int, tuple[str, str]] = {}  # stubs seen running: pid -> (model, region)
        self.retired: dict[int, tuple[str, float]] = {}  # replaced stubs: pid -> (region, kill deadline)

    def observe(self, children: dict[int, tuple[str, list[str]]], model_of: dict[int, tuple[str, str]]) -> None:
        """One look at tritonserver's children ({pid: (state, argv)}; ``model_of``: pid -> (model, instance))."""
        for pid, (state, args) in children.items():
            region = stub_region(args)
            if state != "Z" and region and pid in model_of and pid not in self.retired:
                self.seen[pid] = (model_of[pid][0], region)
        self.seen = {p: v for p, v in self.seen.items() if p in children}  # reaped: Triton stopped it itself
        for pid, (region, deadline) in list(self.retired.items()):
            state = children[pid][0] if pid in children else "gone"
            if state in ("Z", "X", "gone"):
                unlink_region(region, shm_directory(self.server_pid))
                del self.retired[pid]
            elif time.monotonic() > deadline:
                log.warning(
                    "replaced python stub %d (%s) still runs %.0f s after its reload: killing it", pid, region, self.grace_s
                )
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    def reloaded(self, model: str) -> None:
        """``model`` was reloaded: every stub of it seen so far belongs to the replaced instances."""
        deadline = time.monotonic() + self.grace_s
        for pid, (name, region) in list(self.seen.items()):
            if name == model:
                self.retired[pid] = (region, deadline)
                del self.seen[pid]
