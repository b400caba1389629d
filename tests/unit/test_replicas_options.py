"""``detserve serve --replicas N`` keeps every option it is given (it dropped the key, ports and log file before)."""

from __future__ import annotations

from pathlib import Path

from detserve.ops.replicas import ReplicaSet
from detserve.ops.server import ServerOptions

KEY = "replica-admin-key-0123456789"


def test_each_replica_keeps_the_key_limits_and_gets_its_own_log_metrics_and_shm(tmp_path: Path) -> None:
    opts = ServerOptions(
        tmp_path, "127.0.0.1", 9001, 9000, 9100, tmp_path / "triton.log", admin_key=KEY, max_request_bytes=1 << 20
    )
    rs = ReplicaSet(opts, 3)
    replicas = [rs._replica_options(i) for i in range(3)]
    assert [r.metrics_port for r in replicas] == [9100, 9101, 9102]
    assert [r.log_file for r in replicas] == [tmp_path / f"triton.log.{i}" for i in range(3)]
    assert all(r.admin_key == KEY and r.max_request_bytes == 1 << 20 and not r.public for r in replicas)
    assert len({r.shm_prefix for r in replicas}) == 3  # their /dev/shm regions cannot be confused
    assert rs.grpc_url == "127.0.0.1:9001"
