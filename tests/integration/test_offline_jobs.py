"""Offline jobs against the real server: a bulk run killed mid-way and resumed, mining and pre-labelling its
results, check-images agreeing with the server's decoder, and the bulk run's throughput beside Locust's.

Generated held-out shapes images (tens of them) in a folder tree with planted broken files and a
duplicate. Figures go to out/reports/offline-jobs.json (no timing asserts).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from detserve.ops.server import TritonServer
from tests.integration.conftest import SHAPES
from tests.reports import record
from training.synthetic import CLASSES, SPLITS, write_split

BROKEN = {"broken/empty.png": b"", "broken/text.jpg": b"not an image, only text"}


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 test-split images in two levels of folders, a truncated and two other broken files, one duplicate."""
    split = tmp_path_factory.mktemp("split")
    write_split(SPLITS["test"], split, limit=40)
    root = tmp_path_factory.mktemp("tree") / "images"
    for k, src in enumerate(sorted((split / "images").iterdir())):
        dest = root / ("a" if k % 2 else "b/deeper") / src.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(src.read_bytes())
    first = sorted((root / "a").iterdir())[0]
    (root / "a" / "zz_duplicate.png").write_bytes(first.read_bytes())
    (root / "broken").mkdir()
    (root / "broken" / "truncated.png").write_bytes(first.read_bytes()[:-400])
    for rel, data in BROKEN.items():
        (root / rel).write_bytes(data)
    return root


def _image_count(root: Path) -> int:
    return sum(1 for p in root.rglob("*") if p.is_file())


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "detserve.app.cli", *args]


@pytest.fixture(scope="module")
def results(server: TritonServer, repository: Path, tree: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bulk run killed (SIGKILL) after a few lines, a half line appended as a kill mid-write leaves, then resumed."""
    started = time.monotonic()
    out = tmp_path_factory.mktemp("run") / "results.jsonl"
    args = _cli(
        "run", "--model", SHAPES, "--images", str(tree), "--out", str(out), "--url", server.options.grpc_url,
        "--repository", str(repository), "--max-in-flight", "2", "--no-progress",
    )  # fmt: skip
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if out.is_file() and out.read_bytes().count(b"\n") >= 4:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait(30)
    assert proc.returncode == -signal.SIGKILL, f"the run ended before it was killed: {proc.returncode}"
    written = out.read_bytes().count(b"\n")
    assert 4 <= written < _image_count(tree)
    with out.open("ab") as f:
        f.write(b'{"path": "a/half')  # what a kill in the middle of a write would leave
    resumed = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr + resumed.stdout
    assert f"({written} already done before this run)" in resumed.stdout
    record(
        "offline-jobs.json",
        "resume",
        {"images": _image_count(tree), "lines_before_kill": written, "seconds": round(time.monotonic() - started, 1),
         "summary": resumed.stdout},
    )  # fmt: skip
    return out


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.documents("detserve run --model M --images I --out O --url U --repository R --max-in-flight 2 --no-progress")
def test_killed_and_resumed_run_has_every_image_exactly_once(results: Path, tree: Path, server: TritonServer) -> None:
    lines = _lines(results)
    counts = Counter(r["path"] for r in lines)
    expected = {p.relative_to(tree).as_posix() for p in tree.rglob("*") if p.is_file()}
    assert set(counts) == expected and set(counts.values()) == {1}
    failed = {r["path"]: r["error"] for r in lines if "error" in r}
    assert set(failed) == {"broken/truncated.png", *BROKEN}
    assert "truncated" in failed["broken/truncated.png"] and "empty" in failed["broken/empty.png"]
    ok = [r for r in lines if "error" not in r]
    assert all(r["model"] == SHAPES and r["model_version"] == "1" and r["width"] > 0 for r in ok)
    classes = {d["class"] for r in ok for d in r["detections"]}
    assert classes <= set(CLASSES) and len(classes) >= 3  # names from the demo weights' provenance file
    assert json.loads(results.with_name(results.name + ".run.json").read_text())["class_source"].endswith(".json")
    record("offline-jobs.json", "exactly_once", {"paths": len(counts), "max_count": max(counts.values()), "failed": len(failed)})
    again = subprocess.run(
        _cli("run", "--model", SHAPES, "--images", str(tree), "--out", str(results), "--url", server.options.grpc_url, "--no-progress"),
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert again.returncode == 0 and "images: 0 detected, 0 unreadable" in again.stdout, again.stdout + again.stderr
    assert _lines(results) == lines


def test_check_images_agrees_with_the_server(results: Path, tree: Path, tmp_path: Path) -> None:
    from detserve.jobs.imagecheck import check_images

    report = check_images(tree)
    refused = {r["path"] for r in _lines(results) if "error" in r}
    kinds = {p.path: p.kind for p in report.problems}
    assert {p for p, k in kinds.items() if k != "duplicate"} == refused
    assert kinds["a/zz_duplicate.png"] == "duplicate"
    proc = subprocess.run(
        _cli("check-images", str(tree), "--report", str(tmp_path / "check.json")), capture_output=True, text=True
    )
    assert proc.returncode == 1 and "truncated" in proc.stdout
    assert json.loads((tmp_path / "check.json").read_text())["counts"]["empty"] == 1


@pytest.mark.documents(
    "detserve prelabel --results R --out O --format coco --threshold 0.5 --threshold star=0.3 --audit 4",
    "detserve prelabel --results R --out O --format yolo --threshold 0.5 --threshold star=0.3 --audit 4",
    "detserve prelabel --results R --out O --format labelstudio --threshold 0.5 --threshold star=0.3 --audit 4",
)
def test_mine_and_prelabel_the_served_results(results: Path, tree: Path, tmp_path: Path) -> None:
    from pycocotools.coco import COCO

    mined = subprocess.run(
        _cli("mine", "--results", str(results), "--out", str(tmp_path / "mined"), "--band", "0.05-0.5", "--more-than", "3",
             "--limit", "5", "--seed", "1", "--mode", "symlink"),
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert mined.returncode == 0, mined.stderr
    manifest = _lines(tmp_path / "mined" / "manifest.jsonl")
    assert 1 <= len(manifest) <= 5 and all(m["reasons"] for m in manifest)
    assert all((tmp_path / "mined" / m["path"]).resolve() == (tree / m["path"]).resolve() for m in manifest)
    for fmt in ("coco", "yolo", "labelstudio"):
        proc = subprocess.run(
            _cli("prelabel", "--results", str(results), "--out", str(tmp_path / fmt), "--format", fmt,
                 "--threshold", "0.5", "--threshold", "star=0.3", "--audit", "4"),
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
    coco = COCO(str(tmp_path / "coco" / "annotations.json"))
    assert len(coco.getImgIds()) == _image_count(tree) - 3
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(CLASSES)
    assert all(a["score"] >= (0.3 if coco.cats[a["category_id"]]["name"] == "star" else 0.5) for a in coco.dataset["annotations"])
    assert len(list((tmp_path / "yolo" / "labels").rglob("*.txt"))) == len(coco.getImgIds())
    tasks = json.loads((tmp_path / "labelstudio" / "tasks.json").read_text())
    assert len(tasks) == len(coco.getImgIds()) and tasks[0]["predictions"][0]["model_version"] == f"{SHAPES}:1"
    assert len(json.loads((tmp_path / "labelstudio" / "audit-tasks.json").read_text())) == 4


@pytest.mark.slow  # a benchmark (figures recorded, nothing asserted on speed): the fast suite's budget
def test_bulk_run_throughput_beside_the_load_test(server: TritonServer, tree: Path, tmp_path: Path) -> None:
    """Same model, same images, same concurrency and request controls, one after the other in one run."""
    from detserve.jobs.bulkrun import RunOptions, run_bulk
    from loadtest.runner import LoadTestConfig, run_loadtest

    good = tmp_path / "good"
    good.mkdir()
    sources = sorted(p for p in tree.rglob("*.png") if "broken" not in p.parts)
    for k in range(3):  # ~120 requests: a few seconds of the bulk run
        for p in sources:
            (good / f"{k}_{p.name}").write_bytes(p.read_bytes())
    users = 4
    cfg = LoadTestConfig(
        grpc_url=server.options.grpc_url, model=SHAPES, out_dir=tmp_path / "loadtest", users=users, duration_s=8.0,
        window_s=2.0, images=good, score_threshold=0.05, max_det=100,
    )  # fmt: skip

    def bulk(name: str) -> float:
        summary = run_bulk(
            RunOptions(images=good, model=SHAPES, results=tmp_path / name, url=server.options.grpc_url,
                       max_in_flight=users, score_threshold=0.05, max_det=100, progress=False)
        )  # fmt: skip
        assert summary.processed == len(sources) * 3 and not summary.failed and not summary.transient
        return summary.throughput

    before = bulk("before.jsonl")  # bulk, Locust, bulk again: the machine is shared, drift shows as before != after
    load = run_loadtest(cfg).report
    after = bulk("after.jsonl")
    assert load.failures == 0
    figures = {
        "model": SHAPES, "concurrency": users, "images_per_bulk_run": len(sources) * 3,
        "bulk_images_per_s": [round(before, 2), round(after, 2)], "loadtest_requests_per_s": round(load.throughput_rps, 2),
        "ratio_bulk_to_loadtest": round((before + after) / 2 / load.throughput_rps, 3),
    }  # fmt: skip
    record("offline-jobs.json", "throughput", figures)
    print(figures)
