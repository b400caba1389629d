"""What a running server serves: its models (with their build records) and per-model counters.

Statistics and readiness are open APIs; the repository index needs the admin key (detserve.ops.admin),
so without one the models come from the repository directory (or from the statistics: the loaded
ones) and their state from ``is_model_ready``.
"""

from __future__ import annotations

import contextlib
import json
import re
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from detserve.errors import ClientError, DetserveError
from detserve.ops.admin import GRPC_HEADER
from detserve.ops.fleet import ServerInfo, Target, admins, describe, targets
from detserve.ops.gate_fleet import REPLICA_HEADER
from detserve.ops.tritonstats import ModelStats, delta, parse_statistics

METRICS_TIMEOUT_S = 3.0
_PENDING = re.compile(r"^nv_inference_pending_request_count\{([^}]*)\}\s+(\S+)", re.MULTILINE)
_LABEL = re.compile(r'(\w+)="([^"]*)"')


@dataclass(frozen=True)
class BuildSummary:
    """The parts of a version's build.json an operator checks first."""

    detector: str
    weights: str
    checkpoint_sha256: str | None  # first 12 hex digits
    precision: str
    verified: bool | None  # None: built without verification
    built_at: str

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> BuildSummary:
        sha = record.get("checkpoint_sha256")
        checks = record.get("verification") or {}
        return cls(
            detector=str(record.get("detector", "?")),
            weights=str(record.get("weights", "?")),
            checkpoint_sha256=str(sha)[:12] if sha else None,
            precision=str(record.get("precision", "?")),
            verified=None if checks.get("core") is None and "tensorrt" not in checks else bool(checks.get("ok")),
            built_at=str(record.get("built_at", "?")),
        )


@dataclass(frozen=True)
class ModelVersion:
    name: str
    version: str
    state: str
    reason: str = ""
    build: BuildSummary | None = None
    where: str = ""  # the replica it was read from ("" for a server without replicas)


@dataclass(frozen=True)
class ModelStatus:
    """One loaded model version: readiness and its counters since the server started (or the model loaded)."""

    name: str
    version: str
    ready: bool
    requests: int  # successful
    failures: int
    queue_ms: float  # averages per request
    compute_ms: float
    avg_batch_size: float
    pending: int | None  # from the metrics endpoint; None when it cannot be read


@dataclass(frozen=True)
class ServerStatus:
    url: str
    live: bool
    ready: bool
    models: list[ModelStatus]
    metrics_error: str | None = None
    not_ready_reason: str = ""  # what the gate says while a served model cannot serve
    where: str = ""  # the replica it was read from ("" for a server without replicas)
    metrics_url: str | None = None


@dataclass(frozen=True)
class FleetStatus:
    """Every tritonserver behind one address: one ServerStatus each, and where they disagree."""

    url: str
    servers: list[ServerStatus]
    disagreements: list[str]
    note: str = ""  # e.g. replicas that only a key holder sees one by one


def server_readiness(client: Any, headers: dict[str, str] | None = None) -> tuple[bool, str]:
    """(ready, why not): the gate answers ServerReady with UNAVAILABLE naming the failing model."""
    try:
        return bool(client.is_server_ready(headers=headers)), ""
    except Exception as e:
        message = str(e.message() if hasattr(e, "message") else e)
        status = str(e.status() if hasattr(e, "status") else "")
        if "UNAVAILABLE" in status and message.startswith("not ready"):
            return False, message
        raise


@contextlib.contextmanager
def _client(url: str) -> Iterator[Any]:
    import tritonclient.grpc as grpcclient

    try:
        client = grpcclient.InferenceServerClient(url)
    except Exception as e:
        raise ClientError(f"cannot connect to {url}: {e}") from e
    try:
        yield client
    finally:
        with contextlib.suppress(Exception):
            client.close()


def _unreachable(url: str, e: Exception) -> ClientError:
    return ClientError(f"no Triton server answers at {url}: {e}", hint="start one with `detserve serve`")


def read_build_record(repository: Path, name: str, version: str) -> BuildSummary | None:
    path = repository / name / version / "build.json"
    try:
        return BuildSummary.from_record(json.loads(path.read_text()))
    except (OSError, ValueError, AttributeError):
        return None


def repository_versions(repository: Path) -> dict[str, list[str]]:
    """Model name -> numbered version directories, from a repository on disk."""
    if not repository.is_dir():
        raise ClientError(f"model repository not found: {repository}")
    out: dict[str, list[str]] = {}
    for model in sorted(p for p in repository.iterdir() if p.is_dir() and (p / "config.pbtxt").is_file()):
        out[model.name] = sorted((v.name for v in model.iterdir() if v.is_dir() and v.name.isdigit()), key=int)
    return out


def _versions_without_key(client: Any, url: str, repository: Path | None) -> list[ModelVersion]:
    if repository is not None:
        found = repository_versions(repository)
    else:
        try:
            loaded = parse_statistics(client.get_inference_statistics(as_json=True)).values()
        except Exception as e:
            raise _unreachable(url, e) from e
        found = {}
        for m in loaded:
            found.setdefault(m.name, []).append(m.version)
    rows = []
    for name, versions in found.items():
        for version in versions or [""]:
            try:
                ready = client.is_model_ready(name, version)
            except Exception as e:
                raise _unreachable(url, e) from e
            rows.append(ModelVersion(name, version, "READY" if ready else "UNAVAILABLE"))
    return rows


def list_models(url: str, key: str | None, repository: Path | None = None) -> list[ModelVersion]:
    """Every model version each server knows (index, with the key: each replica's) or the repository holds (without)."""
    if key:
        rows = []
        fleet = targets(url, key)
        with admins(fleet, key) as conns:
            for t, admin in zip(fleet, conns, strict=True):
                where = "" if t.replica is None else t.label
                rows += [
                    ModelVersion(e.name, e.version, e.state, e.reason, where=where) for e in admin.get_model_repository_index()
                ]
    else:
        with _client(url) as client:
            rows = _versions_without_key(client, url, repository)
    if repository is not None:
        rows = [replace(r, build=read_build_record(repository, r.name, r.version)) for r in rows]
    return sorted(rows, key=lambda r: (r.where, r.name, int(r.version) if r.version.isdigit() else -1))


def disagreements(views: Mapping[str, set[str]]) -> list[str]:
    """What some replicas hold and others not: ``views`` maps a replica to its "<model> version <v> <STATE>" set."""
    if len(views) < 2:
        return []
    everywhere = set.intersection(*views.values())
    out = []
    for item in sorted(set.union(*views.values()) - everywhere):
        holders = [where for where, held in views.items() if item in held]
        out.append(f"{item} on {', '.join(holders)} only")
    return out


def model_disagreements(rows: list[ModelVersion]) -> list[str]:
    views: dict[str, set[str]] = {}
    for r in rows:
        views.setdefault(r.where, set()).add(f"{r.name} version {r.version or '-'} {r.state}")
    return disagreements(views)


def parse_pending(metrics_text: str) -> dict[tuple[str, str], int]:
    """(model, version) -> ``nv_inference_pending_request_count`` from Prometheus text."""
    out: dict[tuple[str, str], int] = {}
    for labels, value in _PENDING.findall(metrics_text):
        lab = dict(_LABEL.findall(labels))
        out[(lab.get("model", ""), lab.get("version", ""))] = int(float(value))
    return out


def read_pending(metrics_url: str) -> tuple[dict[tuple[str, str], int], str | None]:
    """Pending requests per model version, or ({}, why not) when the endpoint cannot be read."""
    try:
        with urllib.request.urlopen(metrics_url, timeout=METRICS_TIMEOUT_S) as resp:
            return parse_pending(resp.read().decode("utf-8", errors="replace")), None
    except (OSError, ValueError, urllib.error.URLError) as e:
        return {}, f"{metrics_url}: {e}"


def _model_status(
    client: Any, stats: ModelStats, pending: Mapping[tuple[str, str], int], headers: dict[str, str] | None
) -> ModelStatus:
    (split,) = delta({}, {stats.name: stats}).values()  # counters since zero: totals over the model's life
    return ModelStatus(
        name=stats.name,
        version=stats.version,
        ready=bool(client.is_model_ready(stats.name, stats.version, headers=headers)),
        requests=split.requests,
        failures=split.failures,
        queue_ms=split.queue_ms,
        compute_ms=split.compute_ms,
        avg_batch_size=split.avg_batch_size,
        pending=pending.get((stats.name, stats.version)),
    )


def _target_status(target: Target, key: str | None, metrics_url: str | None) -> ServerStatus:
    """One tritonserver: readiness and counters (open APIs; a replica addressed with the key)."""
    pending, metrics_error = read_pending(metrics_url) if metrics_url else ({}, "the server names no metrics endpoint")
    headers = None if target.replica is None or not key else {GRPC_HEADER: key, REPLICA_HEADER: str(target.replica)}
    with _client(target.url) as client:
        try:
            live = bool(client.is_server_live(headers=headers))
            ready, why = server_readiness(client, headers)
            stats = parse_statistics(client.get_inference_statistics(as_json=True, headers=headers))
            models = [
                _model_status(client, s, pending, headers) for s in sorted(stats.values(), key=lambda s: (s.name, s.version))
            ]
        except DetserveError:
            raise
        except Exception as e:
            raise _unreachable(target.url, e) from e
    where = "" if target.replica is None else target.label
    return ServerStatus(target.url, live, ready, models, metrics_error, why, where, metrics_url)


def server_status(url: str, metrics_url: str | None = None, key: str | None = None) -> FleetStatus:
    """Readiness of every tritonserver behind ``url`` and of each loaded model, with Triton's counters.

    The metrics endpoints are the ones the server names (``ops/fleet.py``); ``metrics_url`` overrides
    them for a server without replicas (or one that names none). With the key each replica is read on
    its own; without it, the replica the gate picks, and the note says so.
    """
    info = describe(url)
    fleet = targets(url, key, info)
    urls: list[str | None] = list(info.metrics_urls(url)) if info is not None else []
    if metrics_url is not None and len(fleet) == 1:
        urls = [metrics_url]
    urls += [None] * (len(fleet) - len(urls))
    servers = [_target_status(t, key, m) for t, m in zip(fleet, urls, strict=False)]
    return FleetStatus(url, servers, _status_disagreements(servers), _note(info, fleet))


def _note(info: ServerInfo | None, fleet: list[Target]) -> str:
    if info is None or info.replicas <= 1 or len(fleet) > 1:
        return ""
    return (
        f"{info.replicas} replicas behind this address: the counters above are the one the gate picked; "
        "with the admin key (DETSERVE_ADMIN_KEY) status shows each replica"
    )


def _status_disagreements(servers: list[ServerStatus]) -> list[str]:
    views = {s.where: {f"{m.name} version {m.version} {'ready' if m.ready else 'NOT READY'}" for m in s.models} for s in servers}
    out = disagreements(views)
    if len({s.ready for s in servers}) > 1:
        out.append("server readiness: " + ", ".join(f"{s.where} {'ready' if s.ready else 'not ready'}" for s in servers))
    return out
