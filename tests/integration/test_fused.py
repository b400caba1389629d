"""The fused CPU layout (converters/fused.py) on a real server: the ensemble's answers, per-request
controls, and a bad request failing alone inside a batch."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from clients.grpc_client import DetectorClient
from detserve.errors import ClientError, SpecError
from detserve.ops.server import TritonServer
from tests.integration.conftest import SHAPES


@pytest.fixture(scope="module")
def fused_server(repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    from converters.fused import FusedOptions, fused_repository
    from detserve.ops.server import running_server

    repo = fused_repository(repository, tmp_path_factory.mktemp("fused"), SHAPES, FusedOptions(instances=1))
    with running_server(repo) as server:
        yield server


def test_fused_config_comes_from_the_built_ensemble(repository: Path, tmp_path: Path) -> None:
    from converters.fused import FusedOptions, fused_config
    from detserve.pipeline import PREPROCESS, model_name
    from detserve.tritonconfig import read_config

    config = fused_config(SHAPES, repository, FusedOptions(instances=2, intra_op_threads=1))
    pre = read_config(repository / model_name(SHAPES, PREPROCESS))
    ensemble = read_config(repository / SHAPES)
    assert config.name == SHAPES and config.backend == "python"
    assert [t.name for t in config.input] == ["IMAGE", "FRAMES"]
    assert [t.name for t in config.output] == [t.name for t in ensemble.output]
    assert config.dynamic_batching == pre.dynamic_batching and config.max_batch_size == pre.max_batch_size
    assert config.instance_group[0].count == 2 and config.parameters["intra_op_threads"].string_value == "1"
    assert config.parameters["preprocess_spec"] == pre.parameters["preprocess_spec"]
    with pytest.raises(SpecError, match="instances and thread counts"):
        fused_config(SHAPES, repository, FusedOptions(instances=-1))


def test_fused_answers_what_the_ensemble_answers(fused_server: TritonServer, grpc_url: str, samples: dict[str, bytes]) -> None:
    blobs = list(samples.values())
    with DetectorClient(grpc_url, SHAPES) as ensemble, DetectorClient(fused_server.options.grpc_url, SHAPES) as fused:
        want = [ensemble.detect(b) for b in blobs]
        got = fused.detect_many(blobs)  # concurrently: batched together by the dynamic batcher
        strict = fused.detect(blobs[0], score_threshold=0.9, max_det=2)
    assert sum(len(w) for w in want) > 0
    for w, g in zip(want, got, strict=True):
        assert not isinstance(g, ClientError)
        assert np.array_equal(w.labels, g.labels)
        np.testing.assert_allclose(g.boxes, w.boxes, atol=1e-3)
        np.testing.assert_allclose(g.scores, w.scores, atol=1e-5)
    assert len(strict) <= 2 and (strict.scores >= 0.9).all()


def test_a_bad_image_fails_alone_in_a_batch(fused_server: TritonServer, samples: dict[str, bytes]) -> None:
    good = list(samples.values())[:3]
    with DetectorClient(fused_server.options.grpc_url, SHAPES) as client:
        results = client.detect_many([good[0], b"not an image", good[1], good[2]])
        after = client.detect(good[0])
    assert isinstance(results[1], ClientError) and "image" in str(results[1]).lower()
    assert all(not isinstance(r, ClientError) for i, r in enumerate(results) if i != 1)
    assert len(after) == len(results[0])  # type: ignore[arg-type]


@pytest.mark.documents("detserve fuse --repository R --model M --out O")
def test_detserve_fuse_writes_a_servable_layout_or_says_why_not(repository: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from detserve.app.cli import app

    ok = CliRunner().invoke(app, ["fuse", "--repository", str(repository), "--model", SHAPES, "--out", str(tmp_path)])
    assert ok.exit_code == 0, ok.output
    version_dirs = [p for p in (tmp_path / SHAPES).iterdir() if p.is_dir()]
    assert len(version_dirs) == 1
    assert {p.name for p in version_dirs[0].iterdir()} == {"model.onnx", "model.py", "spec.json", "build.json"}
    assert "fused_model" in (version_dirs[0] / "model.py").read_text()
    missing = CliRunner().invoke(app, ["fuse", "--repository", str(repository), "--model", "nope", "--out", str(tmp_path)])
    assert missing.exit_code == 1 and "nope" in missing.output


def test_build_writes_the_fused_layout_beside_the_ensemble(tmp_path: Path) -> None:
    from converters.repository import BuildRequest, build_repository
    from detserve.tritonconfig import read_config

    req = BuildRequest(
        "ssdlite320_mobilenet_v3_large", tmp_path / "repo", name="tiny", num_classes=3, spread_init_seed=0,
        verify=False, fused_out=tmp_path / "fused",
    )  # fmt: skip
    build_repository(req)
    assert read_config(tmp_path / "repo" / "tiny").platform == "ensemble"
    fused = read_config(tmp_path / "fused" / "tiny")
    assert fused.backend == "python" and fused.parameters["layout"].string_value == "fused"
    assert (tmp_path / "fused" / "tiny" / "1" / "model.onnx").is_file()
    chain = json.loads(fused.parameters["chain"].string_value)  # a single-stage chain: one core, one torch step
    assert set(chain["cores"]) == {"core"} and chain["cores"]["core"]["onnx_file"] == "model.onnx"
    assert chain["torch_threads"] == {"postprocess": 1}
