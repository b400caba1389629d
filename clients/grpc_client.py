"""gRPC client for a detserve ensemble: encoded images in, detections out.

One request per image: Triton's dynamic batcher groups concurrent requests on the server, and
each image keeps its own canvas, so its detections never depend on what else was sent.
Needs only tritonclient + numpy (no torch).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from detserve.errors import ClientError
from detserve.pipeline import PREPROCESS, model_name

OUTPUTS = ("num_detections", "boxes", "scores", "labels")
MASKS = "masks"  # instance-mask models only: FP16 [max_det, 28, 28]


@dataclass(frozen=True)
class Detections:
    """One image's detections, in original-image pixels, sorted by score (highest first)."""

    boxes: np.ndarray  # float32 [K, 4] x1, y1, x2, y2
    scores: np.ndarray  # float32 [K]
    labels: np.ndarray  # int32 [K]
    # instance-mask models: float16 [K, 28, 28] probabilities in each box (clients.masks.paste_masks)
    masks: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    def to_dict(self) -> dict[str, Any]:
        return {
            "boxes": [[round(float(v), 2) for v in b] for b in self.boxes],
            "scores": [round(float(s), 5) for s in self.scores],
            "labels": [int(v) for v in self.labels],
        }

    @classmethod
    def from_padded(
        cls, num: int, boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, masks: np.ndarray | None = None
    ) -> Detections:
        return cls(
            boxes[:num].astype(np.float32),
            scores[:num].astype(np.float32),
            labels[:num].astype(np.int32),
            None if masks is None else masks[:num],
        )


def request_parameters(score_threshold: float | None, iou_threshold: float | None, max_det: int | None) -> dict[str, Any]:
    """Per-request controls; they travel as request parameters through the ensemble."""
    params: dict[str, Any] = {}
    if score_threshold is not None:
        params["score_threshold"] = float(score_threshold)
    if iou_threshold is not None:
        params["iou_threshold"] = float(iou_threshold)
    if max_det is not None:
        params["max_det"] = int(max_det)
    return params


def _image_input(images: Sequence[bytes]) -> Any:
    import tritonclient.grpc as grpcclient

    inp = grpcclient.InferInput("IMAGE", [len(images), 1], "BYTES")
    inp.set_data_from_numpy(np.array([[bytes(b)] for b in images], dtype=np.object_))
    return inp


def split_result(result: Any) -> list[Detections]:
    num = result.as_numpy("num_detections").reshape(-1)
    boxes, scores, labels = (result.as_numpy(n) for n in OUTPUTS[1:])
    masks = result.as_numpy(MASKS)  # None unless the model serves instance masks
    return [
        Detections.from_padded(int(num[i]), boxes[i], scores[i], labels[i], None if masks is None else masks[i])
        for i in range(num.shape[0])
    ]


_RETRYABLE_TEXT = (
    "failed to connect", "connection reset", "socket closed", "upstream", "stub process", "broken pipe", "goaway",
    # a server restarting or a model being reloaded answers these for a few seconds
    "server is stopping", "has no available versions", "is not ready",
)  # fmt: skip


def is_retryable(e: BaseException) -> bool:
    """Transient failures: a replica restarting or killed, a proxy without upstream, a model reloading.

    Inference is idempotent, so these may be retried; a bad request (INVALID_ARGUMENT, a decode
    error) never is.
    """
    status = e.status() if hasattr(e, "status") and callable(e.status) else ""
    text = str(e).lower()
    if "invalid_argument" in str(status).lower():
        return False
    return "UNAVAILABLE" in str(status) or any(t in text for t in _RETRYABLE_TEXT)


def with_retries(call: Any, retries: int, backoff_s: float, deadline_s: float | None) -> Any:
    """``call()`` again on transient failures: exponential backoff, at most ``retries`` more times, within a deadline."""
    start = time.monotonic()
    attempt = 0
    while True:
        try:
            return call()
        except Exception as e:
            elapsed = time.monotonic() - start
            wait = backoff_s * (2**attempt)
            if attempt >= retries or not is_retryable(e) or (deadline_s is not None and elapsed + wait > deadline_s):
                raise
            time.sleep(wait)
            attempt += 1


def _wrap(e: Exception, model: str) -> ClientError:
    msg = e.message() if hasattr(e, "message") and callable(e.message) else str(e)
    return ClientError(f"model {model!r}: {msg}")


class DetectorClient:
    """A gRPC connection to one detector ensemble."""

    def __init__(self, url: str, model: str, timeout_s: float | None = 60.0, retries: int = 0, backoff_s: float = 0.1) -> None:
        import tritonclient.grpc as grpcclient

        self.url = url
        self.model = model
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        try:
            self._client = grpcclient.InferenceServerClient(url)
        except Exception as e:
            raise ClientError(f"cannot connect to {url}: {e}") from e

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> DetectorClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def check_ready(self) -> None:
        try:
            ready = self._client.is_model_ready(self.model)
        except Exception as e:
            raise ClientError(f"no Triton server answers at {self.url}: {e}", hint="start one with `detserve serve`") from e
        if not ready:
            raise ClientError(f"model {self.model!r} is not ready on {self.url}", hint="`detserve serve` lists the loaded models")

    def loaded_versions(self, model: str | None = None) -> list[str]:
        """Versions of ``model`` (default: this client's) the server has loaded, from the open metadata API."""
        name = model or self.model
        try:
            meta = self._client.get_model_metadata(name)
        except Exception as e:
            raise _wrap(e, name) from e
        return [str(v) for v in meta.versions]

    def detect(
        self, image: bytes, score_threshold: float | None = None, iou_threshold: float | None = None, max_det: int | None = None
    ) -> Detections:
        return self.detect_batch([image], score_threshold, iou_threshold, max_det)[0]

    def detect_batch(
        self,
        images: Sequence[bytes],
        score_threshold: float | None = None,
        iou_threshold: float | None = None,
        max_det: int | None = None,
    ) -> list[Detections]:
        """Several images in ONE request; each keeps its own canvas on the server, so each gets what it
        gets alone (a native onnxruntime/TensorRT core refuses images that would need different canvases)."""
        params = request_parameters(score_threshold, iou_threshold, max_det)

        def call() -> Any:
            return self._client.infer(
                self.model, [_image_input(images)], parameters=params or None, client_timeout=self.timeout_s
            )

        try:
            result = with_retries(call, self.retries, self.backoff_s, self.timeout_s)
        except Exception as e:
            raise _wrap(e, self.model) from e
        return split_result(result)

    def detect_many(
        self,
        images: Sequence[bytes],
        score_threshold: float | None = None,
        iou_threshold: float | None = None,
        max_det: int | None = None,
        max_in_flight: int = 16,
    ) -> list[Detections | ClientError]:
        """One request per image, up to ``max_in_flight`` at once; a failed image yields its error.

        A transient failure is sent again like ``detect`` does (``retries``, exponential backoff, within
        ``timeout_s`` of the image's first try); the image keeps its slot meanwhile."""
        params = request_parameters(score_threshold, iou_threshold, max_det)
        results: list[Detections | ClientError | None] = [None] * len(images)
        slots = threading.Semaphore(max_in_flight)
        done = threading.Event()
        remaining = [len(images)]
        lock = threading.Lock()

        def finish(index: int, outcome: Detections | ClientError) -> None:
            results[index] = outcome
            slots.release()
            with lock:
                remaining[0] -= 1
                if remaining[0] == 0:
                    done.set()

        def send(index: int, attempt: int, start: float) -> None:
            def callback(result: Any, error: Exception | None) -> None:
                if error is None:
                    finish(index, split_result(result)[0])
                elif (wait := self._retry_wait(error, attempt, start)) is not None:
                    threading.Timer(wait, send, (index, attempt + 1, start)).start()
                else:
                    finish(index, _wrap(error, self.model))

            try:
                self._client.async_infer(
                    self.model,
                    [_image_input([images[index]])],
                    callback=callback,
                    parameters=params or None,
                    client_timeout=self.timeout_s,
                )
            except Exception as e:  # refused before sending: same rules as a failed answer
                callback(None, e)

        if not images:
            return []
        for i in range(len(images)):
            slots.acquire()
            send(i, 0, time.monotonic())
        done.wait()
        return [r for r in results if r is not None]

    def _retry_wait(self, error: Exception, attempt: int, start: float) -> float | None:
        """Seconds to wait before trying again after ``error`` (the rules of ``with_retries``), or None."""
        wait = self.backoff_s * (2**attempt)
        elapsed = time.monotonic() - start
        if attempt >= self.retries or not is_retryable(error):
            return None
        if self.timeout_s is not None and elapsed + wait > self.timeout_s:
            return None
        return wait

    def preprocessed(self, image: bytes) -> tuple[np.ndarray, np.ndarray]:
        """The server's preprocessed tensor and image_info for one image (verification rung 1)."""
        try:
            result = self._client.infer(
                model_name(self.model, PREPROCESS), [_image_input([image])], client_timeout=self.timeout_s
            )
        except Exception as e:
            raise _wrap(e, model_name(self.model, PREPROCESS)) from e
        return result.as_numpy("images")[0], result.as_numpy("image_info")[0]
