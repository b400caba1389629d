"""The gate's error rewrites (issue 24 part 3): what the rendered nginx config does, and that the signature
"lengths" it names are what real image files' first 4 bytes read as a little-endian length."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest
from PIL import Image

from detserve.ops.gate import GateConfig, Upstream, render_config
from detserve.ops.gate_rules import HTTP_BODY_TIMEOUT_S, SIGNATURE_LENGTHS


def _file(fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 200, 30)).save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize(("fmt", "name"), [("PNG", "PNG"), ("JPEG", "JPEG"), ("GIF", "GIF"), ("WEBP", "WebP"), ("TIFF", "TIFF")])
def test_a_file_sent_without_its_prefix_is_named(fmt: str, name: str) -> None:
    as_length = int.from_bytes(_file(fmt)[:4], "little")
    assert (name, as_length) in SIGNATURE_LENGTHS


def _servers(tmp_path: Path) -> tuple[str, str]:
    ups = (Upstream(tmp_path / "grpc.sock", tmp_path / "http.sock"),)
    text = render_config(GateConfig(tmp_path, "127.0.0.1", 18001, 18000, ups))
    grpc_part, http_part = text.split("listen 127.0.0.1:18000;")
    return grpc_part, http_part


def test_http_errors_are_json_and_carry_the_hints(tmp_path: Path) -> None:
    _, http = _servers(tmp_path)
    assert "proxy_hide_header Content-Type;" in http
    assert "add_header Content-Type $detserve_content_type always;" in http
    subs = dict(re.findall(r'sub_filter "([^"]*)" "([^"]*)";', http))
    assert "BYTES elements are length-prefixed" in subs["incomplete string data"]
    assert "start of a PNG file" in subs["expecting string of length 1196314761 "]
    assert "Inference-Header-Content-Length" in subs["failed to parse the request JSON buffer"]
    # nginx strings in double quotes, the replacement inside a JSON string: no quote, backslash or variable
    assert all(not set('"\\$') & set(a + b) for a, b in subs.items())
    assert "starting b'iVBOR" in subs


def test_only_unary_model_infer_rewrites_grpc_message(tmp_path: Path) -> None:
    """grpc_hide_header also drops a grpc-message sent in trailers: a stream's own message must pass."""
    grpc_part, _ = _servers(tmp_path)
    assert grpc_part.count("grpc_hide_header grpc-message;") == 1
    block = grpc_part.split("location = /inference.GRPCInferenceService/ModelInfer {", 1)[1].split("}", 1)[0]
    assert "grpc_hide_header grpc-message;" in block and "$detserve_grpc_message" in block
    assert "add_trailer" not in grpc_part  # it turned trailers-only errors into responses clients reject


def test_an_http_body_that_stalls_is_dropped_sooner_than_a_grpc_stream(tmp_path: Path) -> None:
    grpc_part, http = _servers(tmp_path)
    assert f"client_body_timeout {HTTP_BODY_TIMEOUT_S}s;" in http
    assert "client_body_timeout 60s;" in grpc_part
