"""What ``detserve compare`` concludes, and the report it writes: the verdict and its rendering.

Detections are matched order-free (same label, greedy by score, IoU ≥ 0.5) and counted per score
band, because conversion is never lossless: high-score boxes must agree, low-score boxes may flip,
and the report shows how many did.

Also: the core's raw-tensor error (max abs / rel against PyTorch), judged as the build judges it: per
tensor, ``|diff| <= atol * max(1, max|ref|) + rtol * |ref|``, where every output slot is fixed; where the
core picks its slots by a top-k (``Family.core_selects``: RT-DETR, D-FINE) near-ties reorder the slots
between runtimes, so those figures are information and the detection comparison decides. And the
batch-position check — the same image at other positions and beside other images must give the same
detections.

Plain data in, plain data out (no model, no runtime): :mod:`loadtest.compare` runs the sides and
fills a :class:`CompareReport`; this module judges and renders it (JSON, markdown, HTML).
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from detserve.verification.matching import match_detections

Det = dict[str, np.ndarray]  # boxes [K, 4], scores [K], labels [K]

BANDS: tuple[tuple[str, float, float], ...] = (
    ("≥0.5", 0.5, math.inf),
    ("0.2–0.5", 0.2, 0.5),
    ("0.05–0.2", 0.05, 0.2),
    ("<0.05", 0.0, 0.05),
)


@dataclass
class BandStats:
    band: str
    reference: int = 0  # reference detections in the band
    matched: int = 0
    missing: int = 0  # reference detections with no partner
    extra: int = 0  # other side's detections (in the band by their own score) with no partner
    moved: int = 0  # matched, but IoU below the agreement threshold
    max_box_delta: float = 0.0  # pixels, over matched pairs
    max_score_delta: float = 0.0
    min_iou: float = 1.0


@dataclass
class SideComparison:
    side: str
    bands: list[BandStats]
    images: int

    def band(self, name: str) -> BandStats:
        return next(b for b in self.bands if b.band == name)


def _band_of(score: float) -> int:
    for k, (_, lo, hi) in enumerate(BANDS):
        if lo <= score < hi:
            return k
    return len(BANDS) - 1  # negative scores cannot happen; keep them in the lowest band


def compare_side(side: str, reference: Sequence[Det], other: Sequence[Det], agree_iou: float = 0.9) -> SideComparison:
    """Per-band counts of ``other`` against ``reference``, image by image (lists in the same image order)."""
    if len(reference) != len(other):
        raise ValueError(f"{side}: {len(other)} results for {len(reference)} images")
    bands = [BandStats(name) for name, _, _ in BANDS]
    for ref, got in zip(reference, other, strict=True):
        m = match_detections(ref["boxes"], ref["scores"], ref["labels"], got["boxes"], got["scores"], got["labels"], iou_min=0.5)
        for s in ref["scores"]:
            bands[_band_of(float(s))].reference += 1
        for (i, _j), iou, ds, db in zip(m.pairs, m.ious, m.score_deltas, m.box_deltas, strict=True):
            b = bands[_band_of(float(ref["scores"][i]))]
            b.matched += 1
            b.moved += int(iou < agree_iou)
            b.max_box_delta = max(b.max_box_delta, db)
            b.max_score_delta = max(b.max_score_delta, ds)
            b.min_iou = min(b.min_iou, iou)
        for i in m.unmatched_a:
            bands[_band_of(float(ref["scores"][i]))].missing += 1
        for j in m.unmatched_b:
            bands[_band_of(float(got["scores"][j]))].extra += 1
    return SideComparison(side, bands, len(reference))


def high_score_disagreements(cmp: SideComparison, score_tol: float) -> list[str]:
    """What makes compare fail: a ≥0.5 detection missing, extra, moved, or its score off by more than ``score_tol``."""
    b = cmp.bands[0]
    problems = []
    if b.missing:
        problems.append(f"{cmp.side}: {b.missing} high-score reference detection(s) missing")
    if b.extra:
        problems.append(f"{cmp.side}: {b.extra} extra high-score detection(s)")
    if b.moved:
        problems.append(f"{cmp.side}: {b.moved} high-score detection(s) moved (IoU below the agreement threshold)")
    if b.max_score_delta > score_tol:
        problems.append(f"{cmp.side}: high-score |Δscore| {b.max_score_delta:.2e} > {score_tol:g}")
    return problems


@dataclass
class PositionCheck:
    side: str
    how: str
    images: int
    trials: int  # results compared against the image's own single result
    identical: int
    max_box_delta: float
    max_score_delta: float

    @property
    def ok(self) -> bool:
        return self.identical == self.trials


def _canonical(det: Det) -> Det:
    """Rows sorted by score (descending), then label and box: equal sets compare equal in any order (ties included)."""
    b = det["boxes"]
    order = np.lexsort((b[:, 3], b[:, 2], b[:, 1], b[:, 0], det["labels"], -det["scores"])) if len(b) else np.arange(0)
    return {k: v[order] for k, v in det.items()}


def position_check(side: str, how: str, singles: Sequence[Det], trials: Sequence[tuple[int, Det]]) -> PositionCheck:
    """``trials``: (image index, result when batched differently); each must equal the single result exactly
    (as a set: detections of tied score may come back in another order)."""
    identical, max_box, max_score = 0, 0.0, 0.0
    for idx, got in trials:
        ref, det = _canonical(singles[idx]), _canonical(got)
        if len(det["scores"]) == len(ref["scores"]) and np.array_equal(det["labels"], ref["labels"]):
            max_box = max(max_box, float(np.abs(det["boxes"] - ref["boxes"]).max(initial=0.0)))
            max_score = max(max_score, float(np.abs(det["scores"] - ref["scores"]).max(initial=0.0)))
            identical += int(np.array_equal(det["boxes"], ref["boxes"]) and np.array_equal(det["scores"], ref["scores"]))
        else:
            max_box = math.inf
    return PositionCheck(side, how, len(singles), len(trials), identical, max_box, max_score)


@dataclass
class CompareReport:
    model: str
    version: int
    images: list[str]
    score_threshold: float
    sides: list[SideComparison] = field(default_factory=list)
    raw: list[dict[str, Any]] = field(default_factory=list)  # per backend: per-output max abs / rel (raw_record)
    positions: list[PositionCheck] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # side -> why not compared
    score_tol: float = 1e-3

    @property
    def problems(self) -> list[str]:
        out = [p for s in self.sides for p in high_score_disagreements(s, self.score_tol)]
        out += [p for r in self.raw for p in raw_disagreements(r)]
        out += [
            f"{p.side}: {p.trials - p.identical} of {p.trials} batch-position trials differ ({p.how})"
            for p in self.positions
            if not p.ok
        ]
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "version": self.version,
            "images": self.images,
            "score_threshold": self.score_threshold,
            "bands": [b[0] for b in BANDS],
            "sides": [{"side": s.side, "images": s.images, "bands": [asdict(b) for b in s.bands]} for s in self.sides],
            "raw_tensor_error": self.raw,
            "batch_position": [{**asdict(p), "ok": p.ok} for p in self.positions],
            "skipped": self.skipped,
            "score_tol": self.score_tol,
            "problems": self.problems,
            "ok": not self.problems,
        }

    def tables(self) -> list[tuple[str, list[str], list[list[str]]]]:
        """(title, header, rows) for markdown and HTML alike."""
        out = []
        head = ["side", "band", "reference", "matched", "missing", "extra", "moved", "max box Δ px", "max score Δ", "min IoU"]
        rows = [
            [s.side, b.band, str(b.reference), str(b.matched), str(b.missing), str(b.extra), str(b.moved),
             f"{b.max_box_delta:.2e}", f"{b.max_score_delta:.2e}", f"{b.min_iou:.5f}"]
            for s in self.sides for b in s.bands
        ]  # fmt: skip
        out.append(("Detections against eager PyTorch, per score band (reference's score; extra by their own)", head, rows))
        rows = [
            [r["backend"], o["name"], str(o["shape"]), f"{o['max_abs']:.2e}", f"{o['max_rel']:.2e}", f"{o.get('scale', 1.0):.3g}",
             _raw_verdict(r, o)]
            for r in self.raw for o in r["outputs"]
        ]  # fmt: skip
        head = ["backend", "output", "shape", "max abs", "max rel", "scale", "verdict"]
        out.append(("Core raw-tensor error against its reference", head, rows))
        rows = [
            [
                p.side,
                p.how,
                str(p.trials),
                str(p.identical),
                f"{p.max_box_delta:.2e}",
                f"{p.max_score_delta:.2e}",
                "yes" if p.ok else "NO",
            ]
            for p in self.positions
        ]
        out.append(
            (
                "Batch position (same image, other positions and neighbours)",
                ["side", "how", "trials", "identical", "max box Δ", "max score Δ", "ok"],
                rows,
            )
        )
        return out

    def markdown(self) -> str:
        lines = [
            f"# detserve compare: {self.model} v{self.version}",
            "",
            f"{len(self.images)} images, score threshold {self.score_threshold}; matched by label and IoU ≥ 0.5, greedy by score.",
            "",
        ]
        for title, head, rows in self.tables():
            lines += [f"## {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            lines += ["| " + " | ".join(r) + " |" for r in rows]
            lines.append("")
        for side, why in self.skipped.items():
            lines.append(f"- {side}: not compared ({why})")
        lines.append("")
        lines.append("**Result: " + ("agree** on every high-score detection." if not self.problems else "DISAGREE**:"))
        lines += [f"- {p}" for p in self.problems]
        return "\n".join(lines) + "\n"

    def html(self) -> str:
        e = html.escape
        parts = [
            "<!doctype html><meta charset='utf-8'><title>detserve compare</title>",
            "<style>body{font-family:sans-serif}table{border-collapse:collapse;margin-bottom:1em}"
            "td,th{border:1px solid #bbb;padding:2px 8px;text-align:right}.bad{color:#b00;font-weight:bold}</style>",
            f"<h1>detserve compare: {e(self.model)} v{self.version}</h1>",
            f"<p>{len(self.images)} images, score threshold {self.score_threshold}</p>",
        ]
        for title, head, rows in self.tables():
            parts.append(f"<h2>{e(title)}</h2><table><tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr>")
            parts += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in rows]
            parts.append("</table>")
        parts += [f"<p>{e(side)}: not compared ({e(why)})</p>" for side, why in self.skipped.items()]
        if self.problems:
            parts.append("<p class='bad'>DISAGREE</p><ul>" + "".join(f"<li>{e(p)}</li>" for p in self.problems) + "</ul>")
        else:
            parts.append("<p>Agree on every high-score detection.</p>")
        return "\n".join(parts) + "\n"


def raw_record(result: Any, selects: bool) -> dict[str, Any]:
    """A raw-tensor comparison (``CoreVerification``) for the report, with how it counts: ``judged_by``
    "tensors" (fixed slots: beyond the scaled tolerance is a problem) or "detections" (the core picks its
    slots: the figures are information, the detection sides decide)."""
    return {**result.to_dict(), "judged_by": "detections" if selects else "tensors"}


def raw_disagreements(raw: dict[str, Any]) -> list[str]:
    """What makes compare fail on the raw line: an output of a fixed-slot core beyond its scaled tolerance."""
    if raw.get("judged_by") == "detections" or raw["ok"]:
        return []
    bad = [o for o in raw["outputs"] if o["worst_excess"] > 0]
    return [
        f"{raw['backend']}: raw tensors beyond tolerance: "
        + "; ".join(f"{o['name']} max abs {o['max_abs']:.2e} (scale {o.get('scale', 1.0):.3g})" for o in bad)
    ]


def _raw_verdict(raw: dict[str, Any], out: dict[str, Any]) -> str:
    if raw.get("judged_by") == "detections":
        return "information (slots chosen by top-k: detections decide)"
    return "ok" if out["worst_excess"] <= 0 else "BEYOND tolerance"
