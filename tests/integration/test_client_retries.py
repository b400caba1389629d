"""``DetectorClient.detect_many`` retries transient failures as ``detect`` does (``compare`` relies on it)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from clients.grpc_client import Detections, DetectorClient
from detserve.errors import ClientError
from detserve.ops.server import ServerOptions, TritonServer, free_port


@pytest.fixture(scope="module")
def demo_repo(demo_copy: Callable[[str], Path]) -> Path:
    return demo_copy("retry_repo")


def test_detect_many_retries_until_the_server_is_up(demo_repo: Path, samples: dict[str, bytes]) -> None:
    """The requests go out before any server listens: UNAVAILABLE is retried until it answers."""
    images = [samples["chelsea.png"], samples["coffee.jpg"], samples["astronaut.jpg"]]
    opts = ServerOptions(demo_repo, grpc_port=free_port(), http_port=free_port(), metrics_port=free_port())
    with DetectorClient(opts.grpc_url, "demo", retries=0) as client:
        assert all(isinstance(r, ClientError) for r in client.detect_many(images)), "no server yet: plain failures"
    server = TritonServer(opts)
    results: list[Detections | ClientError] = []
    with DetectorClient(opts.grpc_url, "demo", timeout_s=180.0, retries=9, backoff_s=0.5) as client:
        worker = threading.Thread(target=lambda: results.extend(client.detect_many(images, max_in_flight=2)))
        worker.start()
        try:
            server.start()
            server.wait_ready()
            worker.join(timeout=240)
        finally:
            server.stop()
    assert len(results) == 3 and all(isinstance(r, Detections) for r in results), results
