"""Several machines as one fleet: a list of endpoints, or every address behind one DNS name.

``promote``/``rollback``/``status``/``models list`` take ``--endpoints h1:p,h2:p`` (or ``@file``, one
endpoint a line) or ``--discover NAME:PORT``: every A/AAAA record of NAME, as a Kubernetes headless
Service publishes one per ready pod (``socket.getaddrinfo``). Each endpoint is a ``detserve serve`` gate,
possibly with replicas behind it: each is expanded with ``fleet.targets`` (the key addresses every
replica), so the phased rollout (``ops/rollout.py``) runs over every tritonserver of every machine.

Several servers sharing one model repository (a ReadWriteMany volume) read the same files: the rollout
writes them once per phase, after the phase succeeded on every target (``ops/rollout.py``), so a server
that restarts mid-rollout comes up on a version the others serve.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from detserve.errors import ClientError, DetserveError
from detserve.ops.fleet import Target, targets
from detserve.ops.status import FleetStatus, ModelVersion, disagreements, list_models, server_status

Resolver = Callable[..., Sequence[tuple[Any, ...]]]


def split_endpoint(text: str) -> tuple[str, int]:
    """(host, port) of ``HOST:PORT`` or ``[V6]:PORT``; a ClientError naming the text otherwise."""
    host, sep, port = text.strip().rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ClientError(f"not an endpoint: {text!r}", hint="write HOST:PORT (gRPC port of `detserve serve`), [IPv6]:PORT")
    return host, int(port)


def join_endpoint(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_endpoints(text: str) -> list[str]:
    """``h1:p,h2:p`` or ``@file`` (one a line, blank lines and ``#`` comments skipped), normalised, each once."""
    if text.startswith("@"):
        path = Path(text[1:])
        try:
            items = [line.split("#", 1)[0] for line in path.read_text().splitlines()]
        except OSError as e:
            raise ClientError(f"cannot read the endpoints file {path}: {e}") from e
    else:
        items = text.split(",")
    out = [join_endpoint(*split_endpoint(item)) for item in items if item.strip()]
    if not out:
        raise ClientError(f"no endpoint in {text!r}", hint="--endpoints h1:8001,h2:8001 or --endpoints @file")
    return list(dict.fromkeys(out))


def discover(name_port: str, resolve: Resolver = socket.getaddrinfo) -> list[str]:
    """Every address NAME resolves to (A and AAAA), each at PORT, in the resolver's order, each once."""
    host, port = split_endpoint(name_port)
    try:
        infos = resolve(host, port, type=socket.SOCK_STREAM)
    except OSError as e:  # socket.gaierror: the name does not resolve
        raise ClientError(
            f"--discover {name_port}: {host!r} does not resolve: {e}",
            hint="a Kubernetes headless Service (clusterIP: None) resolves to one address per ready pod",
        ) from e
    out = [join_endpoint(str(sockaddr[0]).split("%", 1)[0], port) for *_, sockaddr in infos]
    if not out:
        raise ClientError(f"--discover {name_port}: {host!r} has no A/AAAA record")
    return list(dict.fromkeys(out))


def endpoint_urls(endpoints: str | None, discover_name: str | None) -> list[str] | None:
    """The endpoints the options name (both options: the union), or None: use --url."""
    if endpoints is None and discover_name is None:
        return None
    urls = parse_endpoints(endpoints) if endpoints is not None else []
    urls += discover(discover_name) if discover_name is not None else []
    return list(dict.fromkeys(urls))


def fleet_of(urls: Sequence[str], key: str | None) -> list[Target]:
    """Every tritonserver behind every endpoint; an endpoint that does not answer stops it here (nothing changed yet)."""
    fleet: list[Target] = []
    for url in urls:
        try:
            fleet += [replace(t, named=len(urls) > 1) for t in targets(url, key)]
        except DetserveError as e:
            raise ClientError(f"endpoint {url} (of {len(urls)}): {e.message}; nothing was changed", hint=e.hint) from e
    return fleet


def models_at(urls: Sequence[str], key: str | None, repository: Path | None) -> list[ModelVersion]:
    """``list_models`` of each endpoint, each row's ``where`` naming the endpoint (and the replica)."""
    rows = []
    for url in urls:
        rows += [replace(r, where=_where(url, r.where)) for r in list_models(url, key, repository)]
    return rows


@dataclass(frozen=True)
class EndpointsStatus:
    """``server_status`` of each endpoint that answered, the ones that did not, and where servers disagree."""

    answered: list[FleetStatus]
    unreachable: list[str]  # "url: why"
    disagreements: list[str]


def status_at(urls: Sequence[str], key: str | None) -> EndpointsStatus:
    answered, unreachable = [], []
    for url in urls:
        try:
            answered.append(server_status(url, None, key))
        except DetserveError as e:  # one machine down must not hide the others
            unreachable.append(f"{url}: {e.message}")
    views: dict[str, set[str]] = {}
    for fleet in answered:
        for s in fleet.servers:
            views[_where(s.url, s.where)] = {
                f"{m.name} version {m.version} {'ready' if m.ready else 'NOT READY'}" for m in s.models
            }
    out = disagreements(views)
    servers = [s for f in answered for s in f.servers]
    if len({s.ready for s in servers}) > 1:
        out.append(
            "server readiness: " + ", ".join(f"{_where(s.url, s.where)} {'ready' if s.ready else 'not ready'}" for s in servers)
        )
    return EndpointsStatus(answered, unreachable, out)


def _where(url: str, replica: str) -> str:
    return f"{url} {replica}".strip()
