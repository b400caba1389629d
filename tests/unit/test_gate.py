"""The gate's nginx config: accepted by nginx itself, key only in the 0600 file, every admin API gated."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from detserve.errors import ServerError
from detserve.ops.gate import GRPC_ADMIN, GRPC_OPEN, GateConfig, Upstream, render_config, safe_text
from detserve.ops.nginx import nginx_binary

KEY = "k" * 16 + "-0123456789abcdef" * 30  # long keys must fit nginx's map buckets too


def _config(tmp_path: Path, key: str | None = KEY, **kw: object) -> GateConfig:
    ups = (Upstream(tmp_path / "grpc.sock", tmp_path / "http.sock"),)
    return GateConfig(tmp_path, "127.0.0.1", 18001, 18000, ups, key, **kw)  # type: ignore[arg-type]


def _nginx_accepts(tmp_path: Path, text: str) -> None:
    try:
        binary = nginx_binary()
    except ServerError:
        pytest.skip("nginx is not installed")
    for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (tmp_path / sub).mkdir(exist_ok=True)
    conf = tmp_path / "nginx.conf"
    conf.write_text(text)
    proc = subprocess.run([binary, "-t", "-p", str(tmp_path), "-c", str(conf)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("key", [KEY, None])
@pytest.mark.parametrize("unready", [(), (("demo_core", 'stub died; reload failed: "bad" {x} $y'),)])
def test_nginx_accepts_the_config(tmp_path: Path, key: str | None, unready: tuple) -> None:
    _nginx_accepts(tmp_path, render_config(_config(tmp_path, key, unready=unready)))


def test_every_triton_method_is_classified_and_admin_ones_need_the_key(tmp_path: Path) -> None:
    text = render_config(_config(tmp_path))
    assert not set(GRPC_OPEN) & set(GRPC_ADMIN)
    admin_line = next(line for line in text.splitlines() if "RepositoryModelLoad" in line)
    assert all(m in admin_line for m in GRPC_ADMIN)
    assert text.count(f'"~^{re.escape(KEY)}$" 1;') == 2  # the gRPC and the HTTP header maps, nowhere else
    assert 'grpc_set_header triton-grpc-protocol-admin-key "";' in text  # never forwarded to Triton


def test_without_a_key_nothing_opens_the_admin_apis(tmp_path: Path) -> None:
    text = render_config(_config(tmp_path, None))
    assert " 1;\n" not in text.split("upstream")[0].split("map $request_uri")[1]  # maps have only "default 0"
    assert "started without an admin key" in text


def test_multiple_replicas_fail_over(tmp_path: Path) -> None:
    ups = tuple(Upstream(tmp_path / f"r{i}" / "grpc.sock", tmp_path / f"r{i}" / "http.sock") for i in range(3))
    text = render_config(GateConfig(tmp_path, "127.0.0.1", 1, 2, ups))
    assert text.count("max_fails=1") == 6 and "grpc_next_upstream_tries 3;" in text


@pytest.mark.parametrize(
    "bad",
    [
        dict(max_request_bytes=10),
        dict(admin_key="short"),
        dict(admin_key="has space 0123456789"),
        dict(upstreams=()),
        dict(admin_key="~" + "." * 15),  # nginx would read a regex admitting any 15-character header
        dict(admin_key="~*abcdefghijklmnop"),
        dict(admin_key=".abcdefghijklmnop"),
        dict(admin_key="-abcdefghijklmnop"),
        dict(max_json_bytes=64 * 1024),  # JSON that deep crashes Triton 2.51
        dict(client_requests=0),
        dict(idle_timeout_s=0),
    ],
)
def test_invalid_settings_are_refused(tmp_path: Path, bad: dict) -> None:
    args = dict(workdir=tmp_path, host="127.0.0.1", grpc_port=1, http_port=2, upstreams=(Upstream(tmp_path, tmp_path),))
    with pytest.raises(ServerError):
        GateConfig(**{**args, **bad})  # type: ignore[arg-type]


def test_safe_text_keeps_nginx_and_grpc_safe() -> None:
    assert safe_text('a "b" {c} $d;\n\\e') == "a  b   c   d;  e"
    assert len(safe_text("x" * 1000)) == 400


def test_both_binaries_get_the_malloc_settings_and_never_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    from detserve.ops.embedded import server_environment

    monkeypatch.setenv("DETSERVE_ADMIN_KEY", "k" * 20)
    monkeypatch.setenv("DETSERVE_ADMIN_KEY_FILE", "/run/secrets/key")
    for embedded in (True, False):
        env = server_environment(embedded)
        assert "DETSERVE_ADMIN_KEY" not in env and "DETSERVE_ADMIN_KEY_FILE" not in env
        assert env["MALLOC_MMAP_THRESHOLD_"] == "65536" and env["PYTHONDONTWRITEBYTECODE"] == "1"


def test_admin_key_is_matched_exactly_and_case_sensitively(tmp_path: Path) -> None:
    """nginx map strings compare case-insensitively and "~" starts a regex: the key is an escaped, anchored regex."""
    key = "Abc.def~ghi-jklmnop"
    pattern = re.compile(f"^{re.escape(key)}$")  # what the map holds; PCRE reads these escapes as Python does
    assert f'"~^{re.escape(key)}$" 1;' in render_config(_config(tmp_path, key))
    assert pattern.match(key)
    for wrong in (key.lower(), key.upper(), key.replace(".", "x"), key + "x", "x" + key, "." * len(key)):
        assert not pattern.match(wrong), wrong


def test_json_cap_regexes_agree_with_arithmetic() -> None:
    from detserve.ops.gate_rules import at_most, greater_patterns

    for limit in (256, 1000, 8192, 16384):
        at = re.compile(f"^{at_most(limit)}$")
        values = [*range(0, 3 * limit, 7), limit - 1, limit, limit + 1, 10**9]
        assert all(bool(at.match(str(v))) == (v <= limit) for v in values), limit
        assert not at.match("0" + str(limit - 1))  # leading zeros are not a number the gate accepts
    over = [re.compile(p) for p in greater_patterns(5)]
    pairs = [(a, b) for a in (0, 1, 9, 10, 99, 100, 512, 8191, 8192, 16384, 99999) for b in (0, 5, 10, 511, 8192, 10**7)]
    for a, b in pairs:
        assert any(p.match(f"{a}:{b}") for p in over) == (a > b), (a, b)
    assert not any(p.match("100:") for p in over)  # chunked body: the header alone bounds the JSON part


def test_ipv6_host_is_bracketed_and_the_limits_are_rendered(tmp_path: Path) -> None:
    ups = (Upstream(tmp_path / "grpc.sock", tmp_path / "http.sock"),)
    cfg = GateConfig(tmp_path, "::1", 18001, 18000, ups, KEY, client_requests=32, idle_timeout_s=7, http_deadline_s=9)
    text = render_config(cfg)
    assert "listen [::1]:18001 http2;" in text and "listen [::1]:18000;" in text
    assert text.count("limit_conn detserve_client 32;") == 2 and text.count("client_body_timeout 7s;") == 2
    assert "http2_max_concurrent_streams 32;" in text and "default 9S;" in text
    assert "proxy_set_header detserve-arrival $msec;" in text  # replaces a forged one
    _nginx_accepts(tmp_path, text)
