"""Issue 20's gate findings replayed against a real tritonserver behind a real nginx gate.

- finding 1 / 7e: an 80 KB nested-JSON body crashed tritonserver (Triton 2.51's parser recurses);
  the gate refuses any HTTP request whose JSON part is over ``max_json_bytes``, legitimate requests pass;
- finding 3 / 7d: 40 channels x 110 ``ModelStreamInfer`` calls that never send took every upstream
  connection; the gate admits ``client_requests`` per address and refuses the rest, another client is
  served; a stream that sends nothing is closed after ``idle_timeout_s``;
- finding 5: HTTP requests get a deadline (``detserve-timeout``), abandoned ones are not decoded;
- 7b/7c: the admin key is compared exactly; 7f: the workers are not root and nobody reaches the sockets;
- 7g: the gate listens on ``::1``.
Figures go to out/reports/gate_limits.json.
"""

from __future__ import annotations

import asyncio
import http.client
import io
import json
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from detserve.ops.gate import GateConfig, private_directory, upstream_in
from detserve.ops.gate_rules import GATE_USER
from detserve.ops.nginx import Gate
from detserve.ops.server import TritonServer, free_port, running_server
from tests.memory_probe import MiB
from tests.reports import record
from tests.unprivileged import run_as_nobody

KEY = "Gate-limits-" + uuid.uuid4().hex
ECHO_CONFIG = """name: "echo"
backend: "python"
max_batch_size: 0
input [{ name: "IMAGE" data_type: TYPE_STRING dims: [-1, -1] }]
output [{ name: "OUT" data_type: TYPE_INT32 dims: [1] }]
"""
ECHO_MODEL = """import numpy as np
import triton_python_backend_utils as pb_utils
class TritonPythonModel:
    def execute(self, requests):
        return [pb_utils.InferenceResponse([pb_utils.Tensor("OUT", np.array([1], dtype=np.int32))]) for _ in requests]
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    """A trivial echo model: what the gate lets through matters here, not the model."""
    repo = tmp_path_factory.mktemp("gate_repository")
    (repo / "echo" / "1").mkdir(parents=True)
    (repo / "echo" / "config.pbtxt").write_text(ECHO_CONFIG)
    (repo / "echo" / "1" / "model.py").write_text(ECHO_MODEL)
    with running_server(repo, admin_key=KEY) as srv:
        yield srv


@pytest.fixture(scope="module")
def demo_server(demo_copy: Callable[[str], Path]) -> Iterator[TritonServer]:
    """The demo detector: real preprocessing, which reads the gate's deadline stamps."""
    with running_server(demo_copy("gate_demo_repository")) as srv:
        yield srv


def _record(key: str, value: object) -> None:
    record("gate_limits.json", key, value)


def _http(port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None, **kw: object):  # type: ignore[no-untyped-def]
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30, **kw)  # type: ignore[arg-type]
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def _binary_request(data: bytes) -> tuple[bytes, dict[str, str]]:
    """A KServe binary-data-extension request: a small JSON header, the BYTES element after it."""
    header = json.dumps(
        {"inputs": [{"name": "IMAGE", "shape": [1, 1], "datatype": "BYTES", "parameters": {"binary_data_size": len(data) + 4}}]}
    ).encode()
    return header + len(data).to_bytes(4, "little") + data, {"Inference-Header-Content-Length": str(len(header))}


def _rss_mib(pid: int) -> float:
    return sum(int(line.split()[1]) for line in open(f"/proc/{pid}/status") if line.startswith("VmRSS")) / 1024


def _workers(gate: Gate) -> list[tuple[int, str]]:
    assert gate.process is not None
    out = subprocess.run(["ps", "-o", "pid=,user=", "--ppid", str(gate.process.pid)], capture_output=True, text=True).stdout
    return [(int(p), u) for p, u in (line.split() for line in out.splitlines())]


# ---- finding 1 / 7e: the JSON part is capped ------------------------------------------------------------------


def test_nested_json_is_refused_and_legitimate_requests_pass(server: TritonServer) -> None:
    port = server.options.http_port
    bomb = b'{"inputs":[{"name":"IMAGE","shape":[1,1],"datatype":"BYTES","data":' + b"[" * 40000 + b"]" * 40000 + b"}]}"
    status, body = _http(port, "POST", "/v2/models/echo/infer", bomb)
    assert status == 413 and b"8192 bytes" in body and b"binary-data extension" in body, body
    small = json.dumps({"inputs": [{"name": "IMAGE", "shape": [1, 1], "datatype": "BYTES", "data": ["abc"]}]}).encode()
    assert _http(port, "POST", "/v2/models/echo/infer", small)[0] == 200
    image, headers = _binary_request(bytes(2 * MiB))  # over 1 MiB: through nginx's body file, as its worker user
    status, body = _http(port, "POST", "/v2/models/echo/infer", image, headers)
    assert status == 200 and b'"outputs"' in body, body[:300]
    assert server.process is not None and server.process.poll() is None  # tritonserver never saw the bomb


@pytest.mark.parametrize(
    ("header", "body_kind", "status", "words"),
    [
        ("-5", "small", 400, b"decimal number"),
        ("0x10", "small", 400, b"decimal number"),
        ("9000", "image", 413, b"8192 bytes"),
        ("+1", "small", 400, b"decimal number"),
        ("over", "small", 400, b"larger than the request body"),
        (None, "chunked", 411, b"Content-Length"),
    ],
)
def test_unboundable_json_parts_are_refused(
    server: TritonServer, header: str | None, body_kind: str, status: int, words: bytes
) -> None:
    small = json.dumps({"inputs": [{"name": "IMAGE", "shape": [1, 1], "datatype": "BYTES", "data": ["abc"]}]}).encode()
    body = small if body_kind != "image" else _binary_request(bytes(100_000))[0]
    headers = {} if header is None else {"Inference-Header-Content-Length": str(len(small) + 1) if header == "over" else header}
    conn = http.client.HTTPConnection("127.0.0.1", server.options.http_port, timeout=30)
    try:
        if body_kind == "chunked":
            conn.request("POST", "/v2/models/echo/infer", body=iter([small]), headers=headers, encode_chunked=True)
        else:
            conn.request("POST", "/v2/models/echo/infer", body=body, headers=headers)
        resp = conn.getresponse()
        got, text = resp.status, resp.read()
    finally:
        conn.close()
    assert got == status and words in text, (got, text)


def test_a_large_json_body_never_reaches_tritonserver(server: TritonServer) -> None:
    """7e: a 114 MiB JSON body took tritonserver from 46 MB to 1 GB; now it is refused from its length."""
    assert server.process is not None
    before = _rss_mib(server.process.pid)
    body = b'{"inputs":[{"name":"IMAGE","shape":[1,1],"datatype":"BYTES","data":["' + b"a" * (114 * MiB) + b'"]}]}'
    status, text = _http(server.options.http_port, "POST", "/v2/models/echo/infer", body)
    after = _rss_mib(server.process.pid)
    _record("json_114MiB", {"status": status, "tritonserver_rss_mib_before": before, "after": after})
    assert status == 413 and b"JSON part" in text
    assert after - before < 32, (before, after)


# ---- finding 3 / 7d: per-client limits ------------------------------------------------------------------------


async def _idle_streams(port: int, channels: int, per_channel: int, hold_s: float) -> dict[str, int]:
    """``channels`` x ``per_channel`` ModelStreamInfer calls from 127.0.0.1 that send nothing; their outcomes."""
    import grpc
    from tritonclient.grpc import service_pb2_grpc

    never = asyncio.Event()

    async def silent():  # type: ignore[no-untyped-def]
        await never.wait()
        yield  # pragma: no cover - never reached

    outcomes: dict[str, int] = {}
    # one TCP connection each (channels to one target otherwise share a subchannel, and its 128-stream cap)
    options = [("grpc.use_local_subchannel_pool", 1)]
    chans = [grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) for _ in range(channels)]
    try:
        calls = [
            service_pb2_grpc.GRPCInferenceServiceStub(c).ModelStreamInfer(silent()) for c in chans for _ in range(per_channel)
        ]

        async def outcome(call) -> str:  # type: ignore[no-untyped-def]
            try:
                code = await asyncio.wait_for(call.code(), hold_s)
                return f"{code.name}: {await call.details()}"
            except asyncio.TimeoutError:
                return "held open"

        for text in await asyncio.gather(*(outcome(c) for c in calls)):
            outcomes[text] = outcomes.get(text, 0) + 1
        for c in calls:
            c.cancel()
    finally:
        never.set()
        await asyncio.gather(*(c.close() for c in chans))
    return outcomes


def test_idle_stream_attack_leaves_other_clients_served(server: TritonServer) -> None:
    """40 channels x 110 silent streams from 127.0.0.1 (finding 3); meanwhile a client from 127.0.0.2."""
    assert server.process is not None and server.gate is not None
    port, (worker, _user) = server.options.http_port, _workers(server.gate)[0]
    rss0 = {"tritonserver": _rss_mib(server.process.pid), "nginx_worker": _rss_mib(worker)}
    result: dict[str, dict[str, int]] = {}
    attack = threading.Thread(target=lambda: result.update(o=asyncio.run(_idle_streams(server.options.grpc_port, 40, 110, 15))))
    attack.start()
    image, headers = _binary_request(bytes(100_000))
    latencies, rss = [], {}
    try:
        time.sleep(6)  # the streams are open
        rss = {"tritonserver": _rss_mib(server.process.pid), "nginx_worker": _rss_mib(worker)}
        for _ in range(3):
            t0 = time.monotonic()
            status, body = _http(port, "POST", "/v2/models/echo/infer", image, headers, source_address=("127.0.0.2", 0))
            latencies.append(time.monotonic() - t0)
            assert status == 200, body[:300]
    finally:
        attack.join()
    outcomes = result["o"]
    _record("idle_stream_attack", {"outcomes": outcomes, "latencies_s": latencies, "rss_mib_before": rss0, "rss_mib_during": rss})
    assert max(latencies) < 10, latencies  # the deadline
    refused = sum(n for text, n in outcomes.items() if text.startswith("RESOURCE_EXHAUSTED") and "per-client limit" in text)
    assert outcomes.get("held open", 0) <= 128 and refused >= 40 * 110 - 128, outcomes


@pytest.fixture
def custom_gate(server: TritonServer) -> Iterator[type[Gate]]:
    """Start a second gate (own ports, own limits) in front of the module's tritonserver."""
    started: list[tuple[Gate, Path]] = []

    def make(host: str = "127.0.0.1", **limits: object) -> Gate:
        assert server.runtime is not None
        workdir = private_directory("detserve-gate-")
        ports = free_port(), free_port()
        gate = Gate(GateConfig(workdir, host, *ports, (upstream_in(server.runtime),), **limits))  # type: ignore[arg-type]
        started.append((gate, workdir))
        gate.start()
        return gate

    yield make  # type: ignore[misc]
    for gate, workdir in started:
        gate.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def _stream(port: int, messages: int, size: int, idle_s: float = 0.0) -> tuple[int, str]:
    """A ModelStreamInfer stream to the echo model: (responses received, final status or error)."""
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    def request() -> object:
        r = service_pb2.ModelInferRequest(model_name="echo")
        t = r.inputs.add(name="IMAGE", datatype="BYTES")
        t.shape.extend([1, 1])
        r.raw_input_contents.append(size.to_bytes(4, "little") + bytes(size))
        return r

    def gen():  # type: ignore[no-untyped-def]
        time.sleep(idle_s)
        for _ in range(messages):
            yield request()
            time.sleep(0.05)  # paced: responses begin before the stream reaches the limit

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        responses = 0
        try:
            for _ in service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(gen(), timeout=60):
                responses += 1
        except grpc.RpcError as e:
            return responses, f"{e.code().name}: {e.details()}"
    return responses, "OK"


def test_streams_are_limited_in_total_and_closed_when_idle(custom_gate) -> None:  # type: ignore[no-untyped-def]
    """7d: nginx counts a stream's whole body against client_max_body_size (no per-message limit): a
    stream is refused with RESOURCE_EXHAUSTED when its first message is over, reset once its responses
    have begun; a stream that sends nothing for idle_timeout_s is closed."""
    gate = custom_gate(max_request_bytes=1024 * 1024, idle_timeout_s=2)
    port = gate.config.grpc_port
    assert _stream(port, 5, 100_000) == (5, "OK")
    responses, status = _stream(port, 1, 2 * 1024 * 1024)
    assert responses == 0 and status.startswith("RESOURCE_EXHAUSTED") and "ModelStreamInfer stream counts" in status
    long = _stream(port, 30, 100_000)
    assert 1 <= long[0] < 11 and long[1].startswith("INTERNAL") and "RST_STREAM" in long[1], long
    t0 = time.monotonic()
    idle = _stream(port, 1, 10, idle_s=30)
    idle_s = time.monotonic() - t0
    _record("streams", {"max_request_bytes": 1024 * 1024, "30x100KB": long, "idle": [*idle, idle_s]})
    assert idle[0] == 0 and "RST_STREAM" in idle[1] and idle_s < 10, idle


# ---- finding 5: the HTTP deadline -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def slow_png() -> bytes:
    """An all-black PNG that compresses to ~50 KB but takes seconds to decode (finding 5's cheap-request shape)."""
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (4000, 4000)).save(out, format="PNG", optimize=False)
    return out.getvalue()


def _counts(server: TritonServer) -> dict[str, float]:
    """The ensemble's failed requests and preprocessing's total compute time (a dropped request is a
    success with an error response for the python backend's statistics, and costs no compute)."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(server.internal_url)
    try:
        stats = {m["name"]: m["inference_stats"] for m in client.get_inference_statistics(as_json=True)["model_stats"]}
    finally:
        client.close()
    return {
        "demo_fail": int(stats["demo"]["fail"].get("count", 0)),
        "preprocess_compute_s": int(stats["demo_preprocess"]["compute_infer"].get("ns", 0)) / 1e9,
    }


@pytest.mark.slow
def test_abandoned_http_requests_are_not_decoded(demo_server: TritonServer, slow_png: bytes) -> None:
    server = demo_server
    port = server.options.http_port
    body, headers = _binary_request(slow_png)
    t0 = time.monotonic()
    assert _http(port, "POST", "/v2/models/demo/infer", body, headers)[0] in (200, 400)  # a decode's cost
    decode_s = time.monotonic() - t0
    before = _counts(server)

    def send(timeout_header: str | None, client_timeout: float) -> None:
        h = {**headers, **({"detserve-timeout": timeout_header} if timeout_header else {})}
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=client_timeout)
        try:
            conn.request("POST", "/v2/models/demo/infer", body=body, headers=h)
            conn.getresponse().read()
        except TimeoutError:
            pass  # the client gives up: that is the point
        finally:
            conn.close()

    blocker = threading.Thread(target=send, args=(None, 120))  # holds preprocessing for ~decode_s
    blocker.start()
    time.sleep(0.2)
    abandoned = [threading.Thread(target=send, args=("1S", 1.0)) for _ in range(3)]
    for t in abandoned:
        t.start()
    for t in [blocker, *abandoned]:
        t.join()
    time.sleep(3 * decode_s + 2)  # what decoding them would have taken
    after = _counts(server)
    _record("http_deadline", {"decode_s": decode_s, "before": before, "after": after})
    assert after["demo_fail"] > before["demo_fail"], (before, after)  # refused: "deadline exceeded ... dropped undecoded"
    # the blocker's decode, not four (before the HTTP stamping: all four were decoded)
    assert after["preprocess_compute_s"] - before["preprocess_compute_s"] < 2 * decode_s, (decode_s, before, after)


# ---- 7b / 7c / 7f / 7g --------------------------------------------------------------------------------------------


def test_a_client_connection_is_not_recycled_every_thousand_requests(server: TritonServer) -> None:
    """nginx closes an HTTP/2 connection after ``keepalive_requests`` (default 1000) with a GOAWAY; a request the
    client started as it came failed (seen: ``UNAVAILABLE Stream removed (GOAWAY received; Error code: 0)``, one
    frame in ~1 000 in ``detserve bench-stream`` rows; the client's local port changed every ~1 000 requests).
    2 500 calls with 8 in flight on one channel: one connection throughout, no failure."""
    import numpy as np
    import psutil
    import tritonclient.grpc as grpcclient

    port = server.options.grpc_port
    me = psutil.Process()
    ports: set[int] = set()
    errors: list[str] = []
    free, done, lock = threading.Semaphore(8), threading.Event(), threading.Lock()
    count = [0]
    total = 2500

    def answered(result: object, error: object) -> None:
        with lock:
            count[0] += 1
            if error is not None:
                errors.append(str(error))
            if count[0] == total:
                done.set()
        free.release()

    data = np.array([[b"x"]], dtype=object)
    with grpcclient.InferenceServerClient(server.options.grpc_url) as client:
        for i in range(total):
            free.acquire()
            item = grpcclient.InferInput("IMAGE", [1, 1], "BYTES")
            item.set_data_from_numpy(data)
            client.async_infer("echo", [item], answered)
            if i % 100 == 0:
                ports |= {c.laddr.port for c in me.net_connections("tcp") if c.raddr and c.raddr.port == port}
        assert done.wait(120)
    _record("connection_reuse", {"requests": total, "client_ports": len(ports), "failed": len(errors)})
    assert errors == [] and len(ports) == 1, (ports, errors[:3])


def test_the_admin_key_is_exact_and_case_sensitive(server: TritonServer) -> None:
    port = server.options.http_port
    assert _http(port, "POST", "/v2/repository/index", b"{}", {"admin-key": KEY})[0] == 200
    for wrong in (KEY.lower(), KEY.upper(), KEY[:-1] + ".", "." * len(KEY), "~" + "." * 15):
        assert _http(port, "POST", "/v2/repository/index", b"{}", {"admin-key": wrong})[0] == 403, wrong


def test_workers_are_not_root_and_nobody_reaches_the_sockets(server: TritonServer) -> None:
    import pwd

    try:
        pwd.getpwnam(GATE_USER)
    except KeyError:
        pytest.skip(f"the user {GATE_USER} does not exist (scripts/setup.sh creates it as root)")
    assert server.gate is not None and server.runtime is not None
    users = {u for _pid, u in _workers(server.gate)}
    assert users and "root" not in users, users
    assert _http(server.options.http_port, "GET", "/v2/health/ready")[0] == 200  # workers reach the sockets
    sockets = [str(server.runtime / "grpc.sock:0"), str(server.runtime / "http.sock")]
    result = run_as_nobody(
        "import json, socket\nout = {}\nfor path in ARGS['sockets']:\n"
        "    s = socket.socket(socket.AF_UNIX)\n"
        "    try:\n        s.connect(path); out[path] = 'connected'\n"
        "    except OSError as e:\n        out[path] = type(e).__name__\n"
        "print(json.dumps(out))",
        sockets=sockets,
    )
    assert all(v == "PermissionError" for v in result.values()), result


def test_the_gate_listens_on_ipv6_loopback(custom_gate) -> None:  # type: ignore[no-untyped-def]
    if not socket.has_ipv6 or not Path("/proc/net/if_inet6").exists():
        pytest.skip("no IPv6 on this machine")
    gate = custom_gate(host="::1")
    conn = http.client.HTTPConnection("::1", gate.config.http_port, timeout=10)
    try:
        conn.request("GET", "/v2/health/ready")
        assert conn.getresponse().status == 200
    finally:
        conn.close()
