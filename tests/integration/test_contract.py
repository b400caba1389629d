"""docs/contract.md, executed: every example in it runs against the real server (gate + demo repository)
and its detections must equal ``detserve detect --json``'s; every row of its error table is a request here.

Examples are the fenced blocks of the doc preceded by ``<!-- contract-example: NAME [FILE] -->``: ``sh``
blocks run in bash, ``python`` blocks in this interpreter, a block with FILE is written to that file (the
Node script); ``<!-- contract-output: NAME -->`` is a sample of what example NAME prints, checked against
what it prints now. ``<!-- contract-setup: npm -->`` marks what scripts/setup.sh does instead (checked against
scripts/node/package.json). A fenced block with neither marker fails the test: nothing in the doc is unrun.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from detserve.ops.server import TritonServer

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "contract.md"
NODE_MODULES = ROOT / ".node" / "node_modules"
_MARKER = re.compile(r"<!-- contract-(example|setup|output): (\S+)(?: (\S+))? -->\n```(\w+)\n(.*?)```", re.S)
MODEL = "demo"
CONTROLS = ["--score-threshold", "0.3", "--max-det", "10"]  # what the examples send


@dataclass(frozen=True)
class Block:
    kind: str  # example | setup | output (what the example of that name prints)
    name: str
    file: str | None
    lang: str
    code: str


def doc_blocks() -> dict[str, Block]:
    text = DOC.read_text()
    blocks = {
        (m.group(2) if m.group(1) != "output" else m.group(2) + ":output"): Block(*m.groups()) for m in _MARKER.finditer(text)
    }
    fences = len(re.findall(r"^```\w+\n", text, re.M))
    assert fences == len(blocks), f"{fences - len(blocks)} code block(s) of {DOC.name} have no contract-example marker"
    return blocks


def test_every_block_is_marked_and_the_npm_line_is_what_setup_installs() -> None:
    blocks = doc_blocks()
    assert {b.name for b in blocks.values() if b.kind == "example"} >= {
        "curl-binary", "curl-raw", "protoset", "node-script", "node-run", "python-grpc", "python-http", "labels-http",
    }  # fmt: skip
    pinned = json.loads((ROOT / "scripts" / "node" / "package.json").read_text())["dependencies"]
    assert sorted(re.findall(r"(@grpc/[a-z-]+)@([0-9.]+)", blocks["npm"].code)) == sorted(pinned.items())


@pytest.fixture(scope="module")
def contract_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    """The demo detector built as the raw-body shortcut needs it: IMAGE its only input (`--no-frames-input`;
    Triton deduces a raw body's input only for a model with one)."""
    from dataclasses import replace

    from converters.repository import build_repository
    from detserve.app.demo import demo_build_request
    from detserve.ops.server import running_server

    repo = tmp_path_factory.mktemp("contract_repo")
    request = demo_build_request(repo)
    build_repository(replace(request, options=replace(request.options, frames_input=False)))
    with running_server(repo) as srv:
        yield srv


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from detserve.app.demo import demo_images

    work = tmp_path_factory.mktemp("contract")
    shutil.copy(demo_images(work / "images")[0], work / "photo.png")
    return work


def _env(server: TritonServer) -> dict[str, str]:
    opts = server.options
    env = dict(os.environ)
    env.update(
        DETSERVE_HTTP=f"{opts.host}:{opts.http_port}",
        DETSERVE_GRPC=opts.grpc_url,
        PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '')}",  # python3 = this venv's (tritonclient)
        NODE_PATH=str(NODE_MODULES),
    )
    return env


def _reference(server: TritonServer, workdir: Path, controls: list[str]) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "detserve.app.cli", "detect", str(workdir / "photo.png"), "--model", MODEL,
         "--url", server.options.grpc_url, "--json", *controls],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    return dict(json.loads(out.stdout)[0])


def _same(got: dict[str, Any], ref: dict[str, Any]) -> None:
    """detect --json rounds boxes to 0.01 px and scores to 1e-5."""
    n = int(got["num_detections"])
    assert n == ref["num_detections"] > 0
    assert [int(v) for v in got["labels"]] == ref["labels"]
    np.testing.assert_allclose(np.asarray(got["boxes"], np.float64).reshape(n, 4), ref["boxes"], atol=0.006)
    np.testing.assert_allclose(got["scores"], ref["scores"], atol=6e-6)


def _run(block: Block, workdir: Path, env: dict[str, str]) -> str:
    if block.file:
        (workdir / block.file).write_text(block.code)
        return ""
    command = ["bash", "-euo", "pipefail", "-c", block.code] if block.lang == "sh" else [sys.executable, "-c", block.code]
    done = subprocess.run(command, cwd=workdir, env=env, capture_output=True, timeout=120)
    assert done.returncode == 0, f"{block.name} failed: {done.stderr.decode(errors='replace')[-2000:]}"
    return done.stdout.decode()


@pytest.fixture(scope="module")
def reference(contract_server: TritonServer, workdir: Path) -> dict[str, Any]:
    return _reference(contract_server, workdir, CONTROLS)


@pytest.mark.parametrize("name", ["curl-binary", "python-grpc", "python-http"])
def test_example_gives_detect_s_detections(
    name: str, contract_server: TritonServer, workdir: Path, reference: dict[str, Any]
) -> None:
    out = _run(doc_blocks()[name], workdir, _env(contract_server))
    got = json.loads(out)
    if "outputs" in got:  # curl: Triton's JSON answer
        data = {o["name"]: o["data"] for o in got["outputs"]}
        n = data["num_detections"][0]
        got = {"num_detections": n, "boxes": data["boxes"][: 4 * n], "scores": data["scores"][:n], "labels": data["labels"][:n]}
    _same(got, reference)


def test_raw_body_shortcut_gives_detect_s_detections_with_the_model_defaults(
    contract_server: TritonServer, workdir: Path
) -> None:
    header = json.loads(_run(doc_blocks()["curl-raw"], workdir, _env(contract_server)))
    body = (workdir / "response.bin").read_bytes()
    headers = (workdir / "headers.txt").read_text()
    found = re.search(r"(?im)^inference-header-content-length:\s*(\d+)", headers)
    assert found, headers
    offset = int(found.group(1))  # the binary outputs follow the JSON header
    data = {}
    for out in header["outputs"]:
        size = out["parameters"]["binary_data_size"]
        dtype = np.float32 if out["datatype"] == "FP32" else np.int32
        data[out["name"]] = np.frombuffer(body[offset : offset + size], dtype="<" + np.dtype(dtype).str[1:])
        offset += size
    n = int(data["num_detections"][0])
    got = {"num_detections": n, "boxes": data["boxes"][: 4 * n], "scores": data["scores"][:n], "labels": data["labels"][:n]}
    _same(got, _reference(contract_server, workdir, []))


def test_node_grpc_example_gives_detect_s_detections(
    contract_server: TritonServer, workdir: Path, reference: dict[str, Any]
) -> None:
    if shutil.which("node") is None:
        pytest.skip("node is not installed (scripts/setup.sh installs it from Debian when run as root)")
    if not (NODE_MODULES / "@grpc" / "grpc-js").is_dir():
        pytest.skip("the npm packages are not installed: run scripts/setup.sh (npm ci into .node/)")
    blocks = doc_blocks()
    env = _env(contract_server)
    _run(blocks["protoset"], workdir, env)
    _run(blocks["node-script"], workdir, env)
    _same(json.loads(_run(blocks["node-run"], workdir, env)), reference)


def test_labels_example_prints_the_documented_names(contract_server: TritonServer, workdir: Path) -> None:
    blocks = doc_blocks()
    live = json.loads(_run(blocks["labels-http"], workdir, _env(contract_server)))
    shown = json.loads(blocks["labels-http:output"].code)
    assert (live["model"], live["names"]) == (shown["model"], shown["names"]) == (MODEL, shown["names"])
    assert live["names"][1:] == ["circle", "square", "triangle", "star", "cross"]


# ---- the error table, row by row -------------------------------------------------------------------


def _post(
    server: TritonServer, body: bytes, headers: dict[str, str], path: str = f"/v2/models/{MODEL}/infer"
) -> tuple[int, str, str]:
    req = urllib.request.Request(f"http://{server.options.host}:{server.options.http_port}{path}", data=body, method="POST")
    for k, v in headers.items():
        req.add_header(k, v)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.headers.get("Content-Type", ""), r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type", ""), e.read().decode(errors="replace")


def _binary_request(image: bytes, prefix: bool = True, params: dict[str, Any] | None = None) -> tuple[bytes, int]:
    element = (struct.pack("<I", len(image)) if prefix else b"") + image
    header: dict[str, Any] = {
        "inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [1, 1], "parameters": {"binary_data_size": len(element)}}],
        "outputs": [{"name": "num_detections"}],
    }
    if params:
        header["parameters"] = params
    text = json.dumps(header).encode()
    return text + element, len(text)


def _error(status: int, ctype: str, body: str, code: int) -> str:
    assert status == code, body
    assert ctype == "application/json", ctype
    return str(json.loads(body)["error"])


def test_missing_length_prefix_is_named_over_http_and_grpc(contract_server: TritonServer, workdir: Path) -> None:
    image = (workdir / "photo.png").read_bytes()
    body, n = _binary_request(image, prefix=False)
    message = _error(*_post(contract_server, body, {"Inference-Header-Content-Length": str(n)}), 400)
    assert "BYTES elements are length-prefixed" in message and "start of a PNG file" in message, message

    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    request = service_pb2.ModelInferRequest(model_name=MODEL)
    inp = request.inputs.add(name="IMAGE", datatype="BYTES")
    inp.shape.extend([1, 1])
    request.raw_input_contents.append(image)
    with grpc.insecure_channel(contract_server.options.grpc_url) as channel, pytest.raises(grpc.RpcError) as caught:
        service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=60)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = str(caught.value.details())
    assert "BYTES elements are length-prefixed" in details and "start of a PNG file" in details, details


@pytest.mark.parametrize(
    ("header", "code", "expected"),
    [
        ("abc", 400, "Inference-Header-Content-Length must be a decimal number"),
        ("8000", 400, "Inference-Header-Content-Length is larger than the request body"),
        ("20", 500, "the header must be the exact byte length of the JSON"),
    ],
)
def test_bad_inference_header_content_length_names_the_header(
    contract_server: TritonServer, workdir: Path, header: str, code: int, expected: str
) -> None:
    body, _ = _binary_request((workdir / "photo.png").read_bytes()[:2000])
    assert expected in _error(*_post(contract_server, body, {"Inference-Header-Content-Length": header}), code)


def test_base64_json_data_is_named(contract_server: TritonServer, workdir: Path) -> None:
    import base64

    text = base64.b64encode((workdir / "photo.png").read_bytes()[:300]).decode()
    body = json.dumps({"inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [1, 1], "data": [text]}]}).encode()
    message = _error(*_post(contract_server, body, {"Content-Type": "application/json"}), 400)
    assert "base64 text of a PNG file? JSON data of a BYTES input is not base64-decoded" in message, message


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"max_det": "3.5"}, "max_det must be an integer, got '3.5'"),
        ({"score_threshold": "abc"}, "score_threshold must be a number, got 'abc'"),
        ({"score_threshold": "1.5"}, "score_threshold must be in [0, 1], got 1.5"),
        ({"conf": "0.3"}, "unknown request parameter(s) 'conf': accepted are score_threshold, iou_threshold, max_det"),
    ],
)
def test_bad_controls_are_named_as_json(
    contract_server: TritonServer, workdir: Path, params: dict[str, Any], expected: str
) -> None:
    body, n = _binary_request((workdir / "photo.png").read_bytes(), params=params)
    assert expected in _error(*_post(contract_server, body, {"Inference-Header-Content-Length": str(n)}), 400)


def test_whole_number_max_det_as_string_is_read(contract_server: TritonServer, workdir: Path) -> None:
    body, n = _binary_request((workdir / "photo.png").read_bytes(), params={"max_det": "3.0"})
    status, _, text = _post(contract_server, body, {"Inference-Header-Content-Length": str(n)})
    assert status == 200 and json.loads(text)["outputs"][0]["data"] == [3]


def test_unknown_model_is_404_json(contract_server: TritonServer) -> None:
    assert "unknown model" in _error(*_post(contract_server, b"{}", {}, path="/v2/models/nope/infer"), 404)


def test_body_shorter_than_its_content_length_is_dropped_within_seconds(contract_server: TritonServer) -> None:
    """Before: the gate waited idle_timeout_s (60 s) for the missing bytes; now 10 s (HTTP_BODY_TIMEOUT_S)."""
    opts = contract_server.options
    with socket.create_connection((opts.host, opts.http_port), timeout=90) as sock:
        sock.sendall(
            f"POST /v2/models/{MODEL}/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n".encode() + b'{"inputs":[]}'
        )
        start = time.monotonic()
        received = b""
        while chunk := sock.recv(4096):
            received += chunk
        waited = time.monotonic() - start
    assert waited < 30, f"the connection stayed open {waited:.1f} s"  # 10 s configured; generous for a busy CI
    assert not received.startswith(b"HTTP/1.1 200")


def test_latency_percentiles_are_served_as_the_p99_rule_reads_them(
    contract_server: TritonServer, reference: dict[str, Any]
) -> None:
    """Summary latencies are on by default; docker/prometheus-rules.yml's p99 rule selects a live series."""
    yaml = pytest.importorskip("yaml")

    rules = yaml.safe_load((ROOT / "docker" / "prometheus-rules.yml").read_text())["groups"][0]["rules"]
    expr = next(r["expr"] for r in rules if r["record"] == "detserve:request_latency_us:p99")
    found = re.search(r"(nv_[a-z_]+)\{([^}]*)\}", expr)
    assert found, expr
    metric, selector = found.groups()
    url = f"http://127.0.0.1:{contract_server.options.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=30) as r:
        lines = r.read().decode().splitlines()
    series = [line for line in lines if line.startswith(metric + "{") and f'model="{MODEL}"' in line]
    assert any('quantile="0.99"' in line for line in series), series
    assert 'quantile="0.99"' in selector and "preprocess|core|postprocess" in selector
