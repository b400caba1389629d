"""Class names of a served detector from the gate, without the admin key (``clients/labels.proto``).

The gate answers ``detserve.v1.Labels/Get`` on its gRPC port (and ``GET /v2/models/<name>/labels`` on
HTTP) with the labels document the build recorded. The two-field messages are encoded here by hand,
so this needs only grpcio (which tritonclient brings), no generated code.
"""

from __future__ import annotations

import json
from typing import Any

from detserve.errors import ClientError

METHOD = "/detserve.v1.Labels/Get"


def _string_field(field: int, text: str) -> bytes:
    raw = text.encode("utf-8")
    out, n = bytearray([field << 3 | 2]), len(raw)
    while True:  # varint length
        out.append((n & 0x7F) | (0x80 if n >> 7 else 0))
        n >>= 7
        if not n:
            return bytes(out) + raw


def _only_string(data: bytes) -> str:
    """Field 1 of a LabelsResponse (the only field)."""
    if not data:
        return ""
    if data[0] != 0x0A:
        raise ClientError("unexpected labels response from the server")
    n = shift = 0
    i = 1
    while True:
        b = data[i]
        n |= (b & 0x7F) << shift
        i, shift = i + 1, shift + 7
        if not b & 0x80:
            return data[i : i + n].decode("utf-8")


def fetch_labels(url: str, model: str, version: str = "", timeout_s: float = 10.0) -> dict[str, Any] | None:
    """The labels document of ``model`` from the gate at ``url`` (gRPC HOST:PORT), or None where the
    server has none for it or cannot be reached (a model built before labels, a server without the gate)."""
    import grpc

    with grpc.insecure_channel(url) as channel:
        call = channel.unary_unary(METHOD)
        try:
            reply = call(_string_field(1, model) + (_string_field(2, version) if version else b""), timeout=timeout_s)
        except grpc.RpcError as e:
            # no names (NOT_FOUND), no gate (UNIMPLEMENTED), no server (UNAVAILABLE: the caller's own
            # requests will say so, and a missing name must not hide that error)
            if e.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.UNAVAILABLE):
                return None
            raise ClientError(f"class names of {model!r} from {url}: {e.details()}") from e
    return dict(json.loads(_only_string(reply)))


def label_names(url: str, model: str) -> list[str]:
    """``names[i]`` names label ``i``; empty where the server has no names for ``model``."""
    document = fetch_labels(url, model)
    return [str(n) for n in (document or {}).get("names", [])]


def name_of(names: list[str], label: int) -> str:
    """The name of ``label``, ``class_<label>`` where none is known."""
    return names[label] if 0 <= label < len(names) else f"class_{label}"
