"""Faults with traffic flowing, each against a real tritonserver: nothing is lost.

- a python-backend stub killed mid-load (Triton 2.51 does not restart it: the server's stub watchdog
  reloads the model; clients retry the failed calls meanwhile);
- the server restarted while a client runs (the client retries with backoff inside a deadline);
Results go to out/reports/faults.json (no timing asserts).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from clients.grpc_client import Detections, DetectorClient
from detserve.ops.server import ServerOptions, TritonServer, free_port
from loadtest.opsreport_base import ClientLoad, Tally
from tests.reports import record


def _record(key: str, value: dict[str, Any]) -> None:
    record("faults.json", key, value)


@pytest.fixture()
def ssdlite_repo(repository: Path, tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    for suffix in ("", "_preprocess", "_core", "_postprocess"):
        shutil.copytree(repository / f"ssdlite{suffix}", repo / f"ssdlite{suffix}")
    return repo


def _options(repo: Path) -> ServerOptions:
    return ServerOptions(repo, grpc_port=free_port(), http_port=free_port(), metrics_port=free_port())


def _kill_stub(server: TritonServer, model_instance: str) -> int:
    """SIGKILL this server's stubs of one model (only its children: other servers run the same model)."""
    assert server.process is not None
    parent = str(server.process.pid)
    out = subprocess.run(
        ["pgrep", "-P", parent, "-f", f"triton_python_backend_stub.*{model_instance}"], capture_output=True, text=True
    )
    pids = [int(p) for p in out.stdout.split()]
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    return len(pids)


def test_stub_killed_mid_load_loses_no_request(ssdlite_repo: Path, samples: dict[str, bytes]) -> None:
    """Every request is counted, those in flight at the end included (Locust drops a user stuck in its
    retries when the run stops, so a run through Locust passed with no request after the kill)."""
    images = [samples[n] for n in sorted(samples)][:4]
    with TritonServer(_options(ssdlite_repo)) as server:
        with ClientLoad(server.options.grpc_url, images, users=4, retries=12) as load:
            load.wait_for(8)
            killed = _kill_stub(server, "ssdlite_postprocess")
            t_kill = time.monotonic()
            while sum(1 for c in list(load.calls) if c.start > t_kill and c.error is None) < 8:
                assert time.monotonic() - t_kill < 240, "no request succeeded after the kill"
                time.sleep(0.2)
        restarts = server.stub_restarts
    assert killed >= 1, "no post-processing stub was found to kill"
    tally = Tally.of(load.calls)
    _record(
        "stub_killed",
        {
            "requests": tally.sent,
            "failed": tally.lost,
            "completed_after_kill": len([c for c in load.calls if c.end > t_kill]),
            "max_latency_ms": max(1000 * (c.end - c.start) for c in load.calls),
            "reload_s": restarts[0].seconds if restarts else None,
        },
    )
    assert [r.model for r in restarts] == ["ssdlite_postprocess"] and restarts[0].error is None, restarts
    assert tally.lost == 0, f"{tally.lost} of {tally.sent} failed: {sorted(set(tally.lost_errors))[:3]}"


@pytest.mark.slow  # fast path: test_client_retries (detect_many rides out a server that comes up late)
def test_server_restart_while_a_client_runs(ssdlite_repo: Path, samples: dict[str, bytes]) -> None:
    opts = _options(ssdlite_repo)
    first = TritonServer(opts)
    first.__enter__()
    results: list[bool] = []
    with DetectorClient(opts.grpc_url, "ssdlite", timeout_s=90.0, retries=12, backoff_s=0.1) as client:

        def run() -> None:
            for _ in range(12):
                try:
                    results.append(isinstance(client.detect(samples["chelsea.png"]), Detections))
                except Exception:
                    results.append(False)
                time.sleep(0.2)

        worker = threading.Thread(target=run)
        worker.start()
        time.sleep(1.0)
        t0 = time.monotonic()
        first.stop()
        second = TritonServer(opts)  # same ports
        try:
            second.start()
            second.wait_ready()
            downtime = time.monotonic() - t0
            worker.join(timeout=120)
        finally:
            second.stop()
    _record("server_restart", {"requests": len(results), "failed": results.count(False), "downtime_s": downtime})
    assert len(results) == 12 and all(results)
