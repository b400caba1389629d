"""The gate's helper: gRPC health per model and the class names, answered beside tritonserver.

Why: Triton 2.51 answers ``grpc.health.v1.Health/Check`` SERVING for any
service name, so a probe with a mistyped service stays green and there is no per-model health; and
the class names a build records (``labels.json``, ``converters/labels.py``) are nowhere on an open
path (the model config is an admin API). nginx cannot read a protobuf body, so a small grpcio server
in the ``detserve serve`` process answers these calls on a Unix socket in the private runtime
directory, and the gate routes ``/grpc.health.v1.Health/Check`` and ``/detserve.v1.Labels/Get`` to it.

Health (the gRPC health protocol): service ``""`` (or ``inference.GRPCInferenceService``) is the
server's readiness: every tritonserver ready and no model failing (a dead or frozen stub); a model
name is that model's readiness: Triton's ModelReady on every replica and none of its steps failing;
a name Triton's repository does not hold is ``NOT_FOUND``. Triton itself is asked on its own socket.

Labels: ``detserve.v1.Labels/Get`` (``clients/labels.proto``) returns the same JSON document as the
gate's HTTP ``GET /v2/models/<name>[/versions/<v>]/labels``; unversioned, the version the repository
serves. HTTP is served by nginx from copies written here (``publish_labels``) at start and every
``LABELS_REFRESH_S`` after, so a version built or promoted while serving names its classes too.

The messages are two or three fields, so they are encoded here by hand (no generated code, no
grpcio-health-checking dependency); the tests decode them with protobuf from the official schema.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from detserve.ops.gate_fleet import FLEET_DESCRIBE
from detserve.pipeline import LABELS_FILE

log = logging.getLogger(__name__)

HEALTH_CHECK = "/grpc.health.v1.Health/Check"
LABELS_GET = "/detserve.v1.Labels/Get"
SERVER_SERVICES = ("", "inference.GRPCInferenceService")
LABELS_REFRESH_S = 2.0  # how soon a build or promote while serving shows its class names on the open paths
SERVING, NOT_SERVING = 1, 2  # grpc.health.v1.HealthCheckResponse.ServingStatus
UNREACHABLE = -1  # a tritonserver that did not answer: it serves nothing, and cannot say what it holds
Failing = Callable[[], Sequence[dict[str, str]]]  # per tritonserver: model -> why it cannot serve


def _varint(data: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if i >= len(data):
            raise ValueError("truncated varint")
        b = data[i]
        value |= (b & 0x7F) << shift
        i, shift = i + 1, shift + 7
        if not b & 0x80:
            return value, i


def string_fields(data: bytes) -> dict[int, str]:
    """The length-delimited fields of a protobuf message, by number (others skipped)."""
    out: dict[int, str] = {}
    i = 0
    while i < len(data):
        key, i = _varint(data, i)
        wire = key & 7
        if wire == 0:
            _, i = _varint(data, i)
        elif wire == 1 or wire == 5:
            i += 8 if wire == 1 else 4
        elif wire == 2:
            n, i = _varint(data, i)
            out[key >> 3] = data[i : i + n].decode("utf-8")
            i += n
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
    return out


def encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        b = value & 0x7F
        value >>= 7
        out.append(b | (0x80 if value else 0))
        if not value:
            return bytes(out)


def encode_string(field: int, text: str) -> bytes:
    raw = text.encode("utf-8")
    return encode_varint(field << 3 | 2) + encode_varint(len(raw)) + raw


def publish_labels(repository: Path, labels_dir: Path) -> int:
    """Copy every built version's labels document to ``labels_dir`` as ``<model>@<version>.json``, and the
    serving version's as ``<model>@.json`` (what nginx serves); copies of documents gone from the
    repository are removed. Returns how many models have one. Run again after a build or a promote, a
    reader sees the old document or the new one, never half of one (each copy replaces atomically)."""
    from detserve.ops.versions import serving_version

    labels_dir.mkdir(exist_ok=True)
    os.chmod(labels_dir, 0o750)  # the gate's workers read it through the runtime directory's group
    wanted: dict[str, Path] = {}
    for model_dir in sorted(p for p in repository.iterdir() if p.is_dir()):
        versions = {int(v.parent.name): v for v in model_dir.glob(f"*/{LABELS_FILE}") if v.parent.name.isdigit()}
        if not versions:
            continue
        wanted.update({f"{model_dir.name}@{version}.json": path for version, path in versions.items()})
        try:
            serving = serving_version(repository, model_dir.name)
        except Exception:  # a half-written model: Triton will not serve it either; the latest build speaks
            serving = max(versions)
        if serving in versions:
            wanted[f"{model_dir.name}@.json"] = versions[serving]
    for name, source in wanted.items():
        _replace_if_changed(source, labels_dir / name)
    for stale in labels_dir.glob("*.json"):
        if stale.name not in wanted:
            stale.unlink(missing_ok=True)
    return len({name.split("@")[0] for name in wanted})


def _replace_if_changed(source: Path, target: Path) -> None:
    data = source.read_bytes()
    with contextlib.suppress(OSError):
        if target.read_bytes() == data:
            return
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_bytes(data)
    os.chmod(tmp, 0o644)  # class names are no secret; the gate's workers read it as "others" behind the 0750 directory
    os.replace(tmp, target)


class GateHelper:
    """The grpcio server on ``socket`` (see the module docstring); ``triton_urls``: each tritonserver's socket."""

    def __init__(
        self,
        socket: Path,
        triton_urls: Sequence[str],
        failing: Failing,
        repository: Path,
        metrics: Sequence[tuple[str, int]] = (),
    ) -> None:
        self.socket = socket
        self.metrics = list(metrics)  # per tritonserver: its metrics (address, port), for Fleet/Describe
        self.triton_urls = list(triton_urls)
        self.failing = failing
        self.repository = repository
        self._server: Any = None
        self._clients: dict[str, Any] = {}
        self._stopped = threading.Event()
        self._refresher: threading.Thread | None = None

    def start(self) -> None:
        import grpc

        publish_labels(self.repository, self.socket.parent / "labels")
        handlers = {
            HEALTH_CHECK.split("/")[1]: {"Check": self._check},
            LABELS_GET.split("/")[1]: {"Get": self._labels},
            FLEET_DESCRIBE.split("/")[1]: {"Describe": self._describe},
        }
        self._server = grpc.server(ThreadPoolExecutor(max_workers=4, thread_name_prefix="gate-helper"))
        for service, methods in handlers.items():
            self._server.add_generic_rpc_handlers(
                (
                    grpc.method_handlers_generic_handler(
                        service, {m: grpc.unary_unary_rpc_method_handler(fn) for m, fn in methods.items()}
                    ),
                )
            )
        self.socket.unlink(missing_ok=True)
        self._server.add_insecure_port(f"unix:{self.socket}")
        self._server.start()
        os.chmod(self.socket, 0o660)  # the gate's workers connect through the runtime directory's group
        self._stopped.clear()
        self._refresher = threading.Thread(target=self._refresh_labels, name="gate-helper-labels", daemon=True)
        self._refresher.start()

    def _refresh_labels(self) -> None:
        """A version built or promoted while serving: its names on the open paths within LABELS_REFRESH_S."""
        while not self._stopped.wait(LABELS_REFRESH_S):
            try:
                publish_labels(self.repository, self.socket.parent / "labels")
            except OSError as exc:  # a repository being rewritten: the next round reads it whole
                log.debug("labels refresh: %s", exc)

    def stop(self) -> None:
        self._stopped.set()
        if self._refresher is not None:
            self._refresher.join(5.0)
            self._refresher = None
        if self._server is not None:
            self._server.stop(grace=1.0).wait(5.0)
            self._server = None
        for client in self._clients.values():
            with contextlib.suppress(Exception):
                client.close()
        self._clients.clear()
        self.socket.unlink(missing_ok=True)

    def _client(self, url: str) -> Any:
        import tritonclient.grpc as grpcclient

        if url not in self._clients:
            self._clients[url] = grpcclient.InferenceServerClient(url)
        return self._clients[url]

    def status(self, service: str) -> int | None:
        """SERVING / NOT_SERVING, or None: no such model."""
        failing = list(self.failing())
        if service in SERVER_SERVICES:
            if any(failing):
                return NOT_SERVING
            return SERVING if all(self._ask(url, lambda c: c.is_server_ready()) for url in self.triton_urls) else NOT_SERVING
        verdicts = [self._model_status(url, service, down) for url, down in zip(self.triton_urls, failing, strict=False)]
        answered = [v for v in verdicts if v != UNREACHABLE]
        if answered and all(v is None for v in answered):  # replicas share one repository: a live one speaks for all
            return None
        return SERVING if verdicts and all(v == SERVING for v in verdicts) else NOT_SERVING

    def _ask(self, url: str, question: Callable[[Any], Any]) -> Any:
        try:
            return question(self._client(url))
        except Exception as e:  # a tritonserver that is down or restarting cannot serve anything
            log.debug("health: %s did not answer: %s", url, e)
            return None

    def _model_status(self, url: str, model: str, failing: dict[str, str]) -> int | None:
        if failing.get("tritonserver"):
            return UNREACHABLE  # down (restarting)
        index = self._ask(url, lambda c: c.get_model_repository_index(as_json=True))
        if index is None:
            return UNREACHABLE
        if not any(m.get("name") == model for m in index.get("models", [])):
            return None
        if not self._ask(url, lambda c: c.is_model_ready(model)):
            return NOT_SERVING
        config = self._ask(url, lambda c: c.get_model_config(model, as_json=True)) or {}
        steps = [s.get("model_name") for s in (config.get("config") or {}).get("ensemble_scheduling", {}).get("step", [])]
        return NOT_SERVING if any(m in failing for m in [model, *steps]) else SERVING

    def _check(self, request: bytes, context: Any) -> bytes:
        import grpc

        service = string_fields(request).get(1, "")
        status = self.status(service)
        if status is None:  # the gRPC health protocol: an unknown service is NOT_FOUND
            context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {service!r}: no model of that name")
            raise AssertionError("abort raises")
        return encode_varint(1 << 3 | 0) + encode_varint(status)

    def _labels(self, request: bytes, context: Any) -> bytes:
        import grpc

        fields = string_fields(request)
        model, version = fields.get(1, ""), fields.get(2, "")
        path = self.socket.parent / "labels" / f"{model}@{version}.json"
        if "/" in model or "/" in version or model.startswith(".") or not path.is_file():
            context.abort(grpc.StatusCode.NOT_FOUND, f"no class names for model {model!r} version {version or '(serving)'}")
        return encode_string(1, path.read_text())

    def _describe(self, request: bytes, context: Any) -> bytes:
        """``detserve.v1.Fleet/Describe`` (ops/gate_fleet.py): the replica count and each one's metrics endpoint."""
        metrics = [{"address": address, "port": port} for address, port in self.metrics]
        return encode_string(1, json.dumps({"replicas": len(self.triton_urls), "metrics": metrics}))
