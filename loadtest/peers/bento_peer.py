"""BentoML peer: ``python -m loadtest.peers.bento_peer`` runs ``bentoml serve`` on this module's service
(settings in DETSERVE_PEER_CONFIG; see service.py).

Configured as BentoML's docs say for CPU: ``workers`` = cores (one process each, with its thread
share) and adaptive batching, ``@bentoml.api(batchable=True, max_batch_size=..., max_latency_ms=...)``:
BentoML's dispatcher chooses the wait itself from the latencies it sees; ``max_latency_ms`` is the bound
past which it sheds a request, set well above a loaded request's latency so nothing is shed.
The body is read raw (``application/octet-stream``) and the answer is one image's JSON, as the Flask
baseline does: a batchable API takes and returns lists, so the input and output descriptors turn one
request into a one-image list and a one-answer list back into that answer.
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Any

from loadtest.peers.common import PeerConfig


@functools.cache
def _service() -> Any:
    import bentoml
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response

    cfg = PeerConfig.from_env()

    class RawImage(bentoml.IODescriptor):  # type: ignore[misc]
        images: list[bytes]

        @classmethod
        async def from_http_request(cls, request: Request, serde: Any) -> RawImage:
            if request.query_params:
                raise bentoml.exceptions.InvalidArgument("this peer takes no query parameters")
            return cls(images=[await request.body()])

    class Answer(bentoml.IODescriptor):  # type: ignore[misc]
        detections: list[dict[str, Any]] | None = None  # never filled: the answer is written by to_http_response

        @classmethod
        async def to_http_response(cls, obj: Any, serde: Any) -> Response:
            (answer,) = obj  # this request's share of the batch's answers: one
            return JSONResponse(answer, status_code=400 if "error" in answer else 200)

    @bentoml.service(workers=cfg.replicas, resources={"cpu": str(cfg.replicas * cfg.ort_threads)}, traffic={"timeout": 60})
    class Detect:
        def __init__(self) -> None:
            from loadtest.peers.common import load_pipeline

            self.pipeline = load_pipeline(cfg)

        @bentoml.api(
            route="/detect", input_spec=RawImage, output_spec=Answer, batchable=True,
            max_batch_size=cfg.max_batch_size, max_latency_ms=cfg.max_latency_ms,
        )  # fmt: skip
        def detect(self, images: list[bytes]) -> list[dict[str, Any]]:
            from loadtest.peers.common import detect_batch

            return detect_batch(self.pipeline, images)

    return Detect


def __getattr__(name: str) -> Any:
    """``bentoml serve loadtest.peers.bento_peer:Detect`` builds the service from the environment on first
    access, so importing this module needs no settings."""
    if name == "Detect":
        return _service()
    raise AttributeError(name)


def main() -> int:
    cfg = PeerConfig.from_env()
    target = "loadtest.peers.bento_peer:Detect"
    argv = [sys.executable, "-m", "bentoml", "serve", target, "--host", "127.0.0.1", "--port", str(cfg.port)]
    os.execv(sys.executable, argv)  # the launcher becomes BentoML's server: its workers are its children
    return 0


if __name__ == "__main__":
    sys.exit(main())
