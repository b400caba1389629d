"""Ray Serve, LitServe and BentoML serve the in-process pipeline and answer exactly what it answers.

``detserve bench --peers`` compares servers on the premise that their model work is identical; this
checks it on the sample photographs, sent concurrently so each peer batches them, against
``InProcessPipeline`` run one image at a time with the same thread count. The three peers start
once, together (module scope). No tritonserver is involved.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from loadtest.peers.common import PEERS, PeerConfig

DETECTOR = "ssdlite320_mobilenet_v3_large"
MODULES = {"ray": "ray.serve", "litserve": "litserve", "bentoml": "bentoml"}


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small detector with a score spread (no build-time verification: the peers are compared with the pipeline)."""
    import torch

    from converters.repository import BuildRequest, build_repository

    repo = tmp_path_factory.mktemp("peers") / "repo"
    with torch.random.fork_rng():
        torch.manual_seed(0)
        request = BuildRequest(detector=DETECTOR, repository=repo, name="tiny", num_classes=5, spread_init_seed=0, verify=False)
        build_repository(request)
    return repo


@pytest.fixture(scope="module")
def expected(repository: Path, samples: dict[str, bytes]) -> dict[str, Any]:
    """The pipeline's answers, one image at a time, with a peer replica's thread count, as JSON would carry them."""
    from loadtest.inprocess import InProcessPipeline
    from loadtest.peers.common import detections_json

    pipeline = InProcessPipeline.from_repository(repository, "tiny", intra_op_threads=1)
    return {name: json.loads(json.dumps(detections_json(pipeline.run([blob])[0]))) for name, blob in samples.items()}


@pytest.fixture(scope="module")
def running(repository: Path, samples: dict[str, bytes]) -> Iterator[dict[str, Any]]:
    """Every installed peer, started at the same time: their starts mostly wait (Ray's daemons, Serve's
    controller), so together they take about as long as Ray alone."""
    from detserve.ops.server_options import free_port
    from loadtest.peers.service import PeerService

    installed = [p for p in PEERS if importlib.util.find_spec(MODULES[p].split(".")[0]) is not None]
    # one replica keeps each start short; batches of up to 4 with a 50 ms wait so concurrent requests batch
    services = {
        p: PeerService(
            PeerConfig(p, str(repository), "tiny", free_port(), replicas=1, ort_threads=1, max_batch_size=4, batch_wait_ms=50),
            next(iter(samples.values())),
        )
        for p in installed
    }
    with ExitStack() as stack, ThreadPoolExecutor(max_workers=len(PEERS)) as pool:
        futures = {p: pool.submit(s.__enter__) for p, s in services.items()}
        for p, future in futures.items():
            try:
                future.result()
            finally:  # stopped whether this or another start failed
                stack.callback(services[p].stop)
        yield services


@pytest.fixture(params=PEERS)
def peer(request: pytest.FixtureRequest, running: dict[str, Any]) -> Any:
    if request.param not in running:
        pytest.skip(f"{request.param} is not installed (the 'peers' extra)")
    return running[request.param]


def test_peer_answers_what_the_pipeline_answers(peer: Any, expected: dict[str, Any], samples: dict[str, bytes]) -> None:
    names = sorted(samples) * 2  # each photograph twice, all at once: batches form, answers must not change
    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(lambda n: peer.detect(samples[n]), names))
    for name, (status, body) in zip(names, answers, strict=True):
        assert status == 200, f"{peer.cfg.peer}, {name}: HTTP {status} {body[:200]!r}"
        got = json.loads(body)
        assert got["labels"], f"{name}: nothing detected; the fixture needs a score spread"
        assert got == expected[name], f"{peer.cfg.peer}, {name}: the peer's answer differs from the in-process pipeline's"


def test_peer_refuses_a_bad_image_alone(peer: Any, samples: dict[str, bytes]) -> None:
    """A body that is no image gets 400 with the decoder's message; a good image sent beside it still succeeds."""
    good = next(iter(samples.values()))
    with ThreadPoolExecutor(max_workers=2) as pool:
        bad_answer, good_answer = list(pool.map(peer.detect, [b"not an image", good]))
    assert bad_answer[0] == 400 and b"not a decodable image" in bad_answer[1], bad_answer
    assert good_answer[0] == 200, good_answer


def test_the_launcher_turns_telemetry_off_and_keeps_ray_s_token_private(tmp_path: Path) -> None:
    """No usage reports, no files in the home folder, Ray's cluster token in a 0600 file and not in the environment."""
    import stat

    from loadtest.peers.service import peer_environment

    env = peer_environment(PeerConfig("ray", "/r", "demo", 1), tmp_path)
    assert env["RAY_USAGE_STATS_ENABLED"] == "0" and env["BENTOML_DO_NOT_TRACK"] == "True"
    assert env["RAY_AUTH_MODE"] == "token" and "RAY_AUTH_TOKEN" not in env
    token = Path(env["RAY_AUTH_TOKEN_PATH"])
    assert token.parent == tmp_path and stat.S_IMODE(token.stat().st_mode) == 0o600 and len(token.read_text()) == 64
    assert Path(env["BENTOML_HOME"]).parent == tmp_path
