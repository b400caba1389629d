"""Verify a converted core by the detections it gives, where its output slots carry no fixed meaning.

RT-DETR and D-FINE choose their decoder queries by a top-k over encoder scores inside the core. When
two encoder scores nearly tie at the cut, ONNX Runtime's float32 rounding can order them the other
way: the same queries come out in other slots (or one query swaps for its near-twin), so the raw
tensors differ by whole values while the detections a user gets do not (measured: a seeded RT-DETR
with realistic activations, logits "max abs 4.6", served 1328/1328 detections matched). A family
whose core selects like this declares ``core_selects = True``; the build then decodes both sides
with the family's own decode and matches them order-free -- the rule of the parity tests: same
label, IoU >= 0.99, |Δscore| <= 1e-3 for every detection >= 0.05 on either side -- and keeps the
per-tensor figures beside it as information. A genuine divergence (wrong weights, a broken op)
moves boxes and scores and still fails.

The same matching judges a TensorRT engine of such a core against ONNX Runtime (converters/tensorrt_verify.py,
``verify_engine``), with a :class:`DetectionRule` that fits the engine's precision.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from detserve.errors import VerificationError

SCORE_FLOOR = 0.05
IOU_MIN = 0.99
SCORE_TOL = 1e-3

# (images [N, 3, H, W] as numpy) -> outputs by declared name, [N, ...] each
RunCore = Callable[[np.ndarray], dict[str, np.ndarray]]


@dataclass(frozen=True)
class DetectionRule:
    """When two sides' detections agree: every detection scoring >= ``score_floor`` on either side has a
    partner of the same label with IoU >= ``iou_min`` and |Δscore| <= ``score_tol``."""

    score_floor: float = SCORE_FLOOR
    iou_min: float = IOU_MIN
    score_tol: float = SCORE_TOL

    def describe(self) -> str:
        return f"label, IoU >= {self.iou_min}, |dscore| <= {self.score_tol}, score >= {self.score_floor}"


FP32_RULE = DetectionRule()  # ONNX Runtime (and fp32 engines) vs their reference: float32 noise only


@dataclass(frozen=True)
class DetectionVerification:
    """Detections of the converted core against the reference's (PyTorch's, or ONNX Runtime's for an engine)."""

    backend: str
    images: int
    reference: int  # the reference's detections >= the floor, all images
    matched: int
    max_score_delta: float
    max_box_delta: float
    min_iou: float
    failures: list[str] = field(default_factory=list)
    against: str = "PyTorch"
    rule: DetectionRule = FP32_RULE

    @property
    def ok(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok, "rule": self.rule.describe(), "tolerances": asdict(self.rule)}

    def summary(self) -> str:
        verdict = "ok" if self.ok else "FAILED"
        return (
            f"{self.backend} vs {self.against}, detections ({verdict}): {self.matched}/{self.reference} matched on "
            f"{self.images} images, max |Δscore| {self.max_score_delta:.2e}, max box Δ {self.max_box_delta:.2e} px, "
            f"min IoU {self.min_iou:.4f}"
        )


def _decode(family: Any, spec: Any, outputs: dict[str, Any], item: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One image's detections by the family's own decode, with no score threshold and every slot kept."""
    import torch

    from detserve.specs import MAX_DET_LIMIT, RequestControls

    controls = RequestControls.from_parameters({"score_threshold": 0.0, "max_det": MAX_DET_LIMIT}, spec)
    raw = {n: torch.as_tensor(np.asarray(v)) for n, v in outputs.items()}
    hw = torch.tensor([item.resized_hw], dtype=torch.int64), torch.tensor([item.original_hw], dtype=torch.int64)
    det = family.decode(spec, raw, item.padded_hw, hw[0], hw[1], [controls])[0]
    return det["boxes"].numpy(), det["scores"].numpy(), det["labels"].numpy()


def match_outputs(
    family: Any,
    spec: Any,
    cases: Sequence[tuple[Any, dict[str, Any], dict[str, Any]]],
    backend: str,
    rule: DetectionRule = FP32_RULE,
    against: str = "PyTorch",
) -> DetectionVerification:
    """``cases``: (preprocessed image, reference outputs, converted outputs) -- one image's outputs, batch dim 1 --
    each decoded by the family and matched order-free under ``rule``."""
    from detserve.verification.matching import check_parity

    checks, failures = [], []
    for k, (item, ref, got) in enumerate(cases):
        check = check_parity(
            _decode(family, spec, ref, item), _decode(family, spec, got, item), rule.score_floor, rule.iou_min, rule.score_tol
        )
        checks.append(check)
        failures += [f"image {k}: {f}" for f in check.failures]
    return DetectionVerification(
        backend=backend,
        images=len(cases),
        reference=sum(c.total for c in checks),
        matched=sum(c.matched for c in checks),
        max_score_delta=max((c.max_score_delta for c in checks), default=0.0),
        max_box_delta=max((c.max_box_delta for c in checks), default=0.0),
        min_iou=min((c.min_iou for c in checks), default=1.0),
        failures=failures,
        against=against,
        rule=rule,
    )


def torch_runner(family: Any, spec: Any, core: Any) -> RunCore:
    """A ``RunCore`` over the eager core (the reference of the ONNX Runtime check)."""
    import torch

    names = [o.name for o in family.outputs(spec)]

    def run(images: np.ndarray) -> dict[str, np.ndarray]:
        with torch.no_grad():
            out = core(torch.from_numpy(images))
        return {n: t.numpy() for n, t in zip(names, (out,) if isinstance(out, torch.Tensor) else out, strict=True)}

    return run


def verify_detections(
    family: Any, spec: Any, core: Any, run_converted: RunCore, backend: str, items: Sequence[Any]
) -> DetectionVerification:
    """Each preprocessed sample (``runtime.preprocess.Preprocessed``) through PyTorch and the converted core, decoded, matched."""
    reference = torch_runner(family, spec, core)
    cases = []
    for item in items:
        batch = item.tensor[None].numpy()
        cases.append((item, reference(batch), run_converted(batch)))
    return match_outputs(family, spec, cases, backend)


def onnxruntime_runner(onnx_path: Any, names: Sequence[str]) -> tuple[RunCore, str]:
    """A ``RunCore`` over an ONNX Runtime CPU session, and its backend label."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    return (lambda images: dict(zip(names, session.run(list(names), {"images": images}), strict=True))), (
        f"onnxruntime {ort.__version__}"
    )


def require_detections_ok(result: DetectionVerification, what: str = "converted core", hint: str = "") -> None:
    if not result.ok:
        shown = "; ".join(result.failures[:5]) + (f"; ... {len(result.failures) - 5} more" if len(result.failures) > 5 else "")
        rule = result.rule
        raise VerificationError(
            f"{what}'s detections disagree with {result.against}'s: {shown}",
            hint=hint
            or f"rule: every detection >= {rule.score_floor} on either side has a partner with the same label, "
            f"IoU >= {rule.iou_min}, |dscore| <= {rule.score_tol}; --no-verify skips the check (not advised)",
        )
