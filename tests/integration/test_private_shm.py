"""Clients' images in the python stubs' shared memory are readable by the server's user only (issue 20, finding 2).

The python backend's regions are created 0644 and each stub's argv names its region: on the host's
/dev/shm the user ``nobody`` recovered another client's JPEG byte for byte after its request had
finished. tritonserver now runs with a private /dev/shm (detserve/ops/privateshm.py). Each test
marks its JPEG with a unique token (a JPEG comment segment, ignored by the decoder) and searches for
it as ``nobody`` everywhere a region could be: every file of /dev/shm, every region named in a
stub's argv, directly and through ``/proc/<pid>/root``. Figures go to out/reports/private_shm.json.
"""

from __future__ import annotations

import os
import secrets
import signal
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from clients.grpc_client import DetectorClient
from detserve.app.demo import DEMO_NAME
from detserve.ops import privateshm, stubshm
from detserve.ops.server import ServerOptions, TritonServer, free_port, running_server
from tests.reports import record
from tests.unprivileged import run_as_nobody

ADMIN_KEY = "k" + secrets.token_hex(20)

# As nobody: read every region it can reach and look for the marker.
HUNT = r"""
import os
marker = ARGS["marker"].encode()
paths = {os.path.join("/dev/shm", n) for n in os.listdir("/dev/shm")}
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        argv = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
    except OSError:
        continue
    if argv[0].endswith(b"triton_python_backend_stub") and len(argv) > 2:
        name = argv[2].decode().lstrip("/")
        paths |= {f"/dev/shm/{name}", f"/proc/{pid}/root/dev/shm/{name}", f"/proc/{ARGS['server']}/root/dev/shm/{name}"}
try:
    os.listdir(f"/proc/{ARGS['server']}/root/dev/shm")
    listing = "listed"
except OSError as e:
    listing = type(e).__name__
readable, found = [], []
for path in sorted(paths):
    try:
        with open(path, "rb") as f:
            data = f.read(64 << 20)
    except OSError:
        continue
    if ARGS["prefix"] in path:
        readable.append(path)
    if marker in data:
        found.append(path)
print(json.dumps({"paths": len(paths), "readable": readable, "found": found, "listing": listing}))
"""


def _record(key: str, value: dict[str, Any]) -> None:
    record("private_shm.json", key, value)


def marked_jpeg(jpeg: bytes, marker: bytes) -> bytes:
    """``jpeg`` with a comment segment (FF FE) holding ``marker`` right after its start-of-image marker."""
    assert jpeg[:2] == b"\xff\xd8"
    return jpeg[:2] + b"\xff\xfe" + struct.pack(">H", len(marker) + 2) + marker + jpeg[2:]


@pytest.fixture(scope="module")
def demo_repo(demo_copy: Callable[[str], Path]) -> Path:
    return demo_copy("private_shm_repo")


@pytest.fixture(scope="module")
def server(demo_repo: Path) -> Iterator[TritonServer]:
    with running_server(demo_repo, admin_key=ADMIN_KEY) as srv:
        yield srv


def _pid(server: TritonServer) -> int:
    assert server.process is not None
    return server.process.pid


def _found_as_root(server: TritonServer, marker: bytes) -> list[str]:
    """The server's regions holding ``marker``, read as root through its private /dev/shm."""
    directory = privateshm.shm_directory(_pid(server))
    return [n for n in stubshm.regions(server.options.shm_prefix, (_pid(server),)) if marker in (directory / n).read_bytes()]


def test_other_users_cannot_read_the_clients_images(server: TritonServer, samples: dict[str, bytes]) -> None:
    marker = f"victim-{secrets.token_hex(16)}".encode()
    image = marked_jpeg(samples["astronaut.jpg"], marker)
    with DetectorClient(server.options.grpc_url, DEMO_NAME) as client:
        for _ in range(3):
            client.detect(image)
    pid, prefix = _pid(server), server.options.shm_prefix
    assert Path(f"/proc/{pid}/exe").resolve().name == "tritonserver"  # the recorded pid is tritonserver itself
    assert privateshm.shm_directory(pid) != privateshm.SHM_DIR, "tritonserver shares this process's /dev/shm"
    in_private = stubshm.regions(prefix, (pid,))
    on_host = [n for n in os.listdir(privateshm.SHM_DIR) if n.startswith(prefix)]
    as_root = _found_as_root(server, marker)  # the bytes are there: the hunt below would see them if it could
    hunt = run_as_nobody(HUNT, marker=marker.decode(), server=pid, prefix=prefix)
    _record("nobody_hunt", {"regions_in_private_shm": len(in_private), "on_host": on_host, "found_as_root": as_root, **hunt})
    assert len(in_private) == 3 and on_host == [], (in_private, on_host)  # pre, core, post: one stub each
    assert as_root, "the marker is in none of the server's regions: the hunt proves nothing"
    assert hunt["listing"] == "PermissionError", hunt
    assert hunt["readable"] == [] and hunt["found"] == [], hunt


def test_system_shared_memory_registered_in_the_servers_dev_shm(server: TritonServer, samples: dict[str, bytes]) -> None:
    """A client of the server's user registers a region created in the server's /dev/shm (the bench's 4K row)."""
    from loadtest.shm import SharedMemoryImageSender

    image = samples["coffee.jpg"]
    directory = privateshm.shm_directory(_pid(server))
    with DetectorClient(server.options.grpc_url, DEMO_NAME) as plain:
        expected = plain.detect(image)
    with SharedMemoryImageSender(server.options.grpc_url, DEMO_NAME, len(image), ADMIN_KEY, directory) as sender:
        region = sender.region.path
        assert oct(region.stat().st_mode & 0o777) == oct(0o600)
        got = [sender.detect(image) for _ in range(2)]
    assert not region.exists()
    for result in got:
        assert len(result) == len(expected)
        assert result.boxes == pytest.approx(expected.boxes, abs=1e-3)


@pytest.mark.slow  # its own server; the fast path: test_shm's SIGKILLed server (regions found and gone)
def test_sigkilled_server_leaves_no_dev_shm(demo_repo: Path) -> None:
    """The whole group SIGKILLed (no stop, no release): the private tmpfs and its regions die with it."""
    opts = ServerOptions(demo_repo, grpc_port=free_port(), http_port=free_port(), metrics_port=free_port())
    server = TritonServer(opts)
    server.start()
    try:
        server.wait_ready()
        pid = _pid(server)
        directory = privateshm.shm_directory(pid)
        tmpfs = os.stat(directory).st_dev
        held = sum(stubshm.regions(opts.shm_prefix, (pid,)).values())
        os.killpg(pid, signal.SIGKILL)
        server.process.wait()  # type: ignore[union-attr]
        deadline = time.monotonic() + 30
        while _mounted_anywhere(tmpfs) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = _mounted_anywhere(tmpfs)
        regions_left = stubshm.regions(opts.shm_prefix)
    finally:
        server.stop()
    _record("sigkilled", {"regions_bytes_before": held, "tmpfs_still_mounted_by": left, "regions_after": regions_left})
    assert held >= 3 * 16 * 2**20, held  # three stubs (pre, core, post), 16 MiB each
    assert left == [] and regions_left == {}, (left, regions_left)


def _mounted_anywhere(device: int) -> list[int]:
    """Pids of the processes whose mount table still holds the tmpfs ``device`` (st_dev)."""
    wanted = f"{os.major(device)}:{os.minor(device)}"
    pids = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            mounts = Path(f"/proc/{entry}/mountinfo").read_text()
        except OSError:
            continue
        if any(line.split()[2] == wanted for line in mounts.splitlines()):
            pids.append(int(entry))
    return pids


@pytest.mark.slow  # the exposure itself: what DETSERVE_DEV_SHM=host (or a host without namespaces) leaves open
def test_shared_dev_shm_exposes_the_clients_images(
    demo_repo: Path, samples: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(privateshm.ENV_VAR, "host")
    marker = f"victim-{secrets.token_hex(16)}".encode()
    with running_server(demo_repo) as shared:
        with DetectorClient(shared.options.grpc_url, DEMO_NAME) as client:
            for _ in range(3):
                client.detect(marked_jpeg(samples["astronaut.jpg"], marker))
        hunt = run_as_nobody(HUNT, marker=marker.decode(), server=_pid(shared), prefix=shared.options.shm_prefix)
    _record("nobody_hunt_shared_dev_shm", hunt)
    assert hunt["found"], hunt
