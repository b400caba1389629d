"""The tritonservers an admin operation must reach, as the server itself describes them.

A ``detserve serve --replicas N`` gate balances every call, so one admin call reaches one replica.
The client asks the gate (``/detserve.v1.Fleet/Describe``, open, answered by the gate's helper) how many
replicas it has and where each one's metrics are, then addresses each replica in turn with the
``detserve-replica`` header, which the gate honours only with the admin key (``ops/gate_fleet.py``).
Nothing about the replica count is configured on the client.

A ``Target`` is one server an operation must reach; the endpoints of several machines
(``ops/endpoints.py``) expand into one list of targets, and the phased rollout (``ops/rollout.py``)
runs over any such list.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from google.protobuf.message import DecodeError

from detserve.errors import ClientError
from detserve.ops.admin import ModelAdmin
from detserve.ops.gate_fleet import FLEET_DESCRIBE

DESCRIBE_TIMEOUT_S = 10.0
_WILDCARDS = ("0.0.0.0", "::", "")


@dataclass(frozen=True)
class Target:
    """One tritonserver: the gate's ``url`` and, behind a replica set, the replica's index."""

    url: str
    replica: int | None = None
    named: bool = False  # one of several endpoints (``ops/endpoints.py``): its label names the endpoint too

    @property
    def label(self) -> str:
        if self.replica is None:
            return self.url
        return f"{self.url} replica {self.replica}" if self.named else f"replica {self.replica}"


@dataclass(frozen=True)
class ServerInfo:
    """What the gate says about what is behind it: per replica, its metrics (address, port)."""

    replicas: int
    metrics: tuple[tuple[str, int], ...]

    def metrics_urls(self, url: str) -> list[str]:
        """Each replica's Prometheus endpoint as seen from here: a wildcard address is the host ``url`` names."""
        host = urlsplit(f"//{url}").hostname or "127.0.0.1"
        out = []
        for address, port in self.metrics:
            name = host if address in _WILDCARDS else address
            out.append(f"http://{f'[{name}]' if ':' in name else name}:{port}/metrics")
        return out


def describe(url: str, timeout_s: float = DESCRIBE_TIMEOUT_S) -> ServerInfo | None:
    """The gate's description, or None from a server that has none (a plain tritonserver, an older detserve)."""
    import grpc

    with grpc.insecure_channel(url) as channel:
        call = channel.unary_unary(FLEET_DESCRIBE, request_serializer=None, response_deserializer=None)
        try:
            raw = call(b"", timeout=timeout_s)
        except grpc.RpcError as e:
            code = e.code() if hasattr(e, "code") else None
            if code in (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.NOT_FOUND):
                return None
            raise ClientError(f"no Triton server answers at {url}: {e}", hint="start one with `detserve serve`") from e
    try:
        from google.protobuf.wrappers_pb2 import StringValue  # the answer's one field: a JSON string

        doc = json.loads(StringValue.FromString(raw).value or "{}")
        metrics = tuple((str(m["address"]), int(m["port"])) for m in doc.get("metrics", []))
        return ServerInfo(int(doc["replicas"]), metrics)
    except (ValueError, KeyError, TypeError, DecodeError) as e:
        raise ClientError(f"{url} answered {FLEET_DESCRIBE} with something unreadable: {e}") from e


def targets(url: str, key: str | None, info: ServerInfo | None = None) -> list[Target]:
    """Every tritonserver behind ``url`` that the key lets us address one by one; else the gate itself."""
    info = info if info is not None else describe(url)
    if key and info is not None and info.replicas > 1:
        return [Target(url, i) for i in range(info.replicas)]
    return [Target(url)]


@contextlib.contextmanager
def admins(fleet: Sequence[Target], key: str | None, timeout_s: float = 300.0) -> Iterator[list[ModelAdmin]]:
    """A ``ModelAdmin`` per target, closed together."""
    opened: list[ModelAdmin] = []
    try:
        for t in fleet:
            opened.append(ModelAdmin(t.url, key, timeout_s, replica=t.replica))
        yield opened
    finally:
        for admin in opened:
            admin.close()
