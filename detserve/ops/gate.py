"""The gate: nginx on the public address, tritonserver behind it on Unix sockets only its user can reach.

Why (issue 10, docs/deployment.md "Security"): Triton 2.51 takes the key of its restricted APIs
only on its command line (``--grpc-restricted-protocol=...:admin-key=KEY``), and every local user
reads every process's command line with ``ps``. So tritonserver gets no key at all and listens on
``unix:`` sockets inside a private ``0700`` runtime directory: only its own user (and root) can
connect. The public TCP address belongs to nginx (Debian's ``nginx-light``), configured from a
``0600`` file in that directory:

- inference, health, metadata and statistics pass through (gRPC methods and HTTP routes by name);
- model repository (load/unload/index), model config, system/CUDA shared memory, trace and
  logging pass only with the admin key in a header (gRPC ``triton-grpc-protocol-admin-key``, HTTP
  ``admin-key``); without a configured key they are closed to everyone. The key header is removed
  before the request reaches Triton, so it cannot end up in Triton's log;
- anything else is refused (gRPC UNIMPLEMENTED, HTTP 404), and so is a path whose raw form differs
  from its normalised form (``..``, ``%2F``, ``//``): what was checked is what Triton routes;
- a request body over ``max_request_bytes`` is refused by nginx while it arrives (gRPC
  RESOURCE_EXHAUSTED, HTTP 413), before Triton allocates anything for it; for a gRPC stream
  (``ModelStreamInfer``) that limit counts the whole stream: nginx has no per-message limit;
- an HTTP request whose JSON part is over ``max_json_bytes`` is refused (``gate_rules.py``): Triton
  2.51's JSON parser crashes tritonserver on deep nesting (issue 20, finding 1);
- per client address: at most ``client_requests`` requests at once (each HTTP/2 stream counts) and a
  request body or stream that sends nothing for ``idle_timeout_s`` is closed, so one client cannot
  take the gate's or Triton's connections (issue 20, finding 3);
- each call is stamped with its arrival time and its deadline (headers ``detserve-arrival``/
  ``detserve-timeout``, which Triton forwards as request parameters): gRPC's ``grpc-timeout``, HTTP's
  ``detserve-timeout`` header (same format) or ``http_deadline_s``. The preprocessing step drops a
  request whose deadline passed while it queued; a client cannot forge the arrival;
- as root, nginx's workers run as the unprivileged ``detserve-gate`` user, which reaches
  tritonserver's sockets through the runtime directory's group (``private_directory``);
- readiness: while detserve knows a served model cannot serve (a python stub died and its reload
  failed), ServerReady / grpc.health.v1 answer UNAVAILABLE and ``/v2/health/ready`` 503, each naming
  the model and the reason; the config is rewritten and nginx reloaded (SIGHUP) when that changes.

detserve's own control traffic (drain, stub restarts) goes to the Unix socket directly.
"""

from __future__ import annotations

import grp
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from detserve.errors import ServerError
from detserve.ops.gate_fleet import FLEET_DESCRIBE, POOL, replica_checks, replica_map, replica_upstreams
from detserve.ops.gate_rules import (
    HTTP_BODY_TIMEOUT_S,
    error_maps,
    gate_user,
    grpc_infer_location,
    http_error_rewrites,
    json_cap_maps,
    key_maps,
    timeout_map,
)

GRPC_SERVICE = "inference.GRPCInferenceService"
GRPC_OPEN = (
    "ServerLive",
    "ServerReady",
    "ModelReady",
    "ServerMetadata",
    "ModelMetadata",
    "ModelInfer",
    "ModelStreamInfer",
    "ModelStatistics",
)
GRPC_ADMIN = (
    "ModelConfig",
    "RepositoryIndex",
    "RepositoryModelLoad",
    "RepositoryModelUnload",
    "SystemSharedMemoryStatus",
    "SystemSharedMemoryRegister",
    "SystemSharedMemoryUnregister",
    "CudaSharedMemoryStatus",
    "CudaSharedMemoryRegister",
    "CudaSharedMemoryUnregister",
    "TraceSetting",
    "LogSettings",
)
GRPC_KEY_HEADER = "triton-grpc-protocol-admin-key"
HTTP_KEY_HEADER = "admin-key"
DEFAULT_MAX_REQUEST_BYTES = 128 * 1024 * 1024  # an 8K photograph as PNG (~100 MB) fits
# Triton 2.51 crashed from 61.7 KB of nested JSON arrays (depth 30 800, 8 MiB thread stacks; measured,
# docs/deployment.md); a binary-extension request's JSON header is a few hundred bytes. The default
# keeps a 7x margin, the largest value allowed 3.7x.
DEFAULT_MAX_JSON_BYTES = 8 * 1024
MAX_JSON_BYTES = 16 * 1024
DEFAULT_CLIENT_REQUESTS = 128  # per client address; the CLI's load tests run 16 users
DEFAULT_IDLE_TIMEOUT_S = 60
DEFAULT_HTTP_DEADLINE_S = 60
MAX_UNIX_PATH = 100  # sun_path is 108 bytes; Triton appends ":0" to the gRPC socket
_NAME = r"[A-Za-z0-9_.-]+"
_SAFE = re.compile(r"[^A-Za-z0-9 _.,:;/'()=+-]")
# a key cannot start with "~" (nginx would read a regex) nor differ only by case (compared exactly)
_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._~-]{15,1023}")

GRPC_STATUS = {"denied": 7, "too_large": 8, "busy": 8, "unready": 14, "unknown": 12, "bad_path": 3}


def admin_denied_message(key_configured: bool) -> str:
    if key_configured:
        return "admin API: the admin key is missing or wrong"
    return "admin API closed: this server was started without an admin key (restart it with DETSERVE_ADMIN_KEY_FILE set)"


def safe_text(text: str, limit: int = 400) -> str:
    """``text`` reduced to characters that are safe inside an nginx string and a gRPC header."""
    return _SAFE.sub(" ", text.replace("\n", " "))[:limit].strip()


def runtime_base() -> Path:
    """Where private runtime directories go: detserve's private base (detserve/ops/rundir.py, issue 20 7a)."""
    from detserve.ops.rundir import private_base

    return private_base()


def private_directory(prefix: str = "detserve-") -> Path:
    """A new 0700 directory with a path short enough for Unix sockets.

    As root with the gate's user present: root-owned, group = that user's group, mode 2750 (setgid:
    sockets created inside get the group; tritonserver runs with umask 007 so they are group-connectable).
    The gate's workers reach the sockets, every other non-root user is refused at the directory."""
    base = runtime_base()
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=base))
    os.chmod(path, 0o700)
    if (user := gate_user()) is not None:
        gid = grp.getgrnam(user[1]).gr_gid
        if os.stat(base).st_uid == 0:  # the base too, search only (0710): listing and creating stay root's
            os.chown(base, 0, gid)
            os.chmod(base, 0o710)
        os.chown(path, 0, gid)
        os.chmod(path, 0o2750)
    if len(str(path / "grpc.sock:0")) > MAX_UNIX_PATH:
        shutil.rmtree(path, ignore_errors=True)
        raise ServerError(
            f"runtime directory {path} is too long for a Unix socket", hint="set XDG_RUNTIME_DIR or TMPDIR to a short path"
        )
    return path


@dataclass(frozen=True)
class Upstream:
    """One tritonserver's private sockets."""

    grpc_socket: Path  # as created: Triton appends ":0" to the path it is given
    http_socket: Path


@dataclass(frozen=True)
class GateConfig:
    """What the gate's nginx.conf is generated from."""

    workdir: Path
    host: str
    grpc_port: int
    http_port: int
    upstreams: tuple[Upstream, ...]
    admin_key: str | None = None
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    unready: tuple[tuple[str, str], ...] = ()  # (model, reason) that make readiness false
    read_timeout_s: int = 300
    max_json_bytes: int = DEFAULT_MAX_JSON_BYTES  # an HTTP request's JSON part (header or whole body)
    client_requests: int = DEFAULT_CLIENT_REQUESTS  # concurrent requests per client address
    idle_timeout_s: int = DEFAULT_IDLE_TIMEOUT_S  # a body / stream that sends nothing this long is closed
    http_deadline_s: int = DEFAULT_HTTP_DEADLINE_S  # an HTTP request's deadline without detserve-timeout
    worker_connections: int = 8192
    # the gate's helper (ops/health.py): per-model gRPC health and the class names; None: Triton's own health
    helper_socket: Path | None = None

    def __post_init__(self) -> None:
        if self.max_request_bytes < 1024:
            raise ServerError(f"max request size must be at least 1024 bytes, got {self.max_request_bytes}")
        if self.admin_key is not None and not _KEY.fullmatch(self.admin_key):
            raise ServerError(
                "the admin key must be 16 to 1024 characters of [A-Za-z0-9._~-], the first a letter or digit",
                hint="e.g. python -c 'import secrets; print(secrets.token_hex(32))'",
            )
        if not self.upstreams:
            raise ServerError("the gate needs at least one tritonserver behind it")
        if not 256 <= self.max_json_bytes <= MAX_JSON_BYTES:
            raise ServerError(
                f"max JSON size must be 256 to {MAX_JSON_BYTES} bytes, got {self.max_json_bytes}",
                hint="Triton 2.51 crashes on deeply nested JSON: larger data goes in the binary-data extension",
            )
        if not 1 <= self.client_requests <= self.worker_connections // 8:
            raise ServerError(f"requests per client must be 1 to {self.worker_connections // 8}, got {self.client_requests}")
        if min(self.idle_timeout_s, self.http_deadline_s, self.read_timeout_s) < 1:
            raise ServerError("the gate's timeouts must be at least 1 s")

    def unready_message(self) -> str:
        parts = [f"{model}: {reason}" for model, reason in self.unready]
        return safe_text("not ready: " + "; ".join(parts))


def _user_line() -> str:
    """As root: the workers as the gate's own user (it reaches the sockets through the runtime directory's
    group, see ``private_directory``); without that user, root (nginx's default, 'nobody', cannot reach them)."""
    if os.geteuid() != 0:
        return ""
    user = gate_user()
    return f"user {user[0]} {user[1]};\n" if user else "user root root;\n"


def _listen(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _client_limits(cfg: GateConfig, body_timeout_s: int | None = None) -> str:
    """Per client address: concurrent requests (HTTP/2: each stream) and idle bodies/streams (finding 3)."""
    return (
        f"        limit_conn detserve_client {cfg.client_requests};\n"
        f"        client_body_timeout {body_timeout_s or cfg.idle_timeout_s}s;\n"
        f"        client_header_timeout {cfg.idle_timeout_s}s;\n"
    )


def _grpc_error(name: str, status: int, message: str) -> str:
    return (
        f"        location @{name} {{\n"
        "            default_type application/grpc;\n"
        f"            add_header grpc-status {status} always;\n"
        f'            add_header grpc-message "{safe_text(message)}" always;\n'
        "            return 204;\n"
        "        }\n"
    )


GRPC_KEEPALIVE_REQUESTS = 10_000_000  # ~55 h at 50 req/s: keepalive_time (1 h) ends a channel's connection first


def _grpc_server(cfg: GateConfig) -> str:
    open_re = "|".join(GRPC_OPEN)
    admin_re = "|".join(GRPC_ADMIN)
    svc = GRPC_SERVICE.replace(".", r"\.")
    unready = ""
    if cfg.unready:
        unready = f"        location = /{GRPC_SERVICE}/ServerReady {{ return 503; }}\n"
        if cfg.helper_socket is None:  # the helper says which model is failing itself
            unready += "        location = /grpc.health.v1.Health/Check { return 503; }\n"
    if cfg.helper_socket is not None:  # exact locations: before the regex ones below
        unready += "".join(
            f"        location = {path} {{ grpc_pass grpc://unix:{cfg.helper_socket}; }}\n"
            for path in ("/grpc.health.v1.Health/Check", "/detserve.v1.Labels/Get", FLEET_DESCRIBE)
        )
    limit_mib = cfg.max_request_bytes / 2**20
    busy = f"more than {cfg.client_requests} calls at once from your address: the gate's per-client limit"
    return f"""    server {{
        listen {_listen(cfg.host, cfg.grpc_port)} http2;
        http2_max_concurrent_streams {min(cfg.client_requests, 128)};
        # nginx ends a connection after 1000 requests (keepalive_requests) with a GOAWAY, and a call the client
        # started as it came failed: UNAVAILABLE "Stream removed (GOAWAY received)", ~1 frame in 1000 in
        # bench-stream. A gRPC channel is meant to live: recycled after keepalive_time (1 h) instead
        keepalive_requests {GRPC_KEEPALIVE_REQUESTS};
{_client_limits(cfg)}        client_max_body_size {cfg.max_request_bytes};
        grpc_read_timeout {cfg.read_timeout_s}s;
        grpc_send_timeout {cfg.read_timeout_s}s;
        grpc_set_header {GRPC_KEY_HEADER} "";
        # when the call arrived and the client's deadline: preprocessing drops a request whose
        # deadline passed while it queued (Triton never tells an ensemble's first step it was cancelled)
        grpc_set_header detserve-arrival $msec;
        grpc_set_header detserve-timeout $http_grpc_timeout;
        grpc_next_upstream error timeout http_502 http_503 http_504 non_idempotent;
        grpc_next_upstream_tries {len(cfg.upstreams)};
        error_page 400 = @bad_path;
        error_page 403 = @denied;
        error_page 404 = @unknown;
        error_page 413 = @too_large;
        error_page 429 = @busy;
        error_page 503 = @unready;
        if ($detserve_raw_path != $uri) {{ return 400; }}
{replica_checks(len(cfg.upstreams))}{unready}{grpc_infer_location(f"grpc://{POOL}")}        location ~ ^/{svc}/({admin_re})$ {{
            if ($detserve_grpc_admin = 0) {{ return 403; }}
            grpc_pass grpc://{POOL};
        }}
        location ~ ^/({svc}/({open_re})|grpc\\.health\\.v1\\.Health/Check)$ {{
            grpc_pass grpc://{POOL};
        }}
        location / {{ return 404; }}
{_grpc_error("denied", GRPC_STATUS["denied"], admin_denied_message(cfg.admin_key is not None))}\
{_grpc_error("too_large", GRPC_STATUS["too_large"], f"request larger than the server's limit of {cfg.max_request_bytes} bytes ({limit_mib:.3g} MiB; detserve serve --max-request-bytes; a ModelStreamInfer stream counts all its messages)")}\
{_grpc_error("busy", GRPC_STATUS["busy"], busy)}\
{_grpc_error("unready", GRPC_STATUS["unready"], cfg.unready_message())}\
{_grpc_error("unknown", GRPC_STATUS["unknown"], "method not served by detserve")}\
{_grpc_error("bad_path", GRPC_STATUS["bad_path"], "request path must be sent in normalised form")}\
    }}
"""


def _http_server(cfg: GateConfig) -> str:
    unready = ""
    if cfg.unready:
        body = '{"error":"' + cfg.unready_message().replace("'", " ") + '"}'
        unready = f"        location = /v2/health/ready {{ default_type application/json; return 503 '{body}'; }}\n"
    denied = '{"error":"' + admin_denied_message(cfg.admin_key is not None) + '"}'
    too_large = f'{{"error":"request larger than the server limit of {cfg.max_request_bytes} bytes"}}'
    busy = f'{{"error":"more than {cfg.client_requests} requests at once from your address: the gate per-client limit"}}'
    name, ver = _NAME, r"(/versions/[0-9]+)?"
    return f"""    server {{
        listen {_listen(cfg.host, cfg.http_port)};
{_client_limits(cfg, min(cfg.idle_timeout_s, HTTP_BODY_TIMEOUT_S))}        client_max_body_size {cfg.max_request_bytes};
        proxy_read_timeout {cfg.read_timeout_s}s;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_set_header {HTTP_KEY_HEADER} "";
        # the deadline of finding 5, as for gRPC: a client's own detserve-timeout or the default;
        # set here, these replace whatever the client sent under the same names
        proxy_set_header detserve-arrival $msec;
        proxy_set_header detserve-timeout $detserve_http_timeout;
        proxy_next_upstream error timeout http_502 http_503 http_504 non_idempotent;
        proxy_next_upstream_tries {len(cfg.upstreams)};
        default_type application/json;
{http_error_rewrites()}        error_page 413 @too_large;
        error_page 429 @busy;
        if ($detserve_raw_path != $uri) {{ return 400 '{{"error":"request path must be sent in normalised form"}}'; }}
{_json_refusals(cfg)}{unready}{_labels_location(cfg)}        location ~ ^/v2/(repository|systemsharedmemory|cudasharedmemory|trace|logging)(/|$) {{
            if ($detserve_http_admin = 0) {{ return 403 '{denied}'; }}
            proxy_pass http://detserve_http;
        }}
        location ~ ^/v2/models/{name}{ver}/(config|trace/setting)$ {{
            if ($detserve_http_admin = 0) {{ return 403 '{denied}'; }}
            proxy_pass http://detserve_http;
        }}
        location ~ ^/v2(/health/(live|ready)|/models/stats|/models/{name}{ver}(/(ready|infer|stats))?)?$ {{
            proxy_pass http://detserve_http;
        }}
        location / {{ return 404 '{{"error":"not served by detserve"}}'; }}
        location @too_large {{ return 413 '{too_large}'; }}
        location @busy {{ return 429 '{busy}'; }}
    }}
"""


def _labels_location(cfg: GateConfig) -> str:
    """``GET /v2/models/<name>[/versions/<v>]/labels``: the class names the helper published (ops/health.py)."""
    if cfg.helper_socket is None:
        return ""
    missing = '{"error":"no class names for this model or version (rebuild it with this detserve)"}'
    return (
        f"        location ~ ^/v2/models/({_NAME})(/versions/([0-9]+))?/labels$ {{\n"
        f"            root {cfg.helper_socket.parent}/labels;\n"
        "            try_files /$1@$3.json @no_labels;\n"
        "        }\n"
        f"        location @no_labels {{ return 404 '{missing}'; }}\n"
    )


def _json_refusals(cfg: GateConfig) -> str:
    """Server-level refusals of requests whose JSON part Triton could choke on (``gate_rules.json_cap_maps``)."""
    limit = cfg.max_json_bytes
    header = "Inference-Header-Content-Length"
    refusals = {
        "too_large": (
            413,
            f"JSON part of the request over the limit of {limit} bytes: send image data in the binary-data extension ({header})",
        ),
        "bad_header": (400, f"{header} must be a decimal number of bytes without sign or leading zeros"),
        "header_over_body": (400, f"{header} is larger than the request body"),
        "unbounded": (
            411,
            f"a body without Content-Length (chunked) needs {header} of at most {limit} bytes: the JSON part must be bounded",
        ),
    }
    return "".join(
        f'        if ($detserve_json = {verdict}) {{ return {code} \'{{"error":"{text}"}}\'; }}\n'
        for verdict, (code, text) in refusals.items()
    )


def _bucket(key: str | None) -> int:
    """The map's hash buckets must hold the key, or nginx refuses to start."""
    return 1 << max(6, (len(key or "") + 64).bit_length())


def render_config(cfg: GateConfig) -> str:
    """nginx.conf for ``cfg`` (contains the key: written 0600 into the 0700 workdir)."""
    w = cfg.workdir
    # several replicas: a replica that fails is skipped for a while (max_fails) and a call it could not
    # take goes to the next one (*_next_upstream below); inference is idempotent, so POSTs may be retried
    fails = " max_fails=1 fail_timeout=5s" if len(cfg.upstreams) > 1 else ""
    grpc_servers = "".join(f"        server unix:{u.grpc_socket}:0{fails};\n" for u in cfg.upstreams)
    http_servers = "".join(f"        server unix:{u.http_socket}{fails};\n" for u in cfg.upstreams)
    return f"""# generated by detserve (detserve/ops/gate.py); holds the admin key: keep 0600
{_user_line()}worker_processes 1;
pid {w}/nginx.pid;
error_log {w}/nginx-error.log warn;
worker_rlimit_nofile {2 * cfg.worker_connections + 64};
events {{ worker_connections {cfg.worker_connections}; }}
http {{
    access_log off;
    server_tokens off;
    client_body_temp_path {w}/body;
    proxy_temp_path {w}/proxy;
    fastcgi_temp_path {w}/fastcgi;
    uwsgi_temp_path {w}/uwsgi;
    scgi_temp_path {w}/scgi;
    client_body_buffer_size 1m;
    map_hash_bucket_size {_bucket(cfg.admin_key)};
    map $request_uri $detserve_raw_path {{ "~^(?<p>[^?]*)" $p; }}
    # per client address (finding 3); refused requests are counted, not logged one by one
    limit_conn_zone $binary_remote_addr zone=detserve_client:4m;
    limit_conn_status 429;
    limit_conn_log_level info;
{key_maps(cfg.admin_key, {"detserve_grpc_admin": GRPC_KEY_HEADER, "detserve_http_admin": HTTP_KEY_HEADER})}\
{json_cap_maps(cfg.max_json_bytes)}{timeout_map(cfg.http_deadline_s)}{error_maps()}\
{replica_map(len(cfg.upstreams))}{replica_upstreams([u.grpc_socket for u in cfg.upstreams])}    upstream detserve_grpc {{
{grpc_servers}        keepalive 128;
    }}
    upstream detserve_http {{
{http_servers}        keepalive 32;
    }}
{_grpc_server(cfg)}{_http_server(cfg)}}}
"""


def upstream_in(runtime: Path) -> Upstream:
    return Upstream(runtime / "grpc.sock", runtime / "http.sock")


def triton_listen_args(runtime: Path) -> Sequence[str]:
    """tritonserver flags: gRPC and HTTP on Unix sockets in ``runtime`` (0700), nothing on TCP but metrics."""
    up = upstream_in(runtime)
    return [f"--grpc-address=unix:{up.grpc_socket}", "--grpc-port=0", f"--http-address=unix:{up.http_socket}", "--http-port=0"]


def internal_grpc_url(runtime: Path) -> str:
    return f"unix:{upstream_in(runtime).grpc_socket}:0"
