"""compare: per-band counts, a planted high-score disagreement is flagged, low-score flips are not."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from loadtest.compare import write_report
from loadtest.compare_report import CompareReport, compare_side, high_score_disagreements, position_check


def _det(rows: list[tuple[float, float, float, float, float, int]]) -> dict[str, np.ndarray]:
    a = np.asarray(rows, dtype=np.float64).reshape(-1, 6)
    return {"boxes": a[:, :4].astype(np.float32), "scores": a[:, 4].astype(np.float32), "labels": a[:, 5].astype(np.int64)}


REFERENCE = [
    _det([(10, 10, 60, 60, 0.95, 1), (100, 100, 150, 150, 0.4, 2), (5, 5, 30, 30, 0.1, 3), (70, 5, 90, 25, 0.02, 1)]),
    _det([(20, 20, 80, 80, 0.8, 2)]),
]


def test_identical_sides_agree_in_every_band() -> None:
    cmp = compare_side("same", REFERENCE, REFERENCE)
    assert [b.reference for b in cmp.bands] == [2, 1, 1, 1]
    assert [b.matched for b in cmp.bands] == [2, 1, 1, 1]
    assert sum(b.missing + b.extra + b.moved for b in cmp.bands) == 0
    assert high_score_disagreements(cmp, 1e-3) == []


def test_low_score_flips_are_counted_but_not_failures() -> None:
    other = [
        _det([(10, 10, 60, 60, 0.95, 1), (100, 100, 150, 150, 0.4, 2), (70, 5, 90, 25, 0.03, 1), (150, 0, 190, 40, 0.01, 4)]),
        REFERENCE[1],
    ]
    cmp = compare_side("lowflip", REFERENCE, other)
    assert cmp.band("0.05–0.2").missing == 1  # the 0.1 box is gone
    assert cmp.band("<0.05").extra == 1  # a new 0.01 box
    assert cmp.band("<0.05").max_score_delta > 0
    assert high_score_disagreements(cmp, 1e-3) == []


def test_a_planted_high_score_disagreement_is_flagged() -> None:
    moved = [_det([(10, 10, 60, 60, 0.95, 1), (100, 100, 150, 150, 0.4, 2), (5, 5, 30, 30, 0.1, 3), (70, 5, 90, 25, 0.02, 1)]),
             _det([(30, 20, 90, 80, 0.8, 2)])]  # fmt: skip
    cmp = compare_side("planted", REFERENCE, moved)
    assert cmp.band("≥0.5").moved == 1 and cmp.band("≥0.5").max_box_delta == 10
    assert any("moved" in p for p in high_score_disagreements(cmp, 1e-3))

    dropped = [REFERENCE[0], _det([])]
    assert any("missing" in p for p in high_score_disagreements(compare_side("dropped", REFERENCE, dropped), 1e-3))
    relabelled = [REFERENCE[0], _det([(20, 20, 80, 80, 0.8, 3)])]
    problems = high_score_disagreements(compare_side("relabelled", REFERENCE, relabelled), 1e-3)
    assert any("missing" in p for p in problems) and any("extra" in p for p in problems)
    rescored = [REFERENCE[0], _det([(20, 20, 80, 80, 0.79, 2)])]
    assert any("Δscore" in p for p in high_score_disagreements(compare_side("rescored", REFERENCE, rescored), 1e-3))


def test_position_check_is_order_free_but_exact() -> None:
    singles = REFERENCE
    shuffled = {k: v[::-1] for k, v in REFERENCE[0].items()}
    ok = position_check("s", "how", singles, [(0, shuffled), (1, REFERENCE[1])])
    assert ok.ok and ok.identical == 2
    nudged = {**REFERENCE[1], "scores": REFERENCE[1]["scores"] + np.float32(1e-6)}
    bad = position_check("s", "how", singles, [(1, nudged)])
    assert not bad.ok and bad.max_score_delta > 0


def test_report_files_and_exit_condition(tmp_path: Path) -> None:
    report = CompareReport("m", 1, ["a.png", "b.png"], 0.0)
    report.sides.append(compare_side("server", REFERENCE, [REFERENCE[0], _det([])]))
    report.positions.append(position_check("server", "how", REFERENCE, [(0, REFERENCE[0])]))
    paths = write_report(report, tmp_path)
    data = json.loads(paths["json"].read_text())
    assert data["ok"] is False and data["problems"]
    assert "DISAGREE" in paths["markdown"].read_text() and "<table>" in paths["html"].read_text()


def _raw(selects: bool, error: float, scale: float) -> dict[str, object]:
    """The raw-tensor line of one backend: a logits output of magnitude ``scale`` off by ``error`` near 0."""
    from converters.onnx_export import CoreVerification, compare_outputs
    from loadtest.compare_report import raw_record

    ref = np.zeros((1, 30, 5), np.float32)
    ref[0, 0, 0] = scale
    got = ref.copy()
    got[0, 3, 2] = error
    out = compare_outputs("logits", got, ref, 1e-4, 1e-4)
    return raw_record(CoreVerification("onnxruntime", 1e-4, 1e-4, [(1, 3, 8, 8)], [out]), selects)


def test_raw_tensor_line_fails_a_fixed_slot_core_beyond_its_scaled_floor() -> None:
    report = CompareReport("m", 1, ["a.png"], 0.0)
    report.raw.append(_raw(selects=False, error=1e-3, scale=24.0))  # float32 noise of a trained-size network
    assert report.problems == []
    report.raw.append(_raw(selects=False, error=1e-3, scale=1.0))  # the same error on an output of scale 1
    assert len(report.problems) == 1 and "raw tensors beyond tolerance: logits" in report.problems[0]
    assert "BEYOND tolerance" in report.markdown()


def test_raw_tensor_line_is_information_where_the_core_selects_its_slots() -> None:
    """RT-DETR's slots come from a top-k: whole values differ between runtimes while the detections agree."""
    report = CompareReport("m", 1, ["a.png"], 0.0)
    report.sides.append(compare_side("onnxruntime", REFERENCE[:1], REFERENCE[:1]))
    report.raw.append(_raw(selects=True, error=4.6, scale=10.0))
    assert not report.raw[0]["ok"] and report.raw[0]["judged_by"] == "detections"
    assert report.problems == [] and report.to_dict()["ok"]
    assert "information (slots chosen by top-k" in report.markdown()
