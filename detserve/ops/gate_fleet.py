"""The gate's replica addressing: a key holder sends a gRPC call to one named tritonserver behind it.

Why: with ``detserve serve --replicas N`` the gate balances every call over the replicas, so an admin
call (load, unload, repository index) reached one replica of N: a promote switched half the traffic.
Admin clients (``detserve/ops/fleet.py``) therefore ask the server how many replicas it has
(``/detserve.v1.Fleet/Describe``, answered by the gate's helper, ``ops/health.py``) and send each call
to every replica in turn:

- the gRPC header ``detserve-replica: <i>`` (0-based) sends a call, any method the gate passes, to
  replica ``i`` instead of the balanced pool. It is honoured only together with the admin key in the
  same call; without the key the call is refused (PERMISSION_DENIED), so nothing is reachable without
  the key that was not before, and the replicas' own sockets stay private. An index the server does
  not have is NOT_FOUND, naming how many it has. The gate removes the header before Triton sees it;
- ``Describe`` is open: it names the replica count and each replica's metrics address and port (what a
  Prometheus scrape already reaches), so ``detserve status --url H:P`` reads the metrics of the server
  it was pointed at instead of assuming port 8002.

HTTP calls are always balanced (the admin tools speak gRPC).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

REPLICA_HEADER = "detserve-replica"
FLEET_DESCRIBE = "/detserve.v1.Fleet/Describe"
POOL = "$detserve_grpc_pool"  # what grpc_pass sends to: an upstream group's name
_NO_REPLICA = 410  # nginx status that error_page turns into the NOT_FOUND answer below
_GRPC_NOT_FOUND = 5


def replica_upstreams(grpc_sockets: Sequence[Path]) -> str:
    """One upstream group per replica (``detserve_grpc_<i>``), beside the balanced ``detserve_grpc``."""
    return "".join(
        f"    upstream detserve_grpc_{i} {{\n        server unix:{sock}:0;\n        keepalive 8;\n    }}\n"
        for i, sock in enumerate(grpc_sockets)
    )


def replica_map(count: int) -> str:
    """``$detserve_grpc_pool`` from "<key matched 0|1>:<detserve-replica header>": regexes match in order,
    so no header at all is the balanced pool with or without the key, a header without the key is denied."""
    header = REPLICA_HEADER.replace("-", "_")
    entries = ['        "~^[01]:$" detserve_grpc;\n']
    entries += [f'        "~^1:{i}$" detserve_grpc_{i};\n' for i in range(count)]
    entries += ['        "~^0:" denied;\n']
    return (
        f'    map "$detserve_grpc_admin:$http_{header}" $detserve_grpc_pool {{\n'
        "        default no_replica;\n" + "".join(entries) + "    }\n"
    )


def replica_checks(count: int) -> str:
    """Server-level directives of the gRPC gate: refusals of the header, its removal, the NOT_FOUND answer."""
    message = f"no such replica: this server has {count} (detserve-replica 0 to {count - 1})"
    return (
        f'        grpc_set_header {REPLICA_HEADER} "";\n'
        f"        error_page {_NO_REPLICA} = @no_replica;\n"
        "        if ($detserve_grpc_pool = denied) { return 403; }\n"
        f"        if ($detserve_grpc_pool = no_replica) {{ return {_NO_REPLICA}; }}\n"
        "        location @no_replica {\n"
        "            default_type application/grpc;\n"
        f"            add_header grpc-status {_GRPC_NOT_FOUND} always;\n"
        f'            add_header grpc-message "{message}" always;\n'
        "            return 204;\n"
        "        }\n"
    )
