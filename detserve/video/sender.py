"""Frames to the ensemble over gRPC, one request per frame (Triton's dynamic batcher groups the
requests of all streams on the server), answered through a callback.

Two ways in (docs/contract.md): ``jpeg`` encodes each frame and sends it through ``IMAGE`` (BYTES,
[1, 1]) as any client does; ``raw`` sends the uint8 RGB pixels through ``FRAMES`` (UINT8, [1, H, W, 3]):
no encode/decode, more bytes. A repository built before ``FRAMES`` existed is refused up front, by
name, instead of failing every request.
"""

from __future__ import annotations

import io
import ipaddress
from collections.abc import Callable
from typing import Any

import numpy as np

from clients.grpc_client import Detections, request_parameters, split_result
from detserve.errors import ClientError
from detserve.pipeline import IMAGE

FRAMES = "FRAMES"  # the ensemble's raw-pixel input (issue 25 part 3)
TRANSPORTS = {"jpeg": IMAGE, "raw": FRAMES}
# auto: raw pixels to a server on this host (no encode, no decode: 15-24 % less client CPU and 9-16 % less
# server CPU per 640x480 frame at 1-8 streams, measured by loadtest/frames_vs_jpeg.py), JPEG to anything else (raw is
# ~23x the bytes: ~184 Mbit/s per 25 FPS stream); JPEG too where the ensemble has no FRAMES input
AUTO = "auto"


def on_this_host(url: str) -> bool:
    """A loopback address, localhost or a unix socket: where raw frames cost no network."""
    if url.startswith("unix:"):
        return True
    host = url.rsplit(":", 1)[0] if url.count(":") == 1 or url.startswith("[") else url
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


JPEG_QUALITY = 90

Callback = Callable[[list[Detections] | None, Exception | None], None]


def encode_jpeg(rgb: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


class Sender:
    """One gRPC channel shared by every stream (its calls are thread-safe)."""

    def __init__(
        self, url: str, model: str, transport: str = AUTO, timeout_s: float = 30.0,
        score_threshold: float | None = None, max_det: int | None = None,
    ) -> None:  # fmt: skip
        import tritonclient.grpc as grpcclient

        if transport not in (*TRANSPORTS, AUTO):
            raise ClientError(f"--transport must be one of {AUTO}, {', '.join(TRANSPORTS)}, not {transport!r}")
        self.url, self.model, self.transport, self.timeout_s = url, model, transport, timeout_s
        self.params = request_parameters(score_threshold, None, max_det) or None
        self.bytes_sent = 0
        try:
            self._client = grpcclient.InferenceServerClient(url)
        except Exception as e:
            raise ClientError(f"cannot connect to {url}: {e}") from e

    def check(self) -> None:
        """The server answers, the model is ready and has the input this transport needs."""
        try:
            ready = self._client.is_model_ready(self.model)
            inputs = [i.name for i in self._client.get_model_metadata(self.model).inputs] if ready else []
        except Exception as e:
            raise ClientError(f"no Triton server answers at {self.url}: {e}", hint="start one with `detserve serve`") from e
        if not ready:
            raise ClientError(
                f"model {self.model!r} is not ready on {self.url}", hint="`detserve models list` shows what is served"
            )
        if self.transport == AUTO:
            self.transport = "raw" if FRAMES in inputs and on_this_host(self.url) else "jpeg"
        needed = TRANSPORTS[self.transport]
        if needed not in inputs:
            raise ClientError(
                f"model {self.model!r} has no {needed} input (it has {', '.join(inputs)}): "
                f"--transport {self.transport} needs the ensemble's {needed} input",
                hint="rebuild the repository with this detserve (`detserve build`), or use --transport jpeg",
            )

    def _input(self, rgb: np.ndarray) -> Any:
        import tritonclient.grpc as grpcclient

        if self.transport == "raw":
            pixels = np.ascontiguousarray(rgb, dtype=np.uint8)[None]
            inp = grpcclient.InferInput(FRAMES, list(pixels.shape), "UINT8")
            inp.set_data_from_numpy(pixels)
            self.bytes_sent += pixels.nbytes
            return inp
        data = encode_jpeg(rgb)
        self.bytes_sent += len(data)
        inp = grpcclient.InferInput(IMAGE, [1, 1], "BYTES")
        inp.set_data_from_numpy(np.array([[data]], dtype=np.object_))
        return inp

    def send(self, rgb: np.ndarray, done: Callback) -> None:
        """Encode (in the caller's thread) and send; ``done`` gets the detections or the error, once."""

        def callback(result: Any, error: Exception | None) -> None:
            if error is not None:
                done(None, error)
                return
            try:
                detections = split_result(result)
            except Exception as e:  # a malformed answer is this frame's failure, not the stream's
                done(None, e)
                return
            done(detections, None)

        try:
            self._client.async_infer(
                self.model, [self._input(rgb)], callback=callback, parameters=self.params, client_timeout=self.timeout_s
            )
        except Exception as e:  # refused before sending
            done(None, e)

    def close(self) -> None:
        self._client.close()
