"""The peers' figures and their part of bench.md, on recorded numbers (no server): the best peer is the one with
the most requests per server CPU-second, the issue's targets compare the ensemble with it, every row is printed."""

from __future__ import annotations

import json
from typing import Any

import pytest

from detserve.errors import DetserveError
from loadtest.peers.common import PeerConfig
from loadtest.peers.measure import process_kind
from loadtest.peers.report import best_peer, peer_targets, peers_section


def _run(rps: float, server_cpu_s: float, p99: float, roles: dict[str, float]) -> dict[str, Any]:
    ok = int(rps * 10)
    return {
        "report": {"throughput_rps": rps, "latency_ms": {"p50": p99 / 2, "p99": p99}, "failures": 0, "requests": ok},
        "cpu": {
            "ok_requests": ok, "server_cpu_s": server_cpu_s, "others_share": 0.25,
            "roles": {k: {"cpu_s": v, "ms_per_request": 1000 * v / ok} for k, v in roles.items()},
        },
    }  # fmt: skip


def _peer(peer: str, rps: float, server_cpu_s: float, p99: float) -> dict[str, Any]:
    run = _run(rps, server_cpu_s, p99, {f"peer {peer}: worker": server_cpu_s, "locust": 1.0})
    cfg = PeerConfig(peer, "/r", "demo", 1, replicas=2, ort_threads=1, max_batch_size=8, batch_wait_ms=5.0)
    sweep = [
        {"max_batch_size": 8, "batch_wait_ms": 5.0, "throughput_rps": rps, "per_cpu_s": 1.0, "p50": 1, "p99": p99, "failures": 0}
    ]
    mem = {"processes": 3, "rss_mb": 900.0, "uss_mb": 700.0}
    return {**run, "config": vars(cfg), "memory_start": mem, "memory_after_load": mem, "started_s": 9.0, "sweep": sweep}


def _results() -> dict[str, Any]:
    triton = _run(40.0, 12.0, 500.0, {"tritonserver": 4.0, "stub demo_core": 8.0, "locust": 1.0})
    triton["memory"] = [{"uss_mb": 600.0}, {"uss_mb": 400.0}]
    return {
        "config": {"users": 16},
        "inprocess": {
            "stage_cpu_ms_per_image": {"preprocess": 5.0, "core": 20.0, "postprocess": 2.0},
            "best_images_per_cpu_s": 37.0,
        },
        "triton": triton,  # 400 requests / 12 CPU-s = 33.3 per CPU-s
        "peers": {
            "ray": _peer("ray", 30.0, 15.0, 600.0),  # 20 per CPU-s
            "litserve": _peer("litserve", 35.0, 14.0, 450.0),  # 25 per CPU-s: the best
            "bentoml": _peer("bentoml", 20.0, 10.0, 900.0),  # 20 per CPU-s
        },
    }


def test_targets_compare_the_ensemble_with_the_best_peer_per_cpu_second() -> None:
    r = _results()
    assert best_peer(r) == "litserve"
    per_cpu, p99 = peer_targets(r)
    assert per_cpu["value"] == pytest.approx((400 / 12) / 25) and per_cpu["met"]  # 1.33 >= 1.2
    assert p99["value"] == pytest.approx(500 / 450) and not p99["met"]


def test_the_section_prints_every_server_sweep_and_cpu_split() -> None:
    r = _results()
    r["peer_targets"] = peer_targets(r)
    text = "\n".join(peers_section(r))
    assert "| (c) Triton ensemble | dynamic batching | 40.0 | 33.3 | 250 | 500 | 1000 |  | 2 | 25% | 0 |" in text
    assert "| LitServe (batching) | 2 x 1 thread(s), batch 8, wait 5 ms | 35.0 | 25.0 |" in text
    assert "BentoML (adaptive batching) | 2 x 1 thread(s), batch 8, adaptive wait" in text
    assert "| bentoml | 8 | adaptive |" in text and "| ray | 8 | 5 |" in text
    assert (
        "| served / litserve, per server CPU-second | 1.33 | >= 1.20 | yes | 33.3 vs 25.0 req per CPU-s; the in-process limit itself: 37.0 per CPU-s = 1.48x litserve |"
        in text
    )
    assert "- ray: server 50.0 ms = worker 50.0; Locust 3.3 ms" in text
    assert "same model work in process: 27.0 ms" in text
    assert peers_section({**r, "peers": {}}) == []


def test_process_kinds_name_each_peer_process() -> None:
    assert process_kind(("ray::ServeReplica:detect:Detector",)) == "ServeReplica"
    assert process_kind(("/x/raylet", "--flag")) == "raylet"
    spawned = ("python", "-B", "-c", "from multiprocessing.spawn import spawn_main; spawn_main(tracker_fd=7)", "--x")
    assert process_kind(spawned) == "spawned worker"
    assert process_kind(("python", "-m", "_bentoml_impl.worker.service", "x")) == "python -m _bentoml_impl.worker.service"
    assert process_kind(()) == "exited"


def test_peer_config_refuses_what_no_peer_can_run() -> None:
    with pytest.raises(DetserveError, match="unknown peer"):
        PeerConfig("torchserve", "/r", "demo", 1)
    with pytest.raises(DetserveError, match=">= 1"):
        PeerConfig("ray", "/r", "demo", 1, max_batch_size=0)
    cfg = PeerConfig("ray", "/r", "demo", 1)
    assert PeerConfig(**json.loads(cfg.to_json())) == cfg


def test_a_missing_peer_is_named_with_the_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    from loadtest.peers import measure

    monkeypatch.setitem(measure.PACKAGES, "ray", "no_such_package_p25")
    with pytest.raises(DetserveError, match="not installed: ray") as e:
        measure.check_installed()
    assert "[peers]" in (e.value.hint or "")
