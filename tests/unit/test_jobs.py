"""Offline jobs without a server: the results file, resuming, mining rules, pre-label formats, image checks."""

from __future__ import annotations

import io
import json
import re
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from clients.bulk import BulkResult, walk_image_files
from clients.grpc_client import Detections
from detserve.errors import DetserveError
from detserve.jobs.bulkrun import RunSummary, record_result
from detserve.jobs.classes import class_names, parse_classes
from detserve.jobs.imagecheck import NearDuplicateIndex, check_images, dhash
from detserve.jobs.mining import Band, Empty, MoreThan, Overlap, mine, parse_band, parse_overlap
from detserve.jobs.prelabel import audit_sample, parse_thresholds, prelabel
from detserve.jobs.results import ResultWriter, RunInfo, read_records, repair_tail, sidecar

NAMES = {0: "__background__", 1: "circle", 2: "square", 3: "triangle"}


def _png(w: int = 64, h: int = 48, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _det(label: int, score: float, box: list[float]) -> dict[str, Any]:
    return {"label": label, "class": NAMES[label], "score": score, "box": box}


def _results(tmp_path: Path, records: list[dict[str, Any]], images: Path | None = None) -> Path:
    images = images or tmp_path / "images"
    images.mkdir(parents=True, exist_ok=True)
    for r in records:
        (images / r["path"]).parent.mkdir(parents=True, exist_ok=True)
        (images / r["path"]).write_bytes(_png())
    path = tmp_path / "results.jsonl"
    info = RunInfo(str(images), "shapes", "127.0.0.1:1", NAMES, "test", 0.05, 100, extra={"model_version": "3"})
    sidecar(path).write_text(json.dumps(info.to_dict()))
    with ResultWriter(path) as w:
        for r in records:
            w.write({"bytes": 10, "model": "shapes", "model_version": "3", "width": 200, "height": 100, **r})
    return path


RECORDS = [
    {"path": "a.png", "detections": [_det(1, 0.9, [10, 10, 50, 50]), _det(2, 0.35, [12, 10, 52, 50])]},
    {"path": "sub/b.png", "detections": []},
    {"path": "c.png", "detections": [_det(3, 0.8, [0, 0, 10, 10])] * 4},
    {"path": "d.png", "detections": [_det(1, 0.6, [100, 20, 199, 99])]},
    {"path": "e.png", "error": "not a decodable image"},
]


def test_a_killed_runs_half_line_is_skipped_by_readers_and_cut_by_resume(tmp_path: Path) -> None:
    path = _results(tmp_path, RECORDS[:2])
    with path.open("ab") as f:
        f.write(b'{"path": "half.png", "detec')
    assert [r["path"] for r in read_records(path)] == ["a.png", "sub/b.png"]
    assert repair_tail(path) == len(b'{"path": "half.png", "detec')
    assert path.read_bytes().endswith(b"\n") and repair_tail(path) == 0
    path.write_bytes(b'{"path": "x"}\nnot json\n')
    with pytest.raises(DetserveError, match="line 2 is not JSON"):
        list(read_records(path))


def test_record_result_writes_names_and_failures_and_keeps_transient_ones_out(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    (images / "ok.png").write_bytes(_png(40, 30))
    info = RunInfo(str(images), "shapes", "u", NAMES, "test", extra={"model_version": "2"})
    summary = RunSummary(tmp_path / "r.jsonl")
    dets = Detections(np.array([[1, 2, 3, 4]], np.float32), np.array([0.7], np.float32), np.array([2], np.int32))
    with ResultWriter(summary.results) as w:
        record_result(BulkResult(images / "ok.png", dets, nbytes=5), images, info, w, summary)
        record_result(BulkResult(images / "bad.png", None, "not a decodable image", 3), images, info, w, summary)
        record_result(BulkResult(images / "later.png", None, "failed to connect", 3, transient=True), images, info, w, summary)
    lines = list(read_records(summary.results))
    assert [r["path"] for r in lines] == ["ok.png", "bad.png"]
    assert lines[0]["detections"] == [{"label": 2, "class": "square", "score": 0.7, "box": [1.0, 2.0, 3.0, 4.0]}]
    assert (lines[0]["width"], lines[0]["height"], lines[0]["model_version"]) == (40, 30, "2")
    assert lines[1]["error"] == "not a decodable image" and summary.failed == {"bad.png": "not a decodable image"}
    assert summary.transient == {"later.png": "failed to connect"} and summary.detections == {"square": 1}


def test_walk_is_streamed_sorted_and_recursive(tmp_path: Path) -> None:
    for rel in ("b.png", "a.JPG", "z/c.webp", "z/y/d.png", "notes.txt", "a2/e.bmp"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    walk = walk_image_files(tmp_path)
    assert not isinstance(walk, list)
    assert [p.relative_to(tmp_path).as_posix() for p in walk] == ["a.JPG", "b.png", "a2/e.bmp", "z/c.webp", "z/y/d.png"]


def test_class_names_from_option_file_and_repository_fallback(tmp_path: Path) -> None:
    assert parse_classes("bg, cat,dog") == {0: "bg", 1: "cat", 2: "dog"}
    (tmp_path / "names.txt").write_text("person\n\ncar\n")
    assert parse_classes(str(tmp_path / "names.txt")) == {0: "person", 1: "car"}
    with pytest.raises(DetserveError, match="--classes"):
        parse_classes("a,,b")
    assert class_names("m", None, None)[0] == {}


def test_mining_rules(tmp_path: Path) -> None:
    results = _results(tmp_path, RECORDS)
    assert parse_band("square:0.2-0.5") == Band(0.2, 0.5, "square") and parse_band("0.1-0.3") == Band(0.1, 0.3)
    assert parse_overlap("circle,square:0.6") == Overlap("circle", "square", 0.6)
    for bad in ("0.5-0.2", "x:1-2", "nope"):
        with pytest.raises(DetserveError):
            parse_band(bad)
    with pytest.raises(DetserveError):
        parse_overlap("circle")
    rules = [Band(0.2, 0.5, "square"), Empty(), MoreThan(3), Overlap("circle", "square", 0.5)]
    s = mine(results, tmp_path / "mined", rules, min_score=0.3, mode="copy")
    manifest = [json.loads(line) for line in (tmp_path / "mined" / "manifest.jsonl").read_text().splitlines()]
    picked = {m["path"]: m["reasons"] for m in manifest}
    assert set(picked) == {"a.png", "sub/b.png", "c.png"} and s.scanned == 5 and s.matched == 3
    assert any("square best score 0.350" in r for r in picked["a.png"]) and any("overlap" in r for r in picked["a.png"])
    assert picked["sub/b.png"] == ["no detection >= 0.3"] and "more than 3" in picked["c.png"][0]
    assert (tmp_path / "mined" / "sub" / "b.png").read_bytes() == (tmp_path / "images" / "sub" / "b.png").read_bytes()
    with pytest.raises(DetserveError, match="already holds"):
        mine(results, tmp_path / "mined", rules)


def test_mining_sample_is_seeded_and_order_free(tmp_path: Path) -> None:
    many = [{"path": f"i{k:02d}.png", "detections": []} for k in range(30)]
    first = _results(tmp_path / "one", many)
    second = _results(tmp_path / "two", list(reversed(many)))
    picks = []
    for results, out in ((first, "s1"), (second, "s2")):
        mine(results, tmp_path / out, [Empty()], limit=5, seed=7, mode="symlink")
        picks.append([json.loads(x)["path"] for x in (tmp_path / out / "manifest.jsonl").read_text().splitlines()])
    assert picks[0] == picks[1] and len(picks[0]) == 5
    assert (tmp_path / "s1" / picks[0][0]).is_symlink()
    mine(first, tmp_path / "s3", [Empty()], limit=5, seed=8)
    assert [json.loads(x)["path"] for x in (tmp_path / "s3" / "manifest.jsonl").read_text().splitlines()] != picks[0]


def test_thresholds_parse() -> None:
    t = parse_thresholds(["circle=0.3", "0.6"])
    assert t.of("circle") == 0.3 and t.of("square") == 0.6
    for bad in (["circle=2"], ["=0.3"], ["x"]):
        with pytest.raises(DetserveError):
            parse_thresholds(bad)


def test_coco_prelabel_loads_in_pycocotools(tmp_path: Path) -> None:
    from pycocotools.coco import COCO

    results = _results(tmp_path, RECORDS)
    s = prelabel(results, tmp_path / "coco", "coco", parse_thresholds(["square=0.3", "0.5"]))
    coco = COCO(str(tmp_path / "coco" / "annotations.json"))
    assert len(coco.getImgIds()) == 4 and s.skipped_failures == 1  # the failure line has no image to label
    assert {c["name"] for c in coco.loadCats(coco.getCatIds())} == {"circle", "square", "triangle"}
    a = coco.loadImgs(coco.getImgIds())[0]
    anns = coco.loadAnns(coco.getAnnIds(imgIds=[a["id"]]))
    assert a["file_name"] == "a.png" and len(anns) == 2  # square at 0.35 kept by its own threshold
    assert anns[0]["bbox"] == [10, 10, 40, 40] and anns[0]["area"] == 1600
    res = coco.loadRes(coco.dataset["annotations"])  # also loads as detections
    assert len(res.getAnnIds()) == s.boxes == 2 + 4 + 1


_YOLO_LINE = re.compile(r"^(\d+) (0(\.\d+)?|1(\.0+)?) (0(\.\d+)?|1(\.0+)?) (0(\.\d+)?|1(\.0+)?) (0(\.\d+)?|1(\.0+)?)$")


def test_yolo_prelabel_is_valid_yolo_txt(tmp_path: Path) -> None:
    results = _results(tmp_path, RECORDS)
    prelabel(results, tmp_path / "yolo", "yolo", parse_thresholds(["0.5"]))
    classes = (tmp_path / "yolo" / "classes.txt").read_text().splitlines()
    assert classes == ["circle", "square", "triangle"]
    labels = sorted(p.relative_to(tmp_path / "yolo" / "labels").as_posix() for p in (tmp_path / "yolo" / "labels").rglob("*.txt"))
    assert labels == ["a.txt", "c.txt", "d.txt", "sub/b.txt"]
    assert (tmp_path / "yolo" / "labels" / "sub" / "b.txt").read_text() == ""  # a negative: an empty file
    for path in (tmp_path / "yolo" / "labels").rglob("*.txt"):
        for line in path.read_text().splitlines():
            assert _YOLO_LINE.match(line), line
            assert int(line.split()[0]) < len(classes)
    d = (tmp_path / "yolo" / "labels" / "d.txt").read_text().split()
    assert d[0] == "0" and [float(v) for v in d[1:]] == pytest.approx([0.7475, 0.595, 0.495, 0.79])


# Label Studio's task import format for rectangle pre-annotations (labelstud.io/guide/predictions,
# /guide/task_format): tasks with data + predictions[].result[] of rectanglelabels in percent.
LABEL_STUDIO_SCHEMA = {
    "type": "array",
    "items": {
        "type": "object",
        "required": ["data"],
        "properties": {
            "data": {"type": "object", "required": ["image"], "properties": {"image": {"type": "string"}}},
            "predictions": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["result"],
                    "properties": {
                        "model_version": {"type": "string"},
                        "score": {"type": "number"},
                        "result": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["id", "type", "from_name", "to_name", "value", "original_width", "original_height"],
                                "properties": {
                                    "id": {"type": "string"},
                                    "type": {"const": "rectanglelabels"},
                                    "from_name": {"type": "string"},
                                    "to_name": {"type": "string"},
                                    "original_width": {"type": "integer", "minimum": 1},
                                    "original_height": {"type": "integer", "minimum": 1},
                                    "image_rotation": {"type": "number"},
                                    "score": {"type": "number", "minimum": 0, "maximum": 1},
                                    "value": {
                                        "type": "object",
                                        "required": ["x", "y", "width", "height", "rectanglelabels"],
                                        "properties": {
                                            **{
                                                k: {"type": "number", "minimum": 0, "maximum": 100}
                                                for k in ("x", "y", "width", "height")
                                            },
                                            "rotation": {"type": "number"},
                                            "rectanglelabels": {"type": "array", "items": {"type": "string"}, "minItems": 1},
                                        },
                                    },
                                },
                            },
                        },
                    },
                },
            },
        },
    },
}


def test_labelstudio_prelabel_matches_the_documented_schema_and_the_audit_is_blind(tmp_path: Path) -> None:
    import jsonschema

    results = _results(tmp_path, RECORDS)
    s = prelabel(results, tmp_path / "ls", "labelstudio", parse_thresholds(["0.3"]), audit=2, seed=1)
    tasks = json.loads((tmp_path / "ls" / "tasks.json").read_text())
    jsonschema.validate(tasks, LABEL_STUDIO_SCHEMA)
    first = tasks[0]["predictions"][0]
    assert tasks[0]["data"]["image"] == "/data/local-files/?d=a.png" and first["model_version"] == "shapes:3"
    assert first["result"][0]["value"] == {
        "x": 5.0,
        "y": 10.0,
        "width": 20.0,
        "height": 40.0,
        "rotation": 0,
        "rectanglelabels": ["circle"],
    }
    config = (tmp_path / "ls" / "labeling-config.xml").read_text()
    assert '<RectangleLabels name="label" toName="image">' in config and '<Label value="triangle"/>' in config
    blind = json.loads((tmp_path / "ls" / "audit-tasks.json").read_text())
    assert len(blind) == 2 and all("predictions" not in t for t in blind)
    jsonschema.validate(blind, LABEL_STUDIO_SCHEMA)
    assert (
        s.audit
        == audit_sample(["a.png", "sub/b.png", "c.png", "d.png"], 2, 1)
        == audit_sample(["d.png", "c.png", "sub/b.png", "a.png"], 2, 1)
    )


def _planted(folder: Path) -> None:
    """A folder with one of each problem beside good files."""
    good = _png(64, 48, seed=1)
    (folder / "sub").mkdir(parents=True)
    (folder / "good.png").write_bytes(good)
    (folder / "sub" / "copy.png").write_bytes(good)  # duplicate by content
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "truncated.png").write_bytes(_png(64, 48, seed=2)[:-200])
    (folder / "text.jpg").write_bytes(b"this is not an image at all")
    buf = io.BytesIO()
    Image.new("RGB", (32, 32)).save(buf, "ICO")
    (folder / "icon.ico").write_bytes(buf.getvalue())
    (folder / "tiny.png").write_bytes(_png(8, 40, seed=3))
    (folder / "bomb.png").write_bytes(_png_header_only(30_000, 30_000))
    (folder / "notes.txt").write_text("not checked by default")
    near = np.asarray(Image.open(io.BytesIO(good))).astype(np.int16) + 3
    Image.fromarray(np.clip(near, 0, 255).astype(np.uint8)).save(folder / "near.png")


def _png_header_only(w: int, h: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    ihdr = w.to_bytes(4, "big") + h.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")


def test_check_images_finds_each_planted_problem_and_moves_without_deleting(tmp_path: Path) -> None:
    folder = tmp_path / "data"
    _planted(folder)
    r = check_images(folder, max_pixels=40_000_000, near_duplicates=True)
    kinds = {p.path: p.kind for p in r.problems}
    assert kinds == {
        "sub/copy.png": "duplicate", "empty.jpg": "empty", "truncated.png": "truncated", "text.jpg": "undecodable",
        "icon.ico": "unlisted-format", "tiny.png": "small", "bomb.png": "bomb", "near.png": "near-duplicate",
    }  # fmt: skip
    assert r.checked == 9 and r.broken == 6
    before = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    moved = check_images(folder, move_to=tmp_path / "aside")
    assert sorted(moved.moved) == sorted(k for k, v in kinds.items() if v not in ("small", "near-duplicate"))
    after = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    aside = sorted(p.relative_to(tmp_path / "aside").as_posix() for p in (tmp_path / "aside").rglob("*") if p.is_file())
    assert sorted(after + aside) == sorted([*before, "manifest.jsonl"])  # nothing deleted
    manifest = [json.loads(x) for x in (tmp_path / "aside" / "manifest.jsonl").read_text().splitlines()]
    assert {m["path"] for m in manifest} == set(moved.moved) and all(m["reasons"] for m in manifest)
    assert check_images(folder).broken == 0
    with pytest.raises(DetserveError, match="inside"):
        check_images(folder, move_to=folder / "x")


def test_near_duplicate_index_matches_brute_force() -> None:
    rng = np.random.default_rng(0)
    hashes = [int(h) for h in rng.integers(0, 2**63, 300, dtype=np.int64)]
    hashes += [h ^ (1 << int(rng.integers(64))) ^ (1 << int(rng.integers(64))) for h in hashes[:50]]
    index = NearDuplicateIndex(4)
    for k, h in enumerate(hashes):
        found = index.add(str(k), h)
        brute = [bin(h ^ o).count("1") for o in hashes[:k]]
        near = [b for b in brute if b <= 4]
        assert (found is None) == (not near) and (found is None or found[1] == min(near))
    assert dhash(np.zeros((20, 20, 3), np.uint8)) == 0


def test_cli_user_errors_are_one_message_and_exit_1(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from detserve.app.cli import app

    results = _results(tmp_path, RECORDS)
    runner = CliRunner()
    cases = [
        (["mine", "--results", str(results), "--out", str(tmp_path / "m")], "no rule given"),
        (["mine", "--results", str(results), "--out", str(tmp_path / "m"), "--band", "0.9-0.1"], "--band"),
        (["mine", "--results", str(results), "--out", str(tmp_path / "m"), "--empty", "--mode", "move"], "--mode"),
        (["prelabel", "--results", str(results), "--out", str(tmp_path / "p"), "--format", "voc"], "unknown format"),
        (
            ["run", "--model", "m", "--images", str(tmp_path / "none"), "--out", str(tmp_path / "r.jsonl")],
            "image folder not found",
        ),
        (["check-images", str(tmp_path / "none")], "image folder not found"),
    ]
    for args, message in cases:
        res = runner.invoke(app, args)
        assert res.exit_code == 1 and message in res.output, (args, res.output)
        assert "Traceback" not in res.output
    ok = runner.invoke(app, ["prelabel", "--results", str(results), "--out", str(tmp_path / "y"), "--format", "yolo"])
    assert ok.exit_code == 0 and "4 images" in ok.output
