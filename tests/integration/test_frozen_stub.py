"""A frozen python stub makes readiness false and is replaced (issue 20, finding 6).

Before: SIGSTOP of the core stub made every request fail "Stub process ... is not healthy" while
``/v2/health/ready`` stayed 200 (the watchdog only noticed dead stubs). Now the watchdog sees the
stopped stub in two checks, readiness names the model, the stub is killed and its model reloaded,
and readiness returns. A steady client without retries measures the failures; figures go to
out/reports/frozen_stub.json.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from clients.grpc_client import DetectorClient
from detserve.app.demo import DEMO_NAME
from detserve.ops import watchdog
from detserve.ops.server import running_server
from detserve.ops.watchdog import children_of, stub_identity
from tests.reports import record


@dataclass(frozen=True)
class Probe:
    at: float  # monotonic seconds
    ok: bool
    text: str


class Sampler:
    """Readiness through the gate and one client without retries, each in a thread, until stopped."""

    def __init__(self, http_port: int, grpc_url: str, image: bytes) -> None:
        self.ready: list[Probe] = []
        self.calls: list[Probe] = []
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._readiness, args=(http_port,), daemon=True),
            threading.Thread(target=self._client, args=(grpc_url, image), daemon=True),
        ]

    def _readiness(self, port: int) -> None:
        while not self._stop.wait(0.2):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=5) as r:
                    self.ready.append(Probe(time.monotonic(), r.status == 200, ""))
            except urllib.error.HTTPError as e:
                self.ready.append(Probe(time.monotonic(), False, e.read().decode(errors="replace")))
            except OSError as e:
                self.ready.append(Probe(time.monotonic(), False, str(e)))

    def _client(self, url: str, image: bytes) -> None:
        with DetectorClient(url, DEMO_NAME, timeout_s=30.0, retries=0) as client:
            while not self._stop.wait(0.1):
                try:
                    client.detect(image)
                    self.calls.append(Probe(time.monotonic(), True, ""))
                except Exception as e:
                    self.calls.append(Probe(time.monotonic(), False, str(e)[:200]))

    def wait(self, condition: object, timeout_s: float, what: str) -> float:
        deadline = time.monotonic() + timeout_s
        while not condition():  # type: ignore[operator]
            assert time.monotonic() < deadline, what
            time.sleep(0.1)
        return time.monotonic()

    def __enter__(self) -> Sampler:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=60)


@pytest.fixture(scope="module")
def demo_repo(demo_copy: Callable[[str], Path]) -> Path:
    return demo_copy("frozen_repo")


def _freeze_core(demo_repo: Path, image: bytes, unready_within_s: float) -> dict[str, Any]:
    """SIGSTOP the core stub under a steady client; wait for readiness to go false naming it, return and serve."""
    with running_server(demo_repo) as server:
        assert server.process is not None
        core = [p for p, (s, a) in children_of(server.process.pid).items() if (stub_identity(a) or ("",))[0] == "demo_core"]
        assert len(core) == 1, core
        with Sampler(server.options.http_port, server.options.grpc_url, image) as s:
            s.wait(lambda: sum(c.ok for c in s.calls) >= 3 and s.ready and s.ready[-1].ok, 60, "no steady state")
            os.kill(core[0], signal.SIGSTOP)
            t_stop = time.monotonic()
            try:
                named = lambda: any(not p.ok and "demo_core" in p.text for p in s.ready if p.at > t_stop)  # noqa: E731
                t_unready = s.wait(named, unready_within_s, "readiness never went false naming demo_core")
                t_ready = s.wait(lambda: s.ready[-1].ok and s.ready[-1].at > t_unready, 240, "readiness never returned")
                s.wait(lambda: sum(c.ok for c in s.calls if c.at > t_ready) >= 5, 120, "no success after readiness returned")
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(core[0], signal.SIGCONT)  # killed by the watchdog in the normal case
        restarts = server.stub_restarts
        state = children_of(server.process.pid).get(core[0], ("gone", []))[0]
    failed = [c for c in s.calls if not c.ok]
    after = [c for c in s.calls if c.at > t_ready + 2.0]
    assert [r.model for r in restarts] == ["demo_core"] and restarts[0].error is None, restarts
    assert state in ("Z", "gone"), f"the frozen stub is still there ({state})"
    assert all(c.at > t_stop for c in failed), "a call failed before the stub was stopped"
    assert not any(not c.ok for c in after), [c.text for c in after if not c.ok][:3]
    return {
        "unready_after_s": round(t_unready - t_stop, 2),
        "ready_again_after_s": round(t_ready - t_stop, 2),
        "reload_s": round(restarts[-1].seconds, 2),
        "calls": len(s.calls),
        "failed": len(failed),
        "failed_window_s": round(failed[-1].at - t_stop, 2) if failed else 0.0,
        "errors": sorted({c.text[:120] for c in failed}),
        "frozen_stub_state_after": state,
    }


def test_sigstopped_core_stub_is_unready_then_replaced(demo_repo: Path, samples: dict[str, bytes]) -> None:
    """Seen stopped (state T) in two process checks: readiness false within ~1 s."""
    record("frozen_stub.json", "sigstop_core", _freeze_core(demo_repo, samples["astronaut.jpg"], 15))


@pytest.mark.slow  # the statistics rule alone (the process-state check off): slow failures, no success
def test_stub_failing_the_health_check_is_found_in_the_statistics(
    demo_repo: Path, samples: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(watchdog, "STOPPED_STATES", ())
    record("frozen_stub.json", "statistics_rule", _freeze_core(demo_repo, samples["astronaut.jpg"], 60))
