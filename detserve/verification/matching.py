"""Order-free comparison of two detection sets (NMS order is unstable; boxes are matched by IoU).

Used by the parity tests and reports: every detection above a score floor must find a partner of
the same label on the other side; the box/score deltas of the pairs are reported.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

DEGENERATE_TOL_PX = 0.01


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix of [N, 4] and [M, 4] boxes (x1, y1, x2, y2).

    A box clipped to an image border can have zero width or height, where IoU means nothing
    (0/0, or 0 against a near-identical box): such a pair counts as IoU 1 when all corners agree
    within ``DEGENERATE_TOL_PX`` pixels, else 0.
    """
    a = a.astype(np.float64).reshape(-1, 4)
    b = b.astype(np.float64).reshape(-1, 4)
    area_a = (a[:, 2] - a[:, 0]).clip(0) * (a[:, 3] - a[:, 1]).clip(0)
    area_b = (b[:, 2] - b[:, 0]).clip(0) * (b[:, 3] - b[:, 1]).clip(0)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clip(0).prod(axis=2)
    union = area_a[:, None] + area_b[None, :] - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, inter / union, 0.0)
    degenerate = (area_a[:, None] <= 1e-9) | (area_b[None, :] <= 1e-9)
    close = np.abs(a[:, None, :] - b[None, :, :]).max(axis=2, initial=0.0) <= DEGENERATE_TOL_PX
    return np.where(degenerate, close.astype(np.float64), iou)


@dataclass
class MatchResult:
    pairs: list[tuple[int, int]] = field(default_factory=list)
    ious: list[float] = field(default_factory=list)
    score_deltas: list[float] = field(default_factory=list)
    box_deltas: list[float] = field(default_factory=list)  # max |coordinate difference| in pixels
    unmatched_a: list[int] = field(default_factory=list)
    unmatched_b: list[int] = field(default_factory=list)

    @property
    def max_score_delta(self) -> float:
        return max(self.score_deltas, default=0.0)

    @property
    def max_box_delta(self) -> float:
        return max(self.box_deltas, default=0.0)

    @property
    def min_iou(self) -> float:
        return min(self.ious, default=1.0)


def match_detections(
    boxes_a: np.ndarray,
    scores_a: np.ndarray,
    labels_a: np.ndarray,
    boxes_b: np.ndarray,
    scores_b: np.ndarray,
    labels_b: np.ndarray,
    iou_min: float = 0.5,
) -> MatchResult:
    """Greedy matching, highest score of A first, to the best-IoU unmatched B of the same label."""
    iou = box_iou(boxes_a, boxes_b)
    same = labels_a.reshape(-1, 1) == labels_b.reshape(1, -1)
    iou = np.where(same, iou, -1.0)
    taken = np.zeros(len(scores_b), dtype=bool)
    result = MatchResult()
    for i in np.argsort(-scores_a.astype(np.float64), kind="stable"):
        cand = np.where(taken, -1.0, iou[i]) if len(scores_b) else np.empty(0)
        j = int(np.argmax(cand)) if cand.size else -1
        if j < 0 or cand[j] < iou_min:
            result.unmatched_a.append(int(i))
            continue
        taken[j] = True
        result.pairs.append((int(i), j))
        result.ious.append(float(iou[i, j]))
        result.score_deltas.append(abs(float(scores_a[i]) - float(scores_b[j])))
        result.box_deltas.append(float(np.abs(boxes_a[i].astype(np.float64) - boxes_b[j].astype(np.float64)).max()))
    result.unmatched_b = [int(j) for j in np.where(~taken)[0]]
    return result


@dataclass(frozen=True)
class ParityCheck:
    """Every detection scoring >= ``score_floor`` on either side has a close partner."""

    total: int  # detections above the floor, counted on A's side
    matched: int
    max_score_delta: float
    max_box_delta: float
    min_iou: float
    failures: list[str]

    @property
    def ok(self) -> bool:
        return not self.failures


def check_parity(
    a: tuple[np.ndarray, np.ndarray, np.ndarray],
    b: tuple[np.ndarray, np.ndarray, np.ndarray],
    score_floor: float = 0.05,
    iou_min: float = 0.99,
    score_tol: float = 1e-3,
) -> ParityCheck:
    m = match_detections(*a, *b, iou_min=0.5)
    failures = []
    for side, unmatched, scores in (("A", m.unmatched_a, a[1]), ("B", m.unmatched_b, b[1])):
        for k in unmatched:
            if scores[k] >= score_floor:
                failures.append(f"{side} detection {k} (score {float(scores[k]):.4f}) has no partner")
    above = [p for p, (i, j) in enumerate(m.pairs) if a[1][i] >= score_floor or b[1][j] >= score_floor]
    for p in above:
        i, j = m.pairs[p]
        if m.ious[p] < iou_min or m.score_deltas[p] > score_tol:
            failures.append(f"pair A{i}/B{j}: IoU {m.ious[p]:.4f}, |dscore| {m.score_deltas[p]:.2e}")
    return ParityCheck(
        total=int((a[1] >= score_floor).sum()),
        matched=len(above),
        max_score_delta=max((m.score_deltas[p] for p in above), default=0.0),
        max_box_delta=max((m.box_deltas[p] for p in above), default=0.0),
        min_iou=min((m.ious[p] for p in above), default=1.0),
        failures=failures,
    )
