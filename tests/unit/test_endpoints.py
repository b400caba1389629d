"""Several machines (issue 23 part 2): endpoint lists, DNS discovery, and the repository-files rule.

The rule: servers sharing one repository read the same files, so the rollout writes them once per phase,
after the phase succeeded on every target; at every moment the files name a version that the targets
serve, and a server restarted then comes up on it. Checked here at every admin call of a rollout over
three in-memory servers (the servers are stand-ins; the rollout and the files are the real ones).
"""

from __future__ import annotations

import contextlib
import json
import socket
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2 as mc

from detserve.errors import ClientError, DetserveError
from detserve.ops import rollout
from detserve.ops.endpoints import discover, endpoint_urls, parse_endpoints
from detserve.ops.fleet import Target
from detserve.ops.versions import models_of
from detserve.tritonconfig import read_config, render

STEPS = ("m_preprocess", "m_core", "m_postprocess")


def test_endpoints_list_and_file(tmp_path: Path) -> None:
    assert parse_endpoints("h1:8001, h2:8001,h1:8001") == ["h1:8001", "h2:8001"]
    assert parse_endpoints("[::1]:8001,10.0.0.7:9") == ["[::1]:8001", "10.0.0.7:9"]
    listing = tmp_path / "fleet.txt"
    listing.write_text("# the pods\nh1:8001\n\n  h2:8001  # second\nh3:8001\n")
    assert parse_endpoints(f"@{listing}") == ["h1:8001", "h2:8001", "h3:8001"]
    for bad in ("h1", "h1:http", "h1:0", ":8001", ","):
        with pytest.raises(ClientError):
            parse_endpoints(bad)
    with pytest.raises(ClientError, match="cannot read the endpoints file"):
        parse_endpoints(f"@{tmp_path / 'missing'}")
    assert endpoint_urls(None, None) is None  # neither option: --url


def test_discover_expands_every_address_of_a_name() -> None:
    """``localhost`` through the system resolver: its loopback address(es), each at the port, each once."""
    found = discover("localhost:8001")
    assert "127.0.0.1:8001" in found and len(found) == len(set(found))
    assert all(u in ("127.0.0.1:8001", "[::1]:8001") for u in found), found

    def headless_service(host: str, port: int, **kw: Any) -> list[tuple[Any, ...]]:
        """What getaddrinfo returns for a headless Service with three ready pods (A and AAAA records)."""
        assert (host, port, kw) == ("detserve.ns.svc", 8001, {"type": socket.SOCK_STREAM})
        v4 = [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (f"10.1.0.{i}", port)) for i in (4, 5, 4)]
        return [*v4, (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("fd00::6", port, 0, 0))]

    assert discover("detserve.ns.svc:8001", headless_service) == ["10.1.0.4:8001", "10.1.0.5:8001", "[fd00::6]:8001"]

    def unknown(host: str, port: int, **kw: Any) -> list[tuple[Any, ...]]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    with pytest.raises(ClientError, match="does not resolve") as e:
        discover("nothing.ns.svc:8001", unknown)
    assert "headless Service" in (e.value.hint or "")


def test_labels_name_the_endpoint_when_there_are_several() -> None:
    assert Target("h1:8001").label == "h1:8001"
    assert Target("h1:8001", 1).label == "replica 1"
    assert Target("h1:8001", 1, named=True).label == "h1:8001 replica 1"


# --- the repository-files rule, at every admin call of a rollout over three servers --------------------


def _repository(root: Path) -> Path:
    ensemble = mc.ModelConfig(name="m", platform="ensemble")
    for step in STEPS:
        ensemble.ensemble_scheduling.step.add(model_name=step, model_version=1)
        model = mc.ModelConfig(name=step, backend="python")
        model.version_policy.specific.versions.append(1)
        for v in (1, 2):
            (root / step / str(v)).mkdir(parents=True)
        (root / step / "config.pbtxt").write_text(render(model))
    (root / "m").mkdir()
    (root / "m" / "config.pbtxt").write_text(render(ensemble))
    return root


def files_state(repo: Path) -> tuple[int, tuple[tuple[int, ...], ...]]:
    """(the ensemble's pin, each step's versions) as the repository's files say."""
    pins = {s.model_version for s in read_config(repo / "m").ensemble_scheduling.step}
    assert len(pins) == 1, pins
    return pins.pop(), tuple(tuple(read_config(repo / s).version_policy.specific.versions) for s in STEPS)


class Server:
    """What one tritonserver has loaded: each model's config (as Triton's model-config answer has it)."""

    def __init__(self, repo: Path, up: bool = True) -> None:
        self.loaded = {
            p.name: json_format.MessageToDict(read_config(p), preserving_proto_field_name=True) for p in repo.iterdir()
        }
        self.up = up

    def serves(self) -> int:
        return int(self.loaded["m"]["ensemble_scheduling"]["step"][0]["model_version"])


class Admin:
    def __init__(self, server: Server, check: Any) -> None:
        self.server, self.check = server, check

    def model_config(self, name: str) -> dict[str, Any]:
        if not self.server.up:
            raise ClientError("no Triton server answers")
        return self.server.loaded[name]

    def load_model(self, name: str, config: str) -> None:
        self.check()
        if not self.server.up:
            raise ClientError("no Triton server answers at h3:8001")
        self.server.loaded[name] = json.loads(config)
        self.check()


def _rollout(repo: Path, servers: Sequence[Server], monkeypatch: pytest.MonkeyPatch) -> tuple[list[Any], Any]:
    seen: list[Any] = []

    def check() -> None:
        """A server restarted now serves the files' version: one that every live server's ensemble serves or holds loaded."""
        pin, steps = files_state(repo)
        assert all(pin in versions for versions in steps), (pin, steps)
        assert any(s.serves() == pin for s in servers if s.up), (pin, [s.serves() for s in servers])
        if not seen or seen[-1] != (pin, steps):
            seen.append((pin, steps))

    @contextlib.contextmanager
    def admins(fleet: Sequence[Target], key: str | None, timeout_s: float = 300.0) -> Iterator[list[Admin]]:
        yield [Admin(s, check) for s in servers]

    monkeypatch.setattr(rollout, "admins", admins)
    fleet = [Target(f"h{i + 1}:8001", named=True) for i in range(len(servers))]
    return seen, lambda: rollout.run_rollout(fleet, "k", models_of(repo, "m"), 1, 2)


def test_files_are_written_once_per_phase_consistent_with_what_serves(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = _repository(tmp_path)
    servers = [Server(repo) for _ in range(3)]
    seen, run = _rollout(repo, servers, monkeypatch)
    done = run()
    assert [s.serves() for s in servers] == [2, 2, 2]
    assert seen == [(1, ((1,),) * 3), (1, ((1, 2),) * 3), (2, ((1, 2),) * 3)]  # before / after phase 1 / after 2
    assert files_state(repo) == (2, ((2,),) * 3)  # after 3
    assert [label for label, _ in done.served_before] == ["h1:8001", "h2:8001", "h3:8001"]


def test_an_endpoint_down_in_phase_1_leaves_the_old_version_everywhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = _repository(tmp_path)
    servers = [Server(repo), Server(repo), Server(repo, up=False)]
    seen, run = _rollout(repo, servers, monkeypatch)
    with pytest.raises(DetserveError) as e:
        run()
    assert "stopped on h3:8001" in e.value.message and "no Triton server answers at h3:8001" in e.value.message
    assert e.value.message.endswith(
        "back on the version each served: h1:8001: 1, h2:8001: 1; "
        "the repository's files say version 1, which h3:8001 serves once it answers again"
    )
    for s in servers[:2]:
        assert s.serves() == 1
        assert all(s.loaded[step]["version_policy"]["specific"]["versions"] in (["1"], [1]) for step in STEPS), s.loaded
    assert files_state(repo) == (1, ((1,),) * 3)
    assert seen == [(1, ((1,),) * 3)]  # phase 1 never finished everywhere: the files never changed


def test_a_switch_that_fails_on_the_second_endpoint_sets_files_back_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = _repository(tmp_path)
    servers = [Server(repo) for _ in range(3)]
    seen, run = _rollout(repo, servers, monkeypatch)
    real_load = Admin.load_model

    def failing_switch(self: Admin, name: str, config: str) -> None:
        pins = {int(x["model_version"]) for x in json.loads(config).get("ensemble_scheduling", {}).get("step", [])}
        if self.server is servers[1] and name == "m" and pins == {2}:
            self.check()
            raise DetserveError("load 'm' failed: planted")
        real_load(self, name, config)

    monkeypatch.setattr(Admin, "load_model", failing_switch)
    with pytest.raises(DetserveError, match="stopped on h2:8001: load 'm' failed: planted") as e:
        run()
    assert e.value.message.endswith("back on the version each served: h1:8001: 1, h2:8001: 1, h3:8001: 1")
    assert [s.serves() for s in servers] == [1, 1, 1]
    assert files_state(repo) == (1, ((1,),) * 3)
    # h1 had switched: the files followed it, then were set back before the undo (checked at each of its loads)
    assert seen == [(1, ((1,),) * 3), (1, ((1, 2),) * 3), (2, ((1, 2),) * 3), (1, ((1,),) * 3)]


def test_an_interrupt_during_the_switches_undoes_like_a_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C, or SIGTERM when promote runs as a Kubernetes Job (handled as Ctrl-C): every target back on
    the old version, the files set back first, the message says it was interrupted."""
    repo = _repository(tmp_path)
    servers = [Server(repo) for _ in range(3)]
    _, run = _rollout(repo, servers, monkeypatch)
    real_load = Admin.load_model

    def interrupted_switch(self: Admin, name: str, config: str) -> None:
        pins = {int(x["model_version"]) for x in json.loads(config).get("ensemble_scheduling", {}).get("step", [])}
        if self.server is servers[2] and name == "m" and pins == {2}:
            raise KeyboardInterrupt
        real_load(self, name, config)

    monkeypatch.setattr(Admin, "load_model", interrupted_switch)
    with pytest.raises(DetserveError, match="stopped on h3:8001: interrupted") as e:
        run()
    assert e.value.message.endswith("back on the version each served: h1:8001: 1, h2:8001: 1, h3:8001: 1")
    assert [s.serves() for s in servers] == [1, 1, 1]
    assert files_state(repo) == (1, ((1,),) * 3)
