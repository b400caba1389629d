"""Detector building, checkpoint errors, ONNX export and its verification."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from converters.onnx_export import compare_outputs, export_core, require_ok, verify_onnxruntime
from detserve.errors import CheckpointError, SpecError, VerificationError
from detserve.families.torchvision.models import build_detector, load_checkpoint


def test_unknown_detector_lists_the_known_ones() -> None:
    with pytest.raises(SpecError) as e:
        build_detector("yolov8n")
    assert e.value.hint and "ssdlite320_mobilenet_v3_large" in e.value.hint


def test_bad_model_keyword() -> None:
    with pytest.raises(SpecError, match="bad keyword"):
        build_detector("ssdlite320_mobilenet_v3_large", 3, min_sise=3)
    with pytest.raises(SpecError, match="set by detserve"):
        build_detector("ssdlite320_mobilenet_v3_large", 3, weights="DEFAULT")


def test_checkpoint_round_trip_and_errors(tmp_path: Path) -> None:
    model = build_detector("ssdlite320_mobilenet_v3_large", 3)
    good = tmp_path / "good.pt"
    torch.save(model.state_dict(), good)
    again = build_detector("ssdlite320_mobilenet_v3_large", 3, good)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values(), strict=True))
    wrapped = tmp_path / "wrapped.pt"
    torch.save({"model": model.state_dict()}, wrapped)
    load_checkpoint(again, wrapped)

    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(model, tmp_path / "missing.pt")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(model, corrupt)
    with pytest.raises(CheckpointError, match="of another shape"):
        build_detector("ssdlite320_mobilenet_v3_large", 5, good)
    partial = tmp_path / "partial.pt"
    torch.save({k: v for i, (k, v) in enumerate(model.state_dict().items()) if i % 2}, partial)
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(model, partial)


def test_checkpoint_with_code_is_refused(tmp_path: Path) -> None:
    """weights_only=True: a pickle that would run code does not load."""
    evil = tmp_path / "evil.pt"
    torch.save({"model": build_detector("ssdlite320_mobilenet_v3_large", 3).state_dict(), "hook": print}, evil)
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(build_detector("ssdlite320_mobilenet_v3_large", 3), evil)


def test_export_and_verify_ssdlite(tmp_path: Path) -> None:
    import onnx

    from detserve.families import family
    from detserve.families.torchvision.from_model import postprocess_spec_from_model, preprocess_spec_from_model
    from detserve.families.torchvision.models import spread_head_init

    model = spread_head_init(build_detector("ssdlite320_mobilenet_v3_large", 3), seed=0)
    pre, post = preprocess_spec_from_model(model), postprocess_spec_from_model(model, "ssd")
    fam = family("ssd")
    core, outputs = fam.core(model, post), fam.outputs(post)
    path = export_core(core, outputs, pre, tmp_path / "m.onnx", sample_hw=(320, 320))
    graph = onnx.load(str(path))
    assert [i.name for i in graph.graph.input] == ["images"]
    assert graph.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert [o.name for o in graph.graph.output] == ["cls_logits", "bbox_regression"]
    result = verify_onnxruntime(core, outputs, path, [torch.rand(1, 3, 320, 320), torch.rand(3, 3, 320, 320)])
    assert result.ok, result.summary()
    assert all(o.max_abs < 1e-3 for o in result.outputs)
    require_ok(result)


def test_compare_outputs_flags_a_planted_error() -> None:
    ref = np.ones((2, 3), np.float32)
    got = ref.copy()
    got[1, 2] += 1e-2
    err = compare_outputs("x", got, ref, atol=1e-4, rtol=1e-4)
    assert not err.ok and abs(err.max_abs - 1e-2) < 1e-6
    with pytest.raises(VerificationError, match="shape"):
        compare_outputs("x", got[:1], ref, 1e-4, 1e-4)


def test_the_tolerance_floor_scales_with_the_outputs_magnitude() -> None:
    """float32 noise on values near 0 of a large-valued output passes; the same error on a unit-scale output fails."""
    ref = np.array([[12.0, -3.0, 1e-3, 0.0]], np.float32)  # logits of a network with realistic activations
    noisy = ref + np.array([[4e-4, -3e-4, 4e-4, -4e-4]], np.float32)  # measured class of error (FCOS, issue 21)
    err = compare_outputs("cls_logits", noisy, ref, atol=1e-4, rtol=1e-4)
    assert err.ok and err.scale == 12.0
    small = ref / 12.0  # the same absolute error where the output's scale is 1
    assert not compare_outputs("probs", small + (noisy - ref), small, atol=1e-4, rtol=1e-4).ok
    # a real divergence -- a share of the scale itself -- still fails
    broken = ref.copy()
    broken[0, 2] += 0.05
    assert not compare_outputs("cls_logits", broken, ref, atol=1e-4, rtol=1e-4).ok
