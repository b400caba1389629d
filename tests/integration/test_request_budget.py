"""Work bounded by what a request costs, against a real tritonserver (issue 20, finding 5).

- The pixel budget: a request's declared pixels, summed over its images, are checked from the
  headers before anything is decoded. The attack of the finding (3 concurrent requests of 8
  all-black 6324 x 6324 PNGs, 116 KB each, ~4 s of one core each to pre-process) is refused at
  once, so a normal client keeps its 10 s deadline; a request just under the budget is served; an
  over-budget request sent beside normal ones fails alone, with INVALID_ARGUMENT; the server's
  override (``detserve serve --max-request-pixels``) replaces the build's value (slow: a second server).
- HTTP deadlines, backend side: the gate's ``detserve-arrival``/``detserve-timeout`` stamps reach
  the preprocess model as string parameters through ``--http-header-forward-pattern``; a late
  request is dropped before its headers are read, a timely one is served.
Numbers go to out/reports/request_budget.json.
"""

from __future__ import annotations

import http.client
import io
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from detserve.ops.gate import upstream_in
from detserve.ops.server import ServerOptions, TritonServer, running_server
from tests.reports import record

MODEL = "demo"
BLACK_SIDE = 6324  # 40 M pixels: within the default per-image limit, 116 KB as a PNG
SMALL_BUDGET = 2 * 640 * 480  # the override of the second server: two VGA images
FORWARD = "--http-header-forward-pattern=^detserve-"


@pytest.fixture(scope="module")
def budget_repository(demo_copy: Callable[[str], Path]) -> Path:
    return demo_copy("budget_repository")


def black_png_of(width: int, height: int) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (width, height)).save(out, format="PNG", compress_level=9)
    return out.getvalue()


@pytest.fixture(scope="module")
def black_png() -> bytes:
    return black_png_of(BLACK_SIDE, BLACK_SIDE)


def _forward_args(repository: Path) -> list[str]:
    """The header forwarding flag, unless detserve already passes it (the gate's HTTP stamping)."""
    return [] if FORWARD in ServerOptions(repository).command(Path("/run/x")) else [FORWARD]


@pytest.fixture(scope="module")
def server(budget_repository: Path) -> Iterator[TritonServer]:
    with running_server(budget_repository, extra_args=_forward_args(budget_repository)) as srv:
        yield srv


@pytest.fixture(scope="module")
def small_budget_server(budget_repository: Path) -> Iterator[TritonServer]:
    """The server's override (detserve serve --max-request-pixels) over the build's value."""
    with running_server(budget_repository, max_request_pixels=SMALL_BUDGET) as srv:
        yield srv


def _image_input(images: list[bytes]) -> Any:
    import tritonclient.grpc as grpcclient

    inp = grpcclient.InferInput("IMAGE", [len(images), 1], "BYTES")
    inp.set_data_from_numpy(np.array([[b] for b in images], dtype=np.object_))
    return inp


def _infer(url: str, images: list[bytes], timeout_s: float = 60.0) -> tuple[str | None, str]:
    """(gRPC status name, message) of an error, or (None, "") when the request was served."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    with grpcclient.InferenceServerClient(url) as client:
        try:
            client.infer(MODEL, [_image_input(images)], client_timeout=timeout_s)
        except InferenceServerException as e:
            return str(e.status()), str(e.message())
    return None, ""


def png(width: int, height: int) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (width, height), (90, 120, 200)).save(out, format="PNG")
    return out.getvalue()


def black_png_attack(url: str, black: bytes, normal: bytes, rounds: int = 2) -> dict[str, Any]:
    """The finding's attack: 3 concurrent requests of 8 black PNGs (``rounds`` times each) while a
    normal client sends one image at a time with a 10 s deadline; its latencies and the attack's answers."""
    answers: list[tuple[str | None, str]] = []
    attackers = [
        threading.Thread(target=lambda: answers.extend(_infer(url, [black] * 8, 120.0) for _ in range(rounds))) for _ in range(3)
    ]
    latencies, failures = [], []
    started = time.monotonic()
    for t in attackers:
        t.start()
    while any(t.is_alive() for t in attackers) or len(latencies) + len(failures) < 4:
        t0 = time.monotonic()
        status, message = _infer(url, [normal], timeout_s=10.0)
        (latencies if status is None else failures).append(
            time.monotonic() - t0 if status is None else f"{status}: {message[:80]}"
        )
    for t in attackers:
        t.join()
    return {
        "attack_s": time.monotonic() - started,
        "normal_latencies_s": latencies,
        "normal_failures": failures,
        "attack": answers,
    }


def test_black_png_attack_leaves_a_normal_client_within_its_deadline(
    server: TritonServer, black_png: bytes, samples: dict[str, bytes]
) -> None:
    assert len(black_png) < 120_000  # the finding's 116 KB
    assert _infer(server.options.grpc_url, [samples["astronaut.jpg"]]) == (None, "")  # warm: the attack's effect only
    result = black_png_attack(server.options.grpc_url, black_png, samples["astronaut.jpg"])
    record(
        "request_budget.json",
        "black PNG attack (default budget)",
        {**result, "attack": sorted({a[1][:160] for a in result["attack"]})},
    )
    assert len(result["attack"]) == 6
    for status, message in result["attack"]:
        assert status == "StatusCode.INVALID_ARGUMENT", (status, message)
        assert f"request declares {8 * BLACK_SIDE**2} pixels" in message and "budget of 64000000" in message, message
        assert "--max-request-pixels" in message, message
    assert not result["normal_failures"], result
    assert max(result["normal_latencies_s"]) < 10.0, result


def test_request_just_under_the_default_budget_is_served(server: TritonServer, black_png: bytes) -> None:
    rest = black_png_of(4899, 4900)  # 39,992,976 + 24,005,100 = 63,998,076 pixels: just under 64 M
    assert _infer(server.options.grpc_url, [black_png, rest], timeout_s=120.0) == (None, "")


@pytest.mark.slow  # a second server; the override's parsing is unit-tested (test_backend_deadline.py)
def test_server_override_at_the_budget_is_served_and_one_pixel_more_is_refused(small_budget_server: TritonServer) -> None:
    url = small_budget_server.options.grpc_url
    assert _infer(url, [png(640, 480), png(480, 640)]) == (None, "")
    status, message = _infer(url, [png(640, 480), png(640, 481)])
    assert status == "StatusCode.INVALID_ARGUMENT"
    assert (
        f"request declares {SMALL_BUDGET + 640} pixels in its 2 image(s), over the per-request budget of {SMALL_BUDGET}"
        in message
    )


def test_over_budget_request_fails_alone_beside_normal_ones(server: TritonServer, black_png: bytes) -> None:
    url = server.options.grpc_url
    batches = [[png(320, 240)]] * 3 + [[black_png] * 2] + [[png(320, 240)]] * 3  # sent together: one execute, or a few
    answers: list[tuple[str | None, str]] = [("", "")] * len(batches)

    def send(i: int) -> None:
        answers[i] = _infer(url, batches[i])

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(batches))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert answers[3][0] == "StatusCode.INVALID_ARGUMENT" and "per-request budget of 64000000" in answers[3][1], answers[3]
    assert [a for i, a in enumerate(answers) if i != 3] == [(None, "")] * 6


class _UnixHTTP(http.client.HTTPConnection):
    def __init__(self, path: Path) -> None:
        super().__init__("localhost", timeout=60)
        self.socket_path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(str(self.socket_path))


def _http_infer(socket_path: Path, images: list[bytes], headers: dict[str, str]) -> tuple[int, str]:
    """An HTTP inference in the binary-data extension, as the gate forwards it to tritonserver."""
    head = {
        "inputs": [{"name": "IMAGE", "shape": [len(images), 1], "datatype": "BYTES", "parameters": {"binary_data_size": sum(len(b) + 4 for b in images)}}],
        "outputs": [{"name": "num_detections", "parameters": {"binary_data": False}}],
    }  # fmt: skip
    header = json.dumps(head).encode()
    body = header + b"".join(len(b).to_bytes(4, "little") + b for b in images)
    conn = _UnixHTTP(socket_path)
    try:
        conn.request("POST", f"/v2/models/{MODEL}/infer", body, {"Inference-Header-Content-Length": str(len(header)), **headers})
        response = conn.getresponse()
        return response.status, response.read().decode(errors="replace")
    finally:
        conn.close()


def test_http_stamps_drop_late_requests_before_their_headers_are_read(server: TritonServer, black_png: bytes) -> None:
    assert server.runtime is not None
    sock = upstream_in(server.runtime).http_socket
    now = time.time()
    late = {"detserve-arrival": f"{now - 5:.3f}", "detserve-timeout": "1S"}  # nginx's $msec, grpc-timeout format
    status, body = _http_infer(sock, [black_png] * 8, late)
    assert status != 200 and "deadline exceeded" in body and "budget" not in body, (status, body)
    status, body = _http_infer(sock, [png(64, 48)], {"detserve-arrival": f"{time.time():.3f}", "detserve-timeout": "10S"})
    assert status == 200 and '"num_detections"' in body, (status, body)
