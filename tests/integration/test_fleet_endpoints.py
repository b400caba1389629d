"""One rollout across several machines (issue 23, parts 2 and 4b): three ``detserve serve`` processes
on one machine sharing one repository, promoted and rolled back with ``--endpoints``.

The repository holds ssdlite version 1 and a version 2 from other weights (spread-init seeds 0 and 1),
so each answer names the version that computed it; every endpoint is checked on its own gate (one
tritonserver each). The abort: endpoint 3 is killed (its whole process tree, SIGKILL) as soon as the
promote prints its first phase-1 load on endpoint 1. The phases go endpoint after endpoint and loading
a composing model beside the old one takes seconds, so endpoint 3 is down before its turn: no hook in
the code under test, and the abort is the one a machine lost mid-rollout causes.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from detserve.app.cli import app
from detserve.ops.versions import serving_version
from tests.host_checks import needs_nginx
from tests.integration.test_fleet import Versions
from tests.integration.test_lifecycle import KEY, Serve, _processes, start_serve

pytestmark = [pytest.mark.slow, needs_nginx]  # three servers (~1 min to start on the 2-core CI machine)
PROBES = 8  # answers per endpoint and check: each endpoint is one tritonserver
ENV = {"DETSERVE_ADMIN_KEY": KEY, "DETSERVE_ADMIN_KEY_FILE": ""}


@pytest.fixture(scope="module")
def shared_repo(two_versions_copy: Callable[[str], Path]) -> Path:
    return two_versions_copy("shared_repo")


def _stop(s: Serve) -> None:
    s.stop()
    s.kill_leftovers()


@pytest.fixture(scope="module")
def endpoints(shared_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Serve]]:
    workdir = tmp_path_factory.mktemp("endpoints")
    servers: list[Serve] = []
    try:
        for _ in range(3):
            servers.append(start_serve(shared_repo, workdir))  # started together: they come up in parallel
        for s in servers:
            s.wait_ready()
            s.children("tritonserver"), s.children("nginx")
        yield servers
    finally:
        for s in servers:
            _stop(s)


@pytest.fixture(scope="module")
def versions(shared_repo: Path, samples: dict[str, bytes]) -> Versions:
    return Versions(shared_repo, samples["astronaut.jpg"])


def per_endpoint(servers: list[Serve], versions: Versions) -> list[dict[int | None, int]]:
    return [versions.seen(s.grpc_url, PROBES) for s in servers]


def cli(*args: str, ok: bool = True) -> str:
    result = CliRunner().invoke(app, list(args), env=ENV)
    assert (result.exit_code == 0) == ok, result.output + repr(result.exception)
    return result.output


@pytest.mark.documents(
    "detserve promote M --version V --repository R --endpoints E",
    "detserve rollback M --repository R --endpoints E",
    "detserve status --endpoints E",
)
def test_promote_and_rollback_switch_every_endpoint(endpoints: list[Serve], shared_repo: Path, versions: Versions) -> None:
    urls, repo = ",".join(s.grpc_url for s in endpoints), str(shared_repo)
    assert per_endpoint(endpoints, versions) == [{1: PROBES}] * 3

    out = cli("promote", "ssdlite", "--version", "2", "--repository", repo, "--endpoints", urls)
    assert "3 servers switched within" in out and "serving version 2 (was 1)" in out, out
    assert per_endpoint(endpoints, versions) == [{2: PROBES}] * 3, out
    assert serving_version(shared_repo, "ssdlite") == 2  # what a restarted endpoint serves

    status = cli("status", "--endpoints", urls)
    print(f"$ detserve promote ssdlite --version 2 --endpoints {urls}\n{out}$ detserve status --endpoints ...\n{status}")
    for s in endpoints:
        assert f"server {s.grpc_url}: live yes, ready yes" in status, status
    assert "disagree" not in status, status

    out = cli("rollback", "ssdlite", "--repository", repo, "--endpoints", urls)
    assert "serving version 1 (was 2)" in out, out
    assert per_endpoint(endpoints, versions) == [{1: PROBES}] * 3, out
    assert serving_version(shared_repo, "ssdlite") == 1


@pytest.mark.documents("detserve status --discover D", "detserve models list --discover D")
def test_discover_localhost_reaches_the_endpoint(endpoints: list[Serve]) -> None:
    """``localhost`` resolves to 127.0.0.1 here (the unit test covers a name with several records)."""
    port = endpoints[0].grpc_port
    status = cli("status", "--discover", f"localhost:{port}")
    assert f"server 127.0.0.1:{port}: live yes, ready yes" in status, status
    listed = cli("models", "list", "--discover", f"localhost:{port}")
    assert "ssdlite_core" in listed and "READY" in listed, listed


def _kill_tree(s: Serve) -> None:
    """SIGKILL ``detserve serve`` and everything under it (Triton, its stubs, nginx and its workers)."""
    procs = _processes()
    tree, grew = {s.proc.pid}, True
    while grew:
        more = {p for p, (_, ppid, _, _) in procs.items() if ppid in tree} - tree
        tree |= more
        grew = bool(more)
    for pid in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    s.proc.wait(timeout=30)


def test_an_endpoint_killed_in_phase_1_aborts_with_the_old_version_everywhere(
    endpoints: list[Serve], shared_repo: Path, versions: Versions, tmp_path: Path
) -> None:
    first, victim = endpoints[0], endpoints[2]
    listing = tmp_path / "endpoints.txt"
    listing.write_text("".join(f"{s.grpc_url}\n" for s in endpoints))
    command = [sys.executable, "-m", "detserve.app.cli", "promote", "ssdlite", "--version", "2"]
    command += ["--repository", str(shared_repo), "--endpoints", f"@{listing}"]
    env = {**os.environ, **ENV, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines, killed_at = [], None
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if killed_at is None and line.startswith(f"{first.grpc_url}: load ssdlite_"):  # phase 1 on endpoint 1
            _kill_tree(victim)
            killed_at = len(lines)
    out = "".join(lines)
    assert proc.wait(timeout=300) != 0, out
    print(f"$ detserve promote ssdlite --version 2 --endpoints @{listing.name}  (endpoint 3 killed in phase 1)\n{out}")
    assert killed_at is not None, out
    assert not any(line.startswith(f"{victim.grpc_url}: load") for line in lines[:killed_at]), out
    assert f"stopped on {victim.grpc_url}" in out and f"no Triton server answers at {victim.grpc_url}" in out, out
    assert "switched within" not in out, out  # no endpoint was switched
    assert f"which {victim.grpc_url} serves once it answers again" in out, out
    assert per_endpoint(endpoints[:2], versions) == [{1: PROBES}] * 2, out
    assert serving_version(shared_repo, "ssdlite") == 1

    listed = cli("models", "list", "--endpoints", ",".join(s.grpc_url for s in endpoints[:2]))
    assert "disagree" not in listed, listed
    assert len(re.findall(r"ssdlite_core\s+version 2\s+(?:UNAVAILABLE|UNLOADING)", listed)) == 2, listed  # narrowed back

    # the repository rule: the endpoint coming back reads the files and serves what the others serve
    again = start_serve(shared_repo, tmp_path)
    try:
        t0 = time.monotonic()
        again.wait_ready()
        assert per_endpoint([again], versions) == [{1: PROBES}], again.output()
        print(f"endpoint 3 back after {time.monotonic() - t0:.0f} s, serving version 1")
    finally:
        _stop(again)
