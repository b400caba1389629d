"""Large images through Triton's system shared memory instead of the gRPC payload.

The encoded image is serialised as a BYTES tensor into a POSIX shared-memory region that the
server reads directly; only the region's name crosses the socket. Outputs stay on gRPC (small).
tritonserver opens the region by name in *its* /dev/shm, a private tmpfs when detserve could give
it one (detserve/ops/privateshm.py): the region is created there, through
``shm_directory(<tritonserver pid>)``, which only the server's user and root can reach.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clients.grpc_client import Detections, split_result
from detserve.errors import ClientError
from detserve.ops.privateshm import SHM_DIR, ServerRegion


@dataclass(frozen=True)
class TransferTiming:
    mode: str
    requests: int
    mean_ms: float
    p50_ms: float
    p99_ms: float


class SharedMemoryImageSender:
    """Sends one encoded image per request through a registered system shared-memory region."""

    def __init__(self, url: str, model: str, capacity_bytes: int, admin_key: str | None = None, shm_dir: Path = SHM_DIR) -> None:
        """``admin_key``: registering shared memory is an admin API (the gate passes it only with the key);
        ``shm_dir``: the server's /dev/shm as this process sees it (module docstring)."""
        import tritonclient.grpc as grpcclient

        from detserve.ops.admin import GRPC_HEADER

        self._headers = {GRPC_HEADER: admin_key} if admin_key else None
        self.model = model
        self.client = grpcclient.InferenceServerClient(url)
        self.name = f"detserve_img_{uuid.uuid4().hex[:8]}"
        self.capacity = capacity_bytes + 16  # room for the BYTES length prefix
        self.region = ServerRegion(shm_dir, self.name, self.capacity)
        try:
            self.client.register_system_shared_memory(self.name, self.region.key, self.capacity, headers=self._headers)
        except Exception as e:
            self.region.close()
            raise ClientError(f"cannot register shared memory with the server: {e}") from e

    def detect(self, image: bytes) -> Detections:
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import serialize_byte_tensor, serialized_byte_size

        data = np.array([[image]], dtype=np.object_)
        serialized = serialize_byte_tensor(data)
        size = int(serialized_byte_size(serialized))
        if size > self.capacity:
            raise ClientError(f"image of {size} bytes does not fit the {self.capacity}-byte region")
        # an object array holds the serialised bytes as one item; a numeric one is the bytes themselves
        self.region.write(serialized.item() if serialized.dtype == np.object_ else serialized.tobytes())
        inp = grpcclient.InferInput("IMAGE", [1, 1], "BYTES")
        inp.set_shared_memory(self.name, size)
        try:
            result = self.client.infer(self.model, [inp])
        except Exception as e:
            raise ClientError(f"model {self.model!r}: {e}") from e
        return split_result(result)[0]

    def close(self, in_use_wait_s: float = 5.0) -> None:
        """Unregister, then destroy the region. Triton releases an ensemble request's inputs a moment
        after its response reached the client, and refuses to unregister a region "currently in use"
        meanwhile (seen once in a bench run): that answer is retried for up to ``in_use_wait_s``."""
        try:
            deadline = time.monotonic() + in_use_wait_s
            while True:
                try:
                    self.client.unregister_system_shared_memory(self.name, headers=self._headers)
                    break
                except Exception as e:
                    if "currently in use" not in str(e) or time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
        finally:
            self.region.close()
            self.client.close()

    def __enter__(self) -> SharedMemoryImageSender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def compare_transfer(
    url: str, model: str, image: bytes, requests: int = 20, admin_key: str | None = None, shm_dir: Path = SHM_DIR
) -> list[TransferTiming]:
    """The same large image, sequentially, over plain gRPC and over system shared memory (needs the admin key)."""
    from clients.grpc_client import DetectorClient

    timings = []
    with DetectorClient(url, model) as plain, SharedMemoryImageSender(url, model, len(image), admin_key, shm_dir) as shared:
        for mode, send in (("grpc", plain.detect), ("system shared memory", shared.detect)):
            send(image)  # warm-up
            ms = []
            for _ in range(requests):
                t0 = time.perf_counter()
                send(image)
                ms.append((time.perf_counter() - t0) * 1000.0)
            arr = np.array(ms)
            timings.append(
                TransferTiming(mode, requests, float(arr.mean()), float(np.percentile(arr, 50)), float(np.percentile(arr, 99)))
            )
    return timings


def large_jpeg(width: int = 3840, height: int = 2160, quality: int = 95) -> bytes:
    """A 4K JPEG made from a sample photograph (upscaled), so decode cost is realistic."""
    import io

    from PIL import Image

    from detserve.runtime.samples import sample_array

    im = Image.fromarray(sample_array("astronaut")).resize((width, height), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()
