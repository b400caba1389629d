"""Verification by detections for cores that select their output slots (RT-DETR's top-k query selection).

The converted side here is the eager core with its query slots permuted -- what a near-tie at the
top-k cut does in another runtime: every tensor differs by whole values, every detection is the same,
so the build must pass. The same core with moved boxes or changed scores -- a real divergence -- fails.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import numpy as np
import pytest

from converters.onnx_export import compare_outputs
from converters.verify_detections import require_detections_ok, verify_detections
from detserve.errors import VerificationError

pytestmark = pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="the DETR family needs transformers")


def _setup() -> tuple[object, object, object, list[object]]:
    from detserve.families.detr import FAMILY
    from detserve.runtime.preprocess import preprocess

    model = FAMILY.build("rtdetr_tiny", 5, None, {}, seed=0)
    pre = FAMILY.preprocess_spec(model)
    spec = FAMILY.decode_spec(model, pre)
    rng = np.random.default_rng(1)
    items = [preprocess(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), pre) for h, w in ((240, 320), (300, 200))]
    return FAMILY, spec, FAMILY.core(model, spec), items


def _converted(core: object, change: Callable[[dict[str, np.ndarray]], None]) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    import torch

    def run(images: np.ndarray) -> dict[str, np.ndarray]:
        with torch.no_grad():
            logits, boxes = core(torch.from_numpy(images))  # type: ignore[operator]
        out = {"logits": logits.numpy().copy(), "pred_boxes": boxes.numpy().copy()}
        change(out)
        return out

    return run


def _permute(out: dict[str, np.ndarray]) -> None:
    order = np.random.default_rng(0).permutation(out["logits"].shape[1])
    out["logits"], out["pred_boxes"] = out["logits"][:, order], out["pred_boxes"][:, order]


def test_permuted_query_slots_fail_per_tensor_but_pass_by_detections() -> None:
    family, spec, core, items = _setup()
    run = _converted(core, _permute)
    import torch

    with torch.no_grad():
        ref = core(items[0].tensor[None])  # type: ignore[operator]
    assert not compare_outputs("logits", run(items[0].tensor[None].numpy())["logits"], ref[0].numpy(), 1e-4, 1e-4).ok
    result = verify_detections(family, spec, core, run, "permuted", items)
    assert result.ok, result.failures[:3]
    assert result.reference > 20 and result.matched == result.reference and result.max_score_delta < 1e-6
    require_detections_ok(result)


def test_a_real_divergence_still_fails() -> None:
    family, spec, core, items = _setup()

    def shift_boxes(out: dict[str, np.ndarray]) -> None:
        out["pred_boxes"][..., 0] += 0.05  # boxes moved by 5 % of the image: a broken op

    result = verify_detections(family, spec, core, _converted(core, shift_boxes), "shifted", items)
    assert not result.ok and any("IoU" in f or "partner" in f for f in result.failures)
    with pytest.raises(VerificationError, match="detections disagree"):
        require_detections_ok(result)

    def lower_scores(out: dict[str, np.ndarray]) -> None:
        out["logits"] -= 0.1  # every score moves by ~0.02: wrong weights

    assert not verify_detections(family, spec, core, _converted(core, lower_scores), "scores", items).ok
