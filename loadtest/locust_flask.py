"""Locust user for the Flask + eager PyTorch baseline (run by ``detserve bench``; usable alone).

    locust -f loadtest/locust_flask.py --headless --host http://127.0.0.1:5000

Same images, same load shape and same per-request record as the gRPC user (``locust_grpc``), so
the two runs are read by the same report code. Environment:
    DETSERVE_IMAGES           folder of images to draw from (default: the sample photographs)
    DETSERVE_SCORE_THRESHOLD, DETSERVE_MAX_DET, DETSERVE_IOU_THRESHOLD   sent as query parameters
                              (the baseline refuses iou_threshold: a mismatched comparison fails loudly)
    DETSERVE_SHAPE, DETSERVE_USERS, ...   the load shape (see ``locust_grpc.DetserveShape``)
    DETSERVE_LATENCY_LOG      CSV file to write every request's (start, latency_ms, users, ok)
"""

from __future__ import annotations

import os
import random
import time
from urllib.parse import urlencode

from locust import task
from locust.contrib.fasthttp import FastHttpUser

# The shape class must be a name of this module for Locust to use it. Records go to the gRPC
# user's list, whose test_stop listener writes the CSV the runner reads: one writer, one format.
from loadtest.locust_grpc import _LOG as REQUEST_LOG
from loadtest.locust_grpc import DetserveShape, image_pool

__all__ = ["DetserveShape", "FlaskDetectUser", "query_string"]

REQUEST_NAME = "flask /detect"
ENV_PARAMETERS = {
    "score_threshold": "DETSERVE_SCORE_THRESHOLD",
    "iou_threshold": "DETSERVE_IOU_THRESHOLD",
    "max_det": "DETSERVE_MAX_DET",
}


def query_string() -> str:
    """``?score_threshold=...&max_det=...`` from the environment, or "" when none is set."""
    params = {name: os.environ[var] for name, var in ENV_PARAMETERS.items() if os.environ.get(var, "") != ""}
    return f"?{urlencode(params)}" if params else ""


class FlaskDetectUser(FastHttpUser):
    """Closed loop, no wait time: each user posts its next image when the previous answer arrives."""

    host = "http://127.0.0.1:5000"

    def on_start(self) -> None:
        self.pool = image_pool()
        self.path = "/detect" + query_string()
        self.rng = random.Random(id(self))

    @task
    def detect(self) -> None:
        blob = self.rng.choice(self.pool)
        headers = {"Content-Type": "application/octet-stream"}
        start = time.time()
        t0 = time.perf_counter()
        # bytes are documented as a body ("String/bytes"); only the annotation says str
        post = self.client.post(self.path, data=blob, headers=headers, name=REQUEST_NAME, catch_response=True)  # type: ignore[arg-type]
        with post as response:
            ok = response.status_code == 200
            if not ok:
                response.failure(f"HTTP {response.status_code}: {(response.text or '')[:200]}")
        ms = (time.perf_counter() - t0) * 1000.0
        users = self.environment.runner.user_count if self.environment.runner else 0
        REQUEST_LOG.append((start, ms, users, int(ok)))
