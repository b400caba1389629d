"""Overload: a burst beyond the bounded queues is rejected at once with a clear error; admitted
requests complete. Counts and latencies go to out/reports/overload.json (no timing asserts)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from clients.grpc_client import Detections, DetectorClient
from detserve.ops.server import running_server
from loadtest.tune import variant_repository

REPORTS = Path(__file__).resolve().parents[2] / "out" / "reports"
QUEUE = 4
BURST = 64


def _small_queues(role: str, config: Any) -> None:
    config.dynamic_batching.default_queue_policy.max_queue_size = QUEUE


def _burst(client: DetectorClient, blob: bytes) -> list[tuple[bool, float, str]]:
    """BURST requests at once, each timed from its own send to its own answer."""
    out: list[tuple[bool, float, str]] = []
    lock = threading.Lock()

    def one() -> None:
        t0 = time.perf_counter()
        try:
            client.detect(blob)
            row = (True, (time.perf_counter() - t0) * 1000, "")
        except Exception as e:  # the rejection under test
            row = (False, (time.perf_counter() - t0) * 1000, str(e))
        with lock:
            out.append(row)

    threads = [threading.Thread(target=one) for _ in range(BURST)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def test_burst_beyond_the_queue_is_rejected_fast_and_admitted_requests_complete(
    repository: Path, tmp_path: Path, samples: dict[str, bytes]
) -> None:
    repo = variant_repository(repository, tmp_path / "repo", "ssdlite", _small_queues)
    with running_server(repo) as server, DetectorClient(server.options.grpc_url, "ssdlite") as client:
        client.detect(samples["astronaut.jpg"])  # warm
        rows = _burst(client, samples["astronaut.jpg"])
        assert isinstance(client.detect(samples["chelsea.png"]), Detections)  # still serving afterwards
    ok = [ms for good, ms, _ in rows if good]
    rejected = [(ms, err) for good, ms, err in rows if not good]
    assert len(rows) == BURST and ok and rejected
    assert all("queue" in err.lower() for _, err in rejected), rejected[:2]
    report = {
        "burst": BURST,
        "max_queue_size_per_model": QUEUE,
        "admitted": len(ok),
        "rejected": len(rejected),
        "rejection_message": rejected[0][1],
        "admitted_latency_ms": {p: float(np.percentile(ok, q)) for p, q in (("p50", 50), ("p99", 99), ("max", 100))},
        "rejected_latency_ms": {
            p: float(np.percentile([m for m, _ in rejected], q)) for p, q in (("p50", 50), ("p99", 99), ("max", 100))
        },
    }
    REPORTS.mkdir(parents=True, exist_ok=True)
    (REPORTS / "overload.json").write_text(json.dumps(report, indent=2))
