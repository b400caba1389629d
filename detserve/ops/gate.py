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
  RESOURCE_EXHAUSTED, HTTP 413), before Triton allocates anything for it;
- each gRPC call is stamped with its arrival time and the client's ``grpc-timeout`` (headers
  ``detserve-arrival``/``detserve-timeout``, which Triton forwards as request parameters): the
  preprocessing step drops a request whose client deadline passed while it queued;
- readiness: while detserve knows a served model cannot serve (a python stub died and its reload
  failed), ServerReady / grpc.health.v1 answer UNAVAILABLE and ``/v2/health/ready`` 503, each naming
  the model and the reason; the config is rewritten and nginx reloaded (SIGHUP) when that changes.

detserve's own control traffic (drain, stub restarts) goes to the Unix socket directly.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from detserve.errors import ServerError

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
MAX_UNIX_PATH = 100  # sun_path is 108 bytes; Triton appends ":0" to the gRPC socket
_NAME = r"[A-Za-z0-9_.-]+"
_SAFE = re.compile(r"[^A-Za-z0-9 _.,:;/'()=+-]")

GRPC_STATUS = {"denied": 7, "too_large": 8, "unready": 14, "unknown": 12, "bad_path": 3}


def admin_denied_message(key_configured: bool) -> str:
    if key_configured:
        return "admin API: the admin key is missing or wrong"
    return "admin API closed: this server was started without an admin key (restart it with DETSERVE_ADMIN_KEY_FILE set)"


def safe_text(text: str, limit: int = 400) -> str:
    """``text`` reduced to characters that are safe inside an nginx string and a gRPC header."""
    return _SAFE.sub(" ", text.replace("\n", " "))[:limit].strip()


def runtime_base() -> Path:
    """Where private runtime directories go: $XDG_RUNTIME_DIR when usable, else the temp dir."""
    xdg = os.environ.get("XDG_RUNTIME_DIR", "")
    if xdg and os.path.isdir(xdg) and os.access(xdg, os.W_OK | os.X_OK):
        return Path(xdg)
    return Path(tempfile.gettempdir())


def private_directory(prefix: str = "detserve-") -> Path:
    """A new 0700 directory with a path short enough for Unix sockets."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=runtime_base()))
    os.chmod(path, 0o700)
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

    def __post_init__(self) -> None:
        if self.max_request_bytes < 1024:
            raise ServerError(f"max request size must be at least 1024 bytes, got {self.max_request_bytes}")
        if self.admin_key is not None and not re.fullmatch(r"[A-Za-z0-9._~-]{16,1024}", self.admin_key):
            raise ServerError("the admin key must be 16 to 1024 characters of [A-Za-z0-9._~-]")
        if not self.upstreams:
            raise ServerError("the gate needs at least one tritonserver behind it")

    def unready_message(self) -> str:
        parts = [f"{model}: {reason}" for model, reason in self.unready]
        return safe_text("not ready: " + "; ".join(parts))


def _user_line() -> str:
    """As root nginx would drop its workers to 'nobody', who cannot reach the 0700 sockets: keep our user."""
    if os.geteuid() != 0:
        return ""
    user = pwd.getpwuid(os.geteuid()).pw_name
    group = grp.getgrgid(os.getegid()).gr_name
    return f"user {user} {group};\n"


def _grpc_error(name: str, status: int, message: str) -> str:
    return (
        f"        location @{name} {{\n"
        "            default_type application/grpc;\n"
        f"            add_header grpc-status {status} always;\n"
        f'            add_header grpc-message "{safe_text(message)}" always;\n'
        "            return 204;\n"
        "        }\n"
    )


def _grpc_server(cfg: GateConfig) -> str:
    open_re = "|".join(GRPC_OPEN)
    admin_re = "|".join(GRPC_ADMIN)
    svc = GRPC_SERVICE.replace(".", r"\.")
    unready = ""
    if cfg.unready:
        unready = (
            f"        location = /{GRPC_SERVICE}/ServerReady {{ return 503; }}\n"
            "        location = /grpc.health.v1.Health/Check { return 503; }\n"
        )
    limit_mib = cfg.max_request_bytes / 2**20
    return f"""    server {{
        listen {cfg.host}:{cfg.grpc_port} http2;
        client_max_body_size {cfg.max_request_bytes};
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
        error_page 503 = @unready;
        if ($detserve_raw_path != $uri) {{ return 400; }}
{unready}        location ~ ^/{svc}/({admin_re})$ {{
            if ($detserve_grpc_admin = 0) {{ return 403; }}
            grpc_pass grpc://detserve_grpc;
        }}
        location ~ ^/({svc}/({open_re})|grpc\\.health\\.v1\\.Health/Check)$ {{
            grpc_pass grpc://detserve_grpc;
        }}
        location / {{ return 404; }}
{_grpc_error("denied", GRPC_STATUS["denied"], admin_denied_message(cfg.admin_key is not None))}\
{_grpc_error("too_large", GRPC_STATUS["too_large"], f"request larger than the server's limit of {cfg.max_request_bytes} bytes ({limit_mib:.0f} MiB; detserve serve --max-request-bytes)")}\
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
    name, ver = _NAME, r"(/versions/[0-9]+)?"
    return f"""    server {{
        listen {cfg.host}:{cfg.http_port};
        client_max_body_size {cfg.max_request_bytes};
        proxy_read_timeout {cfg.read_timeout_s}s;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_set_header {HTTP_KEY_HEADER} "";
        proxy_next_upstream error timeout http_502 http_503 http_504 non_idempotent;
        proxy_next_upstream_tries {len(cfg.upstreams)};
        default_type application/json;
        error_page 413 @too_large;
        if ($detserve_raw_path != $uri) {{ return 400 '{{"error":"request path must be sent in normalised form"}}'; }}
{unready}        location ~ ^/v2/(repository|systemsharedmemory|cudasharedmemory|trace|logging)(/|$) {{
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
    }}
"""


def _key_maps(key: str | None) -> str:
    lines = []
    for var, header in (("detserve_grpc_admin", GRPC_KEY_HEADER), ("detserve_http_admin", HTTP_KEY_HEADER)):
        entry = f'        "{key}" 1;\n' if key else ""
        lines.append(f"    map $http_{header.replace('-', '_')} ${var} {{\n        default 0;\n{entry}    }}\n")
    return "".join(lines)


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
events {{ worker_connections 4096; }}
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
{_key_maps(cfg.admin_key)}    upstream detserve_grpc {{
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
