"""Scale-out on one machine: two replicas behind one gate (nginx); one killed mid-run loses no request."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

from detserve.ops.replicas import running_replicas
from loadtest.runner import LoadTestConfig, run_locust
from tests.host_checks import needs_nginx


@needs_nginx
def test_replica_killed_mid_run_loses_nothing(repository: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    for suffix in ("", "_preprocess", "_core", "_postprocess"):
        shutil.copytree(repository / f"ssdlite{suffix}", repo / f"ssdlite{suffix}")
    with running_replicas(repo, replicas=2) as rs:
        cfg = LoadTestConfig(grpc_url=rs.grpc_url, model="ssdlite", out_dir=tmp_path / "lt", users=4, duration_s=12.0, retries=5)
        killer = threading.Timer(4.0, rs.kill_replica, args=(0,))
        killer.start()
        try:
            log = run_locust(cfg)
        finally:
            killer.cancel()
        assert rs.servers[0].process is None or rs.servers[0].process.poll() is not None  # it really died
    done_after_kill = int((log.start > log.start.min() + 5.0).sum())
    assert len(log.ok) > 0 and done_after_kill > 0
    assert log.ok.all(), f"{int((~log.ok).sum())} of {len(log.ok)} requests failed"
