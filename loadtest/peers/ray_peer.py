"""Ray Serve peer: ``python -m loadtest.peers.ray_peer`` (settings in DETSERVE_PEER_CONFIG; see service.py).

Configured as Ray Serve's guides say for a CPU model: one replica per core (``num_replicas``, each
reserving its thread share of the cores as ``num_cpus``), request batching with ``@serve.batch``
(``max_batch_size``, ``batch_wait_timeout_s``, set per run through the batch handler's setters) and
``max_ongoing_requests`` above the batch size so a replica can hold a full batch. One local node, all
on loopback; the HTTP proxy answers ``POST /detect``.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Any

from loadtest.peers.common import PeerConfig


def build_app(cfg: PeerConfig) -> Any:
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import JSONResponse

    @serve.deployment(
        num_replicas=cfg.replicas,
        max_ongoing_requests=2 * cfg.max_batch_size,
        ray_actor_options={"num_cpus": cfg.ort_threads},
    )
    class Detector:
        def __init__(self, config: PeerConfig) -> None:
            from loadtest.peers.common import load_pipeline

            self.pipeline = load_pipeline(config)
            self.detect.set_max_batch_size(config.max_batch_size)  # type: ignore[attr-defined]
            self.detect.set_batch_wait_timeout_s(config.batch_wait_ms / 1000.0)  # type: ignore[attr-defined]

        @serve.batch
        async def detect(self, blobs: list[bytes]) -> list[dict[str, Any]]:
            from loadtest.peers.common import detect_batch

            return detect_batch(self.pipeline, blobs)

        async def __call__(self, request: Request) -> JSONResponse:
            if request.method != "POST" or request.url.path.rstrip("/") != "/detect":
                return JSONResponse({"error": "POST /detect with an encoded image as the body"}, status_code=404)
            if request.query_params:
                return JSONResponse({"error": "this peer takes no query parameters"}, status_code=400)
            answer = await self.detect(await request.body())
            return JSONResponse(answer, status_code=400 if "error" in answer else 200)

    return Detector.bind(cfg)  # type: ignore[attr-defined]


def main() -> int:
    import ray
    from ray import serve

    cfg = PeerConfig.from_env()
    workdir = os.environ["DETSERVE_PEER_WORKDIR"]
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    ray.init(
        num_cpus=cfg.replicas * cfg.ort_threads, include_dashboard=False, _temp_dir=f"{workdir}/ray",
        _node_ip_address="127.0.0.1", object_store_memory=128 * 2**20, log_to_driver=False,
    )  # fmt: skip
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": cfg.port})
        serve.run(build_app(cfg), name="detect", route_prefix="/")
        stop.wait()
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
