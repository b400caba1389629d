"""The python-torch target on a real server: the trained demo detector built with ``--target python-torch``
(its core a torch.export artifact run by torch in the python step model), served and matched against
eager PyTorch; requests batched together and a bad one failing alone. The other families' served
checks are rows of the parity table with ``target="python-torch"`` (slow).

Slow too (~75 s: its own build and server): the fast suite is at its 20-minute budget and the python-torch
target's export, configs and trace fallback stay fast in tests/unit/test_torch_target.py."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from clients.grpc_client import DetectorClient
from detserve.errors import ClientError
from detserve.ops.server import TritonServer
from detserve.runtime.imaging import decode_image
from detserve.verification.matching import check_parity
from tests.detector_fixtures import detection_arrays

NAME = "demo_torch"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def torch_served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TritonServer, dict[str, Any]]]:
    from converters.repository import build_repository
    from detserve.ops.server import running_server
    from loadtest.bench_model import demo_build_request

    repo = tmp_path_factory.mktemp("torch_core")
    # verify: the unit tests and the per-family builds check the artifact; here the served answers are judged
    result = build_repository(dataclasses.replace(demo_build_request(repo, NAME), target="python-torch", verify=False))
    with running_server(repo) as server:
        yield server, result.record


@pytest.fixture(scope="module")
def eager() -> Any:
    from detserve.families import family_for_detector
    from loadtest.bench_model import DEMO_DETECTOR, DEMO_WEIGHTS
    from training.synthetic import NUM_CLASSES

    return family_for_detector(DEMO_DETECTOR).build(DEMO_DETECTOR, NUM_CLASSES, DEMO_WEIGHTS, {}, None)


def _reference(model: Any, blob: bytes) -> dict[str, Any]:
    import torch

    rgb = decode_image(blob, 1 << 30)
    with torch.no_grad():
        out = model([torch.from_numpy(rgb).permute(2, 0, 1).float().div(255.0)])[0]
    return {k: out[k].numpy() for k in ("boxes", "scores", "labels")}


def test_the_torch_core_serves_eager_pytorchs_detections(
    torch_served: tuple[TritonServer, dict[str, Any]], eager: Any, samples: dict[str, bytes], tmp_path: Path
) -> None:
    from detserve.app.demo import demo_images

    server, record = torch_served
    assert record["torch_core"]["core"]["format"] == "torch.export"
    assert (Path(server.options.repository) / f"{NAME}_core" / "1" / "model.pt2").is_file()
    # the held-out generated shapes it was trained on (detections to compare), and photos of other sizes
    blobs = [p.read_bytes() for p in demo_images(tmp_path)] + list(samples.values())[:3]
    with DetectorClient(server.options.grpc_url, NAME) as client:
        alone = [client.detect(b) for b in blobs]
        together = client.detect_many([*blobs, b"not an image"])  # concurrently: batched by the dynamic batcher
    total = 0
    for blob, one, batched in zip(blobs, alone, together, strict=False):
        assert not isinstance(batched, ClientError)
        check = check_parity(detection_arrays(one), detection_arrays(_reference(eager, blob)))
        assert check.ok, check.failures[:3]
        assert check_parity(detection_arrays(batched), detection_arrays(one), 0.0, 0.999, 1e-5).ok  # batch neighbours
        total += check.total
    assert total > 20, "the trained demo detector finds its shapes in the photos"
    assert isinstance(together[-1], ClientError) and "image" in str(together[-1]).lower()
