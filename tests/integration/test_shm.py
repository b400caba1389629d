"""/dev/shm and python stubs after each way a server goes: nothing of detserve's is left behind.

Each test serves the trained demo detector with two post-processing instances (tune's "postprocess x2
instances"; the built default is one): four python stubs, 16 MB region each. It counts only
what belongs to its own server (its region prefix): other servers run beside these tests.
Measurements go to out/reports/shm.json.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from detserve.ops import stubshm
from detserve.ops.server import ServerOptions, TritonServer, free_port, running_server
from detserve.ops.watchdog import children_of, stub_identity
from loadtest.tune import apply_variant, variant_named
from tests.reports import record


def _record(key: str, value: dict[str, Any]) -> None:
    record("shm.json", key, value)


@pytest.fixture(scope="module")
def demo_repo(demo_copy: Callable[[str], Path]) -> Path:
    repo = demo_copy("shm_repo")
    # a model with two instances of one step: the kill test needs a sibling stub of the killed one
    assert apply_variant(repo, "demo", variant_named("postprocess x2 instances"))
    return repo


def _state(prefix: str) -> dict[str, Any]:
    """This prefix's regions (bytes) and running stubs (zombies do not run)."""
    regions = stubshm.regions(prefix)
    stubs = [pid for pid, state in stubshm.stub_processes(prefix).items() if state not in ("Z", "X")]
    return {"regions": len(regions), "bytes": sum(regions.values()), "stubs": stubs}


def _stubs_of(server: TritonServer) -> dict[int, tuple[str, str]]:
    """pid -> (instance, region) of the server's running model-instance stubs."""
    assert server.process is not None
    out = {}
    for pid, (state, args) in children_of(server.process.pid).items():
        who = stub_identity(args)
        if state != "Z" and who is not None:
            out[pid] = (who[1], args[2])
    return out


def _wait(condition: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.5)


@pytest.fixture()
def short_grace(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(stubshm, "RETIRE_GRACE_S", 8.0)
    yield


def test_graceful_stop_leaves_nothing(demo_repo: Path) -> None:
    with running_server(demo_repo) as server:
        prefix = server.options.shm_prefix
        assert server.shm is not None and server.shm.record_path.is_file()
        running = _state(prefix)
    after = _state(prefix)
    _record("graceful_stop", {"running": running, "after_stop": after})
    assert running["regions"] == 4 and len(running["stubs"]) == 4, running
    assert after == {"regions": 0, "bytes": 0, "stubs": []}
    assert not server.shm.record_path.exists()


def test_stub_kill_and_reload_leave_only_the_live_stubs(demo_repo: Path, short_grace: None) -> None:
    """One post-processing stub killed, its sibling stopped (it cannot exit when Triton unloads the
    old instances): after the reload only the new stubs and their regions remain."""
    with running_server(demo_repo) as server:
        prefix = server.options.shm_prefix
        before = _stubs_of(server)
        post = {inst: pid for pid, (inst, _) in before.items() if inst.startswith("demo_postprocess")}
        os.kill(post["demo_postprocess_0_1"], signal.SIGSTOP)  # a sibling that will not go by itself
        os.kill(post["demo_postprocess_0_0"], signal.SIGKILL)
        _wait(lambda: server.stub_restarts and server.stub_restarts[-1].seconds > 0, 240, "no reload")
        assert server.stub_restarts[-1].error is None, server.stub_restarts

        def settled() -> bool:
            live = _stubs_of(server)
            return set(stubshm.regions(prefix)) == {r for _, r in live.values()} and not set(post.values()) & set(live)

        _wait(settled, 120, "replaced stubs or their regions are still there")
        after_reload = _state(prefix)
        live = _stubs_of(server)
    after_stop = _state(prefix)
    _record("stub_kill_reload", {"after_reload": after_reload, "after_stop": after_stop})
    assert sorted(inst for inst, _ in live.values()) == sorted(inst for inst, _ in before.values())
    assert after_reload["regions"] == 4 and len(after_reload["stubs"]) == 4, after_reload
    assert after_stop == {"regions": 0, "bytes": 0, "stubs": []}


def test_sigkilled_server_is_cleaned_at_the_next_start(demo_repo: Path) -> None:
    """tritonserver SIGKILLed with its stubs stopped (orphans that keep their regions): the next
    start removes exactly those, and leaves a live server's regions alone."""
    first = TritonServer(ServerOptions(demo_repo, grpc_port=free_port(), http_port=free_port(), metrics_port=free_port()))
    first.start()
    try:
        first.wait_ready()
        assert first.process is not None and first.watchdog is not None
        prefix = first.options.shm_prefix
        for pid in _stubs_of(first):
            os.kill(pid, signal.SIGSTOP)
        first.watchdog.stop()
        os.kill(first.process.pid, signal.SIGKILL)
        first.process.wait()
        time.sleep(2)
        orphaned = _state(prefix)
        with running_server(demo_repo) as second:
            cleaned = _state(prefix)
            others = _state(second.options.shm_prefix)
    finally:
        first.stop()  # its gate, if any; tritonserver is already gone
    _record("sigkilled_server", {"orphaned": orphaned, "after_next_start": cleaned, "next_server": others})
    assert orphaned["regions"] == 4 and len(orphaned["stubs"]) == 4, orphaned
    assert cleaned == {"regions": 0, "bytes": 0, "stubs": []}
    assert others["regions"] == 4, others
