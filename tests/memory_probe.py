"""What a running tritonserver holds: its own RSS, each python stub's, and its stubs' /dev/shm regions.

Only this server's processes and regions are read (other servers may run beside it): the stubs are
tritonserver's children, and each stub's argv names its shared-memory region (``stub_identity``).
RSS is split as /proc reports it: ``anon`` (malloc'd memory) and ``shmem`` (touched pages of the
mapped /dev/shm region, which is counted once more in ``shm_bytes``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from detserve.ops.privateshm import shm_directory

STUB = "triton_python_backend_stub"
MiB = 2**20


@dataclass(frozen=True)
class ProcessMemory:
    anon: int  # bytes
    shmem: int  # bytes

    @property
    def rss(self) -> int:
        return self.anon + self.shmem


@dataclass(frozen=True)
class ServerMemory:
    server: ProcessMemory
    stubs: dict[str, ProcessMemory] = field(default_factory=dict)  # by "model/instance"
    shm_bytes: int = 0  # allocated pages of this server's /dev/shm regions

    def lines(self) -> list[str]:
        out = [f"tritonserver anon {self.server.anon / MiB:7.1f} MiB"]
        out += [f"{k:40s} anon {v.anon / MiB:7.1f} MiB shmem {v.shmem / MiB:7.1f} MiB" for k, v in sorted(self.stubs.items())]
        return [*out, f"/dev/shm regions {self.shm_bytes / MiB:7.1f} MiB"]


def _status_kib(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if value.strip().endswith("kB"):
            out[key] = int(value.split()[0])
    return out


def process_memory(pid: int) -> ProcessMemory:
    s = _status_kib(pid)
    return ProcessMemory(anon=s.get("RssAnon", 0) * 1024, shmem=s.get("RssShmem", 0) * 1024)


def _stubs(server_pid: int) -> dict[int, list[str]]:
    """This server's live stub processes: pid -> argv."""
    out: dict[int, list[str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            if int(stat[stat.rindex(")") + 2 :].split()[1]) != server_pid:
                continue
            argv = [a.decode() for a in Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0") if a]
        except (OSError, ValueError, IndexError):
            continue
        if argv and argv[0].endswith(STUB) and len(argv) >= 9:
            out[int(entry)] = argv
    return out


def server_memory(server_pid: int) -> ServerMemory:
    stubs: dict[str, ProcessMemory] = {}
    shm = 0
    for pid, argv in _stubs(server_pid).items():
        model = Path(argv[1]).parents[1].name
        stubs[f"{model}/{argv[8]}"] = process_memory(pid)
        region = shm_directory(server_pid) / argv[2].lstrip("/")  # its private /dev/shm (privateshm.py)
        if region.exists():
            shm += region.stat().st_blocks * 512
    return ServerMemory(process_memory(server_pid), stubs, shm)
