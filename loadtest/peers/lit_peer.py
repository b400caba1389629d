"""LitServe peer: ``python -m loadtest.peers.lit_peer`` (settings in DETSERVE_PEER_CONFIG; see service.py).

Configured as LitServe's docs say for CPU: ``accelerator="cpu"`` with ``workers_per_device`` = cores
(one inference worker process each, with its thread share), batching with ``max_batch_size`` and
``batch_timeout`` on the ``LitAPI``, one uvicorn API server per worker (LitServe's default), on
loopback. The body is read raw (``application/octet-stream``), as the Flask baseline reads it.
"""

# no ``from __future__ import annotations`` here: LitServe hands decode_request's annotation object to
# FastAPI, and a string annotation would be read as a query parameter
import sys
from typing import Annotated, Any

import litserve as ls
from fastapi import Body
from starlette.responses import JSONResponse

from loadtest.peers.common import PeerConfig

RawImage = Annotated[bytes, Body(media_type="application/octet-stream")]


class DetectAPI(ls.LitAPI):  # type: ignore[misc]
    """At module level: LitServe spawns its workers, which unpickle the API object."""

    def __init__(self, cfg: PeerConfig) -> None:
        super().__init__(max_batch_size=cfg.max_batch_size, batch_timeout=cfg.batch_wait_ms / 1000.0, api_path="/detect")
        self.cfg = cfg

    def setup(self, device: str) -> None:
        from loadtest.peers.common import load_pipeline

        self.pipeline = load_pipeline(self.cfg)

    # the parameter must be called ``request``: LitServe reads its annotation to parse the body
    def decode_request(self, request: RawImage) -> bytes:
        return request

    def batch(self, inputs: list[bytes]) -> list[bytes]:
        return list(inputs)  # LitServe's default would try to stack them as tensors

    def predict(self, x: Any) -> Any:
        from loadtest.peers.common import detect_batch

        if self.cfg.max_batch_size == 1:  # unbatched: one image in, one answer out
            return detect_batch(self.pipeline, [x])[0]
        return detect_batch(self.pipeline, x)

    def unbatch(self, output: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return output

    def encode_response(self, output: dict[str, Any]) -> Any:
        # a response, not an exception: LitServe answers every request of a batch with the error one of
        # them raises, and a bad image must fail alone
        if "error" in output:
            return JSONResponse(output, status_code=400)
        return output


def main() -> int:
    cfg = PeerConfig.from_env()
    server = ls.LitServer(DetectAPI(cfg), accelerator="cpu", devices=1, workers_per_device=cfg.replicas, timeout=60)
    server.run(host="127.0.0.1", port=cfg.port, generate_client_file=False, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
