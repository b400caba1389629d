"""eval and compare against the live server, on the trained demo detector and held-out test images."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from detserve.ops.server import TritonServer
from tests.integration.conftest import SHAPES
from training.synthetic import SPLITS, write_split


@pytest.fixture(scope="module")
def test_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shapes_test")
    write_split(SPLITS["test"], out, limit=32)
    return out


def _detserve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "detserve.app.cli", *args], capture_output=True, text=True, timeout=300)


def test_served_map_equals_pytorch_and_a_bad_file_fails_alone(
    server: TritonServer, repository: Path, test_images: Path, tmp_path: Path
) -> None:
    from detserve.verification.evalrun import run_eval

    # a copy of the split where one file is garbage: it gets a clear error, the run goes on
    images = tmp_path / "images"
    images.mkdir()
    for p in (test_images / "images").iterdir():
        (images / p.name).write_bytes(p.read_bytes())
    (images / "test_000005.png").write_bytes(b"not a png at all")
    report = run_eval(
        server.options.grpc_url,
        SHAPES,
        test_images / "annotations.json",
        images,
        repository,
        max_det=100,
        progress=False,
        echo=lambda _: None,
    )
    assert set(report.errors) == {"test_000005.png"}
    assert "not a decodable image" in report.errors["test_000005.png"]
    assert report.pytorch is not None
    assert report.served["mAP"] > 0.5  # trained: meaningful boxes on held-out images
    assert abs(report.delta_points["mAP"]) <= 0.1 and report.within_tolerance
    assert report.detections["served"] == report.detections["pytorch"]


@pytest.mark.slow  # the max_det 100 eval and compare stay fast; 500 is the same path with a larger cap
@pytest.mark.documents(
    "detserve eval --model M --annotations A --images I --url U --repository R --max-det 500 --out O --no-progress"
)
def test_eval_command_at_max_det_500(server: TritonServer, repository: Path, test_images: Path, tmp_path: Path) -> None:
    proc = _detserve(
        "eval", "--model", SHAPES, "--annotations", str(test_images / "annotations.json"), "--images", str(test_images / "images"),
        "--url", server.options.grpc_url, "--repository", str(repository), "--max-det", "500", "--out", str(tmp_path), "--no-progress",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr + proc.stdout
    data = json.loads((tmp_path / f"eval_{SHAPES}_maxdet500.json").read_text())
    assert data["max_det"] == 500 and data["within_tolerance"] is True and not data["errors"]
    assert "| mAP |" in proc.stdout
    bad = _detserve(
        "eval", "--model", SHAPES, "--annotations", str(tmp_path / "none.json"), "--images", str(tmp_path), "--max-det", "50"
    )
    assert bad.returncode == 1 and "--max-det must be one of" in bad.stderr


@pytest.mark.documents("detserve compare --model M --repository R --url U --limit 8 --out O IMAGES")
def test_compare_live_endpoint_agrees(server: TritonServer, repository: Path, test_images: Path, tmp_path: Path) -> None:
    proc = _detserve(
        "compare", "--model", SHAPES, "--repository", str(repository), "--url", server.options.grpc_url,
        "--limit", "8", "--out", str(tmp_path), str(test_images / "images"),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr + proc.stdout
    data = json.loads((tmp_path / "compare.json").read_text())
    assert data["ok"] and not data["problems"]
    sides = {s["side"]: s for s in data["sides"]}
    assert set(sides) == {"onnxruntime", "server"}
    high = sides["server"]["bands"][0]
    assert high["reference"] > 0 and high["matched"] == high["reference"] and high["extra"] == 0
    assert all(p["ok"] for p in data["batch_position"]) and len(data["batch_position"]) == 3
    assert (tmp_path / "compare.html").is_file() and "tensorrt" in data["skipped"]


def test_compare_skips_only_an_unavailable_tensorrt_side(
    repository: Path, test_images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A version with an engine that cannot run here (no metadata, no TensorRT, no GPU) is "skipped"; a
    bug on that side (here: a session whose run raises TypeError) raises instead of hiding as "skipped"."""
    from detserve.pipeline import CORE, model_name
    from loadtest import compare

    repo = Path(shutil.copytree(repository, tmp_path / "repo"))
    (repo / model_name(SHAPES, CORE) / "1" / "model.plan").write_bytes(b"not an engine")
    images = sorted((test_images / "images").iterdir())[:2]
    report = compare.run_compare(repo, SHAPES, images, echo=lambda _: None)
    assert report.skipped["tensorrt"].startswith("EngineMismatchError: model.plan.json is missing")
    assert {s.side for s in report.sides} == {"onnxruntime"}

    class BrokenSession:  # TensorRT available, then a bug in the code that feeds it
        def __init__(self, plan: Path) -> None:
            pass

        def run(self, names: object, feeds: object) -> list[object]:
            raise TypeError("a bug, not a missing GPU")

    monkeypatch.setattr(compare, "_TrtSession", BrokenSession)
    with pytest.raises(TypeError, match="a bug"):
        compare.run_compare(repo, SHAPES, images, echo=lambda _: None)


def test_bulk_client_reports_a_missing_file_and_finishes_the_rest(
    server: TritonServer, test_images: Path, tmp_path: Path
) -> None:
    from clients.bulk import detect_paths, image_files

    paths = image_files(test_images / "images")[:4]
    results = detect_paths(
        server.options.grpc_url, SHAPES, [*paths[:2], tmp_path / "gone.png", *paths[2:]], max_in_flight=3, progress=False
    )
    assert [r.path.name for r in results] == [paths[0].name, paths[1].name, "gone.png", paths[2].name, paths[3].name]
    assert results[2].detections is None and "cannot read" in (results[2].error or "")
    assert all(r.detections is not None and len(r.detections) > 0 for k, r in enumerate(results) if k != 2)


@pytest.mark.slow
def test_full_test_split_eval(server: TritonServer, repository: Path, tmp_path: Path) -> None:
    """The whole held-out split at max_det 100 and 500; reports land in out/reports/."""
    from detserve.verification.evalrun import run_eval, write_report

    split = write_split(SPLITS["test"], tmp_path / "test")
    for max_det in (100, 500):
        report = run_eval(
            server.options.grpc_url, SHAPES, split, tmp_path / "test" / "images", repository, max_det=max_det, progress=False
        )
        write_report(report, Path(__file__).resolve().parents[2] / "out" / "reports")
        assert not report.errors and report.within_tolerance
        assert report.pytorch is not None and report.pytorch["AP50"] >= 0.90 and report.pytorch["mAP"] >= 0.60
