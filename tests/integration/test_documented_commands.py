"""The README's and docs' commands as a user types them, through the CLI, against the real server.

Fast set: one module, the session's shared server (``server``: the demo detector as ``shapes`` and the
parity detectors), inputs written by the documented commands themselves (``detserve dataset``,
``detserve samples``: images of five sizes, one grey). What tests/unit/test_readme_commands.py
requires and the other modules do not run lives here; heavy builds and rollouts are in
test_documented_builds.py and test_documented_ops.py (slow).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from detserve.ops.server import TritonServer
from tests.integration.conftest import SHAPES

TIMEOUT_S = 240  # a CLI call on the busy 2-core CI machine; never a speed assertion


def detserve(*args: str, timeout: float = TIMEOUT_S, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The command as typed (``detserve`` is ``python -m detserve.app.cli``, the console script's target)."""
    command = [sys.executable, "-m", "detserve.app.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)


def ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.stdout


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder as ``detserve dataset test ... --limit`` and ``detserve samples`` write it: shapes and photographs."""
    root = tmp_path_factory.mktemp("documented")
    ok(detserve("dataset", "test", str(root / "shapes"), "--limit", "12"))
    ok(detserve("samples", str(root / "photos")))
    return root


@pytest.mark.documents("detserve dataset test D --limit 12", "detserve dataset train D --limit 3", "detserve samples D")
def test_dataset_and_samples_write_what_they_say(inputs: Path, tmp_path: Path) -> None:
    coco = json.loads((inputs / "shapes" / "annotations.json").read_text())
    pngs = sorted((inputs / "shapes" / "images").iterdir())
    assert len(coco["images"]) == len(pngs) == 12 and coco["annotations"]
    assert {im["file_name"] for im in coco["images"]} == {p.name for p in pngs}
    ok(detserve("dataset", "train", str(tmp_path / "train"), "--limit", "3"))
    assert len(json.loads((tmp_path / "train" / "annotations.json").read_text())["images"]) == 3
    sizes = {Image.open(p).size for p in (inputs / "photos").iterdir()}
    assert len(sizes) >= 3, sizes  # photographs of several sizes: the inputs below


@pytest.mark.documents(
    "detserve detect P --model M --url U --score-threshold 0.3 --max-det 100 --draw D --json",
    "detserve detect P --model M --url U",
)
def test_detect_draws_one_annotated_copy_per_input(server: TritonServer, inputs: Path, tmp_path: Path) -> None:
    photos = sorted((inputs / "photos").iterdir())
    shapes = sorted((inputs / "shapes" / "images").iterdir())[:2]
    paths = [str(p) for p in photos + shapes]
    url, drawn = server.options.grpc_url, tmp_path / "drawn"
    args = ("--model", SHAPES, "--url", url, "--score-threshold", "0.3", "--max-det", "100", "--draw", str(drawn), "--json")
    report = json.loads(ok(detserve("detect", *paths, *args)))
    assert [r["image"] for r in report] == paths
    assert all(s >= 0.3 for r in report for s in r["scores"]) and all(r["num_detections"] <= 100 for r in report)
    assert sum(r["num_detections"] for r in report[len(photos) :]) > 0  # trained on shapes: it finds them
    written = sorted(drawn.iterdir())
    assert [p.stem for p in written] == sorted(Path(p).stem for p in paths)  # one per input
    for item in report:
        source = Path(item["image"])
        copy = drawn / f"{source.stem}.png"
        assert copy.stat().st_size > 0
        with Image.open(source) as a, Image.open(copy) as b:
            assert a.size == b.size  # drawn at the original's size
            changed = np.any(np.asarray(a.convert("RGB"), np.int16) != np.asarray(b.convert("RGB"), np.int16))
        assert changed == (item["num_detections"] > 0), f"{source.name}: boxes drawn iff detections"
    plain = ok(detserve("detect", str(shapes[0]), "--model", SHAPES, "--url", url))
    assert f"{shapes[0]}:" in plain and "detections" in plain


@pytest.mark.documents("detserve status --url U")
def test_status_names_every_served_model(server: TritonServer) -> None:
    out = ok(detserve("status", "--url", server.options.grpc_url))
    assert "live yes, ready yes" in out, out
    rows = {ln.split()[0] for ln in out.splitlines() if ln.startswith(SHAPES)}
    assert {SHAPES, f"{SHAPES}_preprocess", f"{SHAPES}_core", f"{SHAPES}_postprocess"} <= rows, out


@pytest.fixture(scope="module")
def results(server: TritonServer, repository: Path, inputs: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``detserve run`` over the shapes and the photographs, class names from the repository."""
    out = tmp_path_factory.mktemp("run") / "new.jsonl"
    ok(
        detserve("run", "--model", SHAPES, "--images", str(inputs), "--out", str(out), "--max-in-flight", "8",
                 "--repository", str(repository), "--url", server.options.grpc_url, "--no-progress")
    )  # fmt: skip
    return out


def _expected_picks(records: list[dict[str, Any]], floor: float) -> set[str]:
    """The README's rules, read off the results: band 0.2-0.5 on a class's best, empty, > 20, circle/square IoU >= 0.5."""
    from detserve.jobs.mining import box_iou

    picked = set()
    for r in records:
        dets = r["detections"]
        best: dict[str, float] = {}
        for d in dets:
            best[d["class"]] = max(best.get(d["class"], 0.0), d["score"])
        strong = [d for d in dets if d["score"] >= floor]
        pairs = [(a, b) for a in strong if a["class"] == "circle" for b in strong if b["class"] == "square"]
        if (
            any(0.2 <= s <= 0.5 for s in best.values())
            or not strong
            or len(strong) > 20
            or any(box_iou(a["box"], b["box"]) >= 0.5 for a, b in pairs)
        ):
            picked.add(r["path"])
    return picked


@pytest.mark.documents(
    "detserve run --model M --images I --out O --max-in-flight 8 --repository R --url U --no-progress",
    "detserve mine --results R --out O --band 0.2-0.5 --empty --more-than 20 --overlap circle,square:0.5 --limit 500"
    " --seed 1 --mode symlink",
)
def test_run_then_mine_by_every_rule(results: Path, inputs: Path, tmp_path: Path) -> None:
    records = lines(results)
    assert len(records) == len([p for p in inputs.rglob("*") if p.suffix in (".png", ".jpg")]) and not [
        r for r in records if "error" in r
    ]
    assert {d["class"] for r in records for d in r["detections"]} <= {"circle", "square", "triangle", "star", "cross"}
    out = tmp_path / "review"
    ok(
        detserve("mine", "--results", str(results), "--out", str(out), "--band", "0.2-0.5", "--empty", "--more-than", "20",
                 "--overlap", "circle,square:0.5", "--limit", "500", "--seed", "1", "--mode", "symlink")
    )  # fmt: skip
    manifest = lines(out / "manifest.jsonl")
    assert {m["path"] for m in manifest} == _expected_picks(records, 0.3) != set()
    assert all((out / m["path"]).is_symlink() and (out / m["path"]).resolve() == (inputs / m["path"]).resolve() for m in manifest)


@pytest.mark.documents("detserve prelabel --results R --out O --format labelstudio --threshold 0.4 --audit 50 --seed 7")
def test_prelabel_label_studio_with_a_seeded_audit(results: Path, tmp_path: Path) -> None:
    def prelabel(out: Path, audit: str) -> tuple[list[Any], list[Any]]:
        ok(
            detserve("prelabel", "--results", str(results), "--out", str(out), "--format", "labelstudio",
                     "--threshold", "0.4", "--audit", audit, "--seed", "7")
        )  # fmt: skip
        return json.loads((out / "tasks.json").read_text()), json.loads((out / "audit-tasks.json").read_text())

    tasks, audit = prelabel(tmp_path / "ls", "50")
    assert len(tasks) == len(lines(results)) == len(audit)  # 50 asked, fewer images: every one, blind
    scores = [r["score"] for t in tasks for p in t["predictions"] for r in p["result"]]
    assert scores and min(scores) >= 0.4
    assert all("predictions" not in t for t in audit)
    first, again = prelabel(tmp_path / "a", "5")[1], prelabel(tmp_path / "b", "5")[1]
    assert len(first) == 5 and first == again  # the seed fixes the sample


@pytest.mark.documents("detserve check-images D --near-duplicates --move-to Q --report J")
def test_check_images_moves_broken_and_duplicate_files_and_deletes_nothing(inputs: Path, tmp_path: Path) -> None:
    folder = tmp_path / "new"
    folder.mkdir()
    shapes = sorted((inputs / "shapes" / "images").iterdir())
    for p in shapes[:4]:
        (folder / p.name).write_bytes(p.read_bytes())
    (folder / "zz_copy.png").write_bytes(shapes[0].read_bytes())  # exact duplicate, later in the walk: the copy moved aside
    with Image.open(shapes[1]) as im:
        im.convert("RGB").save(folder / "zz_reencoded.jpg", quality=90)  # near-duplicate: other bytes, same picture
    (folder / "cut.png").write_bytes(shapes[2].read_bytes()[:-300])
    before = sorted(p.name for p in folder.iterdir())
    quarantine, report = tmp_path / "new.quarantine", tmp_path / "check.json"
    proc = detserve("check-images", str(folder), "--near-duplicates", "--move-to", str(quarantine), "--report", str(report))
    assert proc.returncode in (0, 1) and "Traceback" not in proc.stderr, proc.stderr
    data = json.loads(report.read_text())
    kinds = {(p["path"], p["kind"]) for p in data["problems"]}
    assert ("zz_reencoded.jpg", "near-duplicate") in kinds and ("cut.png", "truncated") in kinds, kinds
    assert sorted(data["moved"]) == ["cut.png", "zz_copy.png"]
    left = sorted(p.name for p in folder.iterdir())
    moved = sorted(p.name for p in quarantine.iterdir() if p.name != "manifest.jsonl")
    assert sorted(left + moved) == before and "zz_reencoded.jpg" in left  # nothing deleted; near-duplicates only reported


@pytest.mark.documents("detserve loadtest --model M --url U --users 2 --duration 4s --shape fixed --images I --out O")
def test_loadtest_fixed_writes_its_report(server: TritonServer, inputs: Path, tmp_path: Path) -> None:
    out = tmp_path / "loadtest"
    args = ("--model", SHAPES, "--url", server.options.grpc_url, "--users", "2", "--duration", "4s", "--shape", "fixed")
    text = ok(detserve("loadtest", *args, "--images", str(inputs / "photos"), "--out", str(out)))
    assert "p99" in text or "p99" in (out / "report.md").read_text()
    report = json.loads((out / "report.json").read_text())
    assert report["failures"] == 0 and report["requests"] > 0, report
