"""A real tritonserver on free loopback ports, serving the four parity detectors and the trained demo detector."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from detserve.app.demo import DEMO_DETECTOR, DEMO_WEIGHTS
from detserve.ops.server import TritonServer
from tests.detector_fixtures import NUM_CLASSES, PARITY_DETECTORS, SHORT_NAMES, make_checkpoint
from tests.rtsp_server import corrupt_shapes_video, fast_shapes_video, rtsp_camera, shapes_video  # noqa: F401 - fixtures
from training.synthetic import NUM_CLASSES as SHAPES_CLASSES

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test under tests/integration (``pytestmark`` in a conftest is ignored by pytest)."""
    for item in items:
        if HERE in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.integration)


SHAPES = "shapes"  # the trained demo detector (detserve/weights), for eval and compare
TWO_VERSIONS_DETECTOR = "ssdlite320_mobilenet_v3_large"  # the rollout, fleet and canary tests' model


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("checkpoints")
    return {d: make_checkpoint(d, directory) for d in PARITY_DETECTORS}


@pytest.fixture(scope="session")
def repository(tmp_path_factory: pytest.TempPathFactory, checkpoints: dict[str, Path]) -> Path:
    from converters.repository import BuildRequest, build_repository

    repo = tmp_path_factory.mktemp("model_repository")
    for detector, (kwargs, _) in PARITY_DETECTORS.items():
        build_repository(
            BuildRequest(
                detector=detector,
                repository=repo,
                name=SHORT_NAMES[detector],
                num_classes=NUM_CLASSES,
                checkpoint=checkpoints[detector],
                model_kwargs=kwargs,
                max_image_pixels=20_000_000,
            )
        )
    build_repository(
        BuildRequest(detector=DEMO_DETECTOR, repository=repo, name=SHAPES, num_classes=SHAPES_CLASSES, checkpoint=DEMO_WEIGHTS)
    )
    return repo


@pytest.fixture(scope="session")
def demo_built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo detector's repository (what `make demo` serves), built once per session."""
    from converters.repository import build_repository
    from detserve.app.demo import demo_build_request

    repo = tmp_path_factory.mktemp("demo_built")
    build_repository(demo_build_request(repo))
    return repo


@pytest.fixture(scope="session")
def demo_copy(demo_built: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """A fresh copy of the demo repository per call: servers write rollout state and reload models in theirs."""

    def copy(name: str) -> Path:
        return Path(shutil.copytree(demo_built, tmp_path_factory.mktemp(name) / "repo"))

    return copy


@pytest.fixture(scope="session")
def two_versions_built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ssdlite versions 1 and 2 (different seeded heads: answers tell the versions apart), built once per session."""
    from converters.repository import BuildRequest, build_repository

    repo = tmp_path_factory.mktemp("two_versions_built")
    kwargs, _ = PARITY_DETECTORS[TWO_VERSIONS_DETECTOR]
    for version in (1, 2):
        build_repository(
            BuildRequest(
                detector=TWO_VERSIONS_DETECTOR,
                repository=repo,
                name="ssdlite",
                num_classes=NUM_CLASSES,
                version=version,
                model_kwargs=kwargs,
                max_image_pixels=20_000_000,
                spread_init_seed=version - 1,
            )
        )
    return repo


@pytest.fixture(scope="session")
def two_versions_copy(two_versions_built: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """A fresh copy of the two-version repository per call: rollouts rewrite its configs and version folders."""

    def copy(name: str) -> Path:
        return Path(shutil.copytree(two_versions_built, tmp_path_factory.mktemp(name) / "repo"))

    return copy


@pytest.fixture(scope="session")
def server(repository: Path) -> Iterator[TritonServer]:
    from detserve.ops.server import running_server

    with running_server(repository) as srv:
        yield srv


@pytest.fixture(scope="session")
def grpc_url(server: TritonServer) -> str:
    return server.options.grpc_url
