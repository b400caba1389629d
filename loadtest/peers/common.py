"""What every peer server shares: its settings, the pipeline it serves, and the answer it gives.

Every peer runs ``InProcessPipeline`` — the family's bit-exact preprocessing, the served core's ONNX
Runtime session, the torch decode — so the three servers do the same model work per image and
their differences are their own overheads. A peer answers ``POST /detect`` (the encoded image as
the raw body) with the Flask baseline's JSON: ``{"boxes": [[x1, y1, x2, y2], ...], "scores": [...],
"labels": [...]}``, so the same Locust user (``loadtest/locust_flask.py``) drives all of them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from detserve.errors import DetserveError

CONFIG_ENV = "DETSERVE_PEER_CONFIG"  # the settings, as JSON, for the peer's own processes (nothing secret)
PEERS = ("ray", "litserve", "bentoml")


@dataclass(frozen=True)
class PeerConfig:
    """One peer server: which model, how many replicas, how each batches."""

    peer: str
    repository: str
    model: str
    port: int
    replicas: int = 2  # replicas (Ray) / workers (LitServe, BentoML): one per core, as each peer's CPU guide says
    ort_threads: int = 1  # ONNX Runtime (and torch) threads per replica: replicas x threads = cores
    max_batch_size: int = 8
    batch_wait_ms: float = 10.0  # Ray's batch_wait_timeout_s, LitServe's batch_timeout; BentoML adapts its own
    max_latency_ms: int = 10_000  # BentoML's bound before it sheds a request (its dispatcher picks the wait)

    def __post_init__(self) -> None:
        if self.peer not in PEERS:
            raise DetserveError(f"unknown peer {self.peer!r}", hint=f"choose one of: {', '.join(PEERS)}")
        if min(self.replicas, self.ort_threads, self.max_batch_size) < 1 or self.batch_wait_ms < 0:
            raise DetserveError("replicas, ort_threads and max_batch_size must be >= 1, batch_wait_ms >= 0")

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_env(cls) -> PeerConfig:
        raw = os.environ.get(CONFIG_ENV)
        if not raw:
            raise DetserveError(f"{CONFIG_ENV} is not set", hint="start peers through loadtest.peers.service.PeerService")
        return cls(**json.loads(raw))

    @property
    def label(self) -> str:
        wait = "adaptive" if self.peer == "bentoml" else f"{self.batch_wait_ms:g} ms"
        return f"batch {self.max_batch_size}, wait {wait}"


def load_pipeline(cfg: PeerConfig) -> Any:
    """The in-process pipeline with this replica's thread share, warmed up on one sample image
    (first-call allocations stay out of the measured run, as the in-process limit's warm-up does)."""
    import torch

    from detserve.runtime.samples import sample_files
    from loadtest.inprocess import InProcessPipeline

    torch.set_num_threads(cfg.ort_threads)
    pipeline = InProcessPipeline.from_repository(Path(cfg.repository), cfg.model, intra_op_threads=cfg.ort_threads)
    pipeline.run([next(iter(sample_files().values()))])
    return pipeline


def detect_batch(pipeline: Any, blobs: Sequence[bytes]) -> list[dict[str, Any]]:
    """One answer per image, in order: detections, or ``{"error": message}`` for an image that cannot be
    decoded. A bad image fails alone: a batch holding one is run again one image at a time."""
    try:
        return [detections_json(d) for d in pipeline.run(list(blobs))]
    except DetserveError as e:
        if len(blobs) == 1:
            return [{"error": str(e)}]
    return [detect_batch(pipeline, [blob])[0] for blob in blobs]


def detections_json(det: dict[str, Any]) -> dict[str, Any]:
    """The Flask baseline's answer: plain lists (float32 values become the same doubles Flask sends)."""
    return {"boxes": det["boxes"].tolist(), "scores": det["scores"].tolist(), "labels": det["labels"].tolist()}
