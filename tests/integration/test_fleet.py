"""Admin operations reach every replica of a ``--replicas 2`` server; status reads the server it was pointed at.

One replica set (2 tritonservers behind the gate, admin key) on its own ssdlite repository with
version 1 and a version 2 built from other weights (spread-init seeds 0 and 1), so the versions'
detections differ and each answer names the version that computed it. Each replica is checked on
its own private socket (the test runs as the server's user), never through the balancer.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from detserve.app.cli import app
from detserve.ops.replicas import ReplicaSet
from detserve.ops.server import ServerOptions, free_port
from detserve.ops.versions import serving_version
from tests.host_checks import needs_nginx

# The fast suite's share of this path: test_replicas.py (a replica set serving under load, one replica
# killed) and test_rollout.py (promote/rollback on one server); starting two replicas and rolling them
# both costs ~2.5 min of the fast suite's 20-minute budget, so every fleet test is in the slow set.
pytestmark = pytest.mark.slow

KEY = "test-fleet-key-0123456789abcdef"
REQUESTS = 30  # per check: with 2 replicas balanced round-robin, a replica left behind answers ~half


@pytest.fixture(scope="module")
def fleet_repo(two_versions_copy: Callable[[str], Path]) -> Path:
    return two_versions_copy("fleet_repo")


@pytest.fixture(scope="module")
def fleet(fleet_repo: Path) -> Iterator[ReplicaSet]:
    opts = ServerOptions(fleet_repo, grpc_port=free_port(), http_port=free_port(), metrics_port=0, admin_key=KEY)
    rs = ReplicaSet(opts, 2)
    try:
        rs.start()
        yield rs
    finally:
        rs.stop()


class Versions:
    """Which version computed an answer: the detections of each version's in-process pipeline."""

    def __init__(self, repo: Path, image: bytes) -> None:
        from loadtest.inprocess import InProcessPipeline

        self.image = image
        self.refs = {v: InProcessPipeline.from_repository(repo, "ssdlite", version=v).run([image])[0] for v in (1, 2)}

    def of(self, served: Any) -> int | None:
        for version, ref in self.refs.items():
            if len(served.scores) == len(ref["scores"]) and (
                np.allclose(served.scores, ref["scores"], atol=1e-3)
                and np.allclose(served.boxes, ref["boxes"], atol=1e-2)
                and np.array_equal(served.labels, ref["labels"])
            ):
                return version
        return None  # neither: a request whose steps ran on two versions, or a wrong answer

    def seen(self, url: str, n: int = REQUESTS) -> dict[int | None, int]:
        from clients.grpc_client import DetectorClient

        counts: dict[int | None, int] = {}
        with DetectorClient(url, "ssdlite") as client:
            for _ in range(n):
                v = self.of(client.detect(self.image))
                counts[v] = counts.get(v, 0) + 1
        return counts


def per_replica(fleet: ReplicaSet, versions: Versions) -> list[dict[int | None, int]]:
    """What each replica serves, asked on its own socket (not through the balancer)."""
    return [versions.seen(s.internal_url, 8) for s in fleet.servers]


def cli(*args: str) -> str:
    result = CliRunner().invoke(app, list(args), env={"DETSERVE_ADMIN_KEY": KEY, "DETSERVE_ADMIN_KEY_FILE": ""})
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


@needs_nginx
def test_promote_and_rollback_switch_every_replica(fleet: ReplicaSet, fleet_repo: Path, samples: dict[str, bytes]) -> None:
    url, repo = fleet.grpc_url, str(fleet_repo)
    versions = Versions(fleet_repo, samples["astronaut.jpg"])
    assert per_replica(fleet, versions) == [{1: 8}, {1: 8}]

    out = cli("promote", "ssdlite", "--version", "2", "--repository", repo, "--url", url)
    assert "serving version 2 (was 1)" in out
    assert per_replica(fleet, versions) == [{2: 8}, {2: 8}], out
    assert versions.seen(url) == {2: REQUESTS}
    assert serving_version(fleet_repo, "ssdlite") == 2  # what a restarted replica would serve

    listed = cli("models", "list", "--url", url)
    print(f"$ detserve promote ssdlite --version 2\n{out}$ detserve models list\n{listed}")  # for the docs (-s)
    for i in (0, 1):
        assert re.search(rf"replica {i}\b", listed), listed
    assert "disagree" not in listed, listed

    out = cli("rollback", "ssdlite", "--repository", repo, "--url", url)
    assert "serving version 1 (was 2)" in out
    assert per_replica(fleet, versions) == [{1: 8}, {1: 8}], out
    assert versions.seen(url) == {1: REQUESTS}
    assert serving_version(fleet_repo, "ssdlite") == 1


@needs_nginx
def test_status_shows_each_replica_and_reads_their_metrics(fleet: ReplicaSet) -> None:
    """The replicas' metrics ports are free ports (not 8002): status asks the server where they are."""
    ports = [s.options.metrics_port for s in fleet.servers]
    assert 8002 not in ports
    out = cli("status", "--url", fleet.grpc_url)
    print(f"$ detserve status\n{out}")
    assert "unavailable" not in out, out
    for i, port in enumerate(ports):
        assert re.search(rf"replica {i}\b.*:{port}/metrics", out), out
    rows = [line.split() for line in out.splitlines() if line.startswith("ssdlite ")]
    assert len(rows) == 2 and all(row[-1].isdigit() for row in rows), out  # pending read from each replica's metrics


@needs_nginx
def test_a_replica_is_addressed_only_with_the_key(fleet: ReplicaSet) -> None:
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    from detserve.ops.admin import GRPC_HEADER
    from detserve.ops.gate_fleet import REPLICA_HEADER

    client = grpcclient.InferenceServerClient(fleet.grpc_url)
    try:
        for headers in ({REPLICA_HEADER: "0"}, {REPLICA_HEADER: "1", GRPC_HEADER: "wrong-key-0123456789abcdef"}):
            with pytest.raises(InferenceServerException, match="admin key is missing or wrong"):
                client.get_inference_statistics(headers=headers)
            with pytest.raises(InferenceServerException, match="admin key is missing or wrong"):
                client.is_server_ready(headers=headers)
        with pytest.raises(InferenceServerException, match="no such replica: this server has 2"):
            client.get_inference_statistics(headers={REPLICA_HEADER: "2", GRPC_HEADER: KEY})
        for i in (0, 1):
            assert client.is_model_ready("ssdlite", headers={REPLICA_HEADER: str(i), GRPC_HEADER: KEY})
        assert client.is_model_ready("ssdlite")  # no header: balanced, open as before
    finally:
        client.close()


# ~40 s: a promote on one replica and a rollback on both
@needs_nginx
def test_a_replica_left_behind_is_brought_along(fleet: ReplicaSet, fleet_repo: Path, samples: dict[str, bytes]) -> None:
    """The issue's outage: a promote that reached one replica (as through the balancer before) left the other on
    version 1 while the files said 2. models list and status say the replicas disagree; the next rollback reads
    what each replica serves and brings both to version 1 (before: a replica could end with no servable version)."""
    from detserve.ops.fleet import Target
    from detserve.ops.versions import promote

    url = fleet.grpc_url
    versions = Versions(fleet_repo, samples["astronaut.jpg"])
    promote(url, KEY, fleet_repo, "ssdlite", 2, fleet=[Target(url, 0)])  # one replica only, as the balancer did
    assert per_replica(fleet, versions) == [{2: 8}, {1: 8}]
    listed = cli("models", "list", "--url", url)
    assert "replicas disagree" in listed and "ssdlite_core version 2 READY on replica 0 only" in listed, listed
    assert "replicas disagree" in cli("status", "--url", url)

    cli("rollback", "ssdlite", "--repository", str(fleet_repo), "--url", url)
    assert per_replica(fleet, versions) == [{1: 8}, {1: 8}]
    assert "disagree" not in cli("models", "list", "--url", url)
    assert serving_version(fleet_repo, "ssdlite") == 1


class Probe:
    """One client sending the same image through the gate until stopped; which version answered each request."""

    def __init__(self, url: str, versions: Versions) -> None:
        import threading

        self.url, self.versions = url, versions
        self.answers: list[tuple[float, int | None]] = []  # (sent at, version)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import time

        from clients.grpc_client import DetectorClient

        with DetectorClient(self.url, "ssdlite") as client:
            while not self._stop.is_set():
                t0 = time.time()
                self.answers.append((t0, self.versions.of(client.detect(self.versions.image))))

    def __enter__(self) -> Probe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(120)

    def after(self, t: float, until: float = float("inf")) -> dict[int | None, int]:
        counts: dict[int | None, int] = {}
        for sent, version in self.answers:
            if t <= sent < until:
                counts[version] = counts.get(version, 0) + 1
        return counts


@needs_nginx
def test_promote_and_rollback_under_locust_load(
    fleet: ReplicaSet, fleet_repo: Path, samples: dict[str, bytes], tmp_path: Path
) -> None:
    """Locust (4 users) through the gate while promote then rollback run over both replicas: 0 failed requests,
    every answer computed by one complete version (a probe compares each with both versions' detections), every
    request sent after a switch returned answered by the new version, and each replica on it afterwards."""
    import threading
    import time

    from loadtest.runner import LoadTestConfig, RequestLog, run_locust

    url, repo = fleet.grpc_url, str(fleet_repo)
    versions = Versions(fleet_repo, samples["astronaut.jpg"])
    cfg = LoadTestConfig(grpc_url=url, model="ssdlite", out_dir=tmp_path / "lt", users=4, duration_s=150.0)
    result: dict[str, RequestLog] = {}
    locust = threading.Thread(target=lambda: result.update(log=run_locust(cfg)), daemon=True)
    marks: dict[str, float] = {}
    with Probe(url, versions) as probe:
        locust.start()
        time.sleep(15)  # Locust's warm-up and traffic flowing before the promote
        marks["promote"] = time.time()
        out = cli("promote", "ssdlite", "--version", "2", "--repository", repo, "--url", url)
        marks["promoted"] = time.time()
        assert per_replica(fleet, versions) == [{2: 8}, {2: 8}], out
        time.sleep(5)
        marks["rollback"] = time.time()
        out += cli("rollback", "ssdlite", "--repository", repo, "--url", url)
        marks["rolled_back"] = time.time()
        assert per_replica(fleet, versions) == [{1: 8}, {1: 8}], out
        locust.join(300)
    log = result["log"]
    rows = {
        "locust_requests": len(log.ok),
        "locust_failed": int((~log.ok).sum()),
        "during_promote": int(((log.start >= marks["promote"]) & (log.start < marks["promoted"])).sum()),
        "during_rollback": int(((log.start >= marks["rollback"]) & (log.start < marks["rolled_back"])).sum()),
        "after_rollback": int((log.start >= marks["rolled_back"]).sum()),
        "promote_s": round(marks["promoted"] - marks["promote"], 1),
        "rollback_s": round(marks["rolled_back"] - marks["rollback"], 1),
        "probe": len(probe.answers),
        "probe_mixed": probe.after(0).get(None, 0),
        "probe_between": probe.after(marks["promoted"], marks["rollback"]),
        "cli": [line for line in out.splitlines() if "switched within" in line],
    }
    print("fleet rollout under load:", rows)
    assert rows["locust_failed"] == 0, rows
    assert rows["during_promote"] > 0 and rows["during_rollback"] > 0 and rows["after_rollback"] > 0, rows
    assert rows["probe_mixed"] == 0, rows
    assert set(probe.after(marks["rolled_back"])) == {1}, rows
    assert set(rows["probe_between"]) == {2}, rows
