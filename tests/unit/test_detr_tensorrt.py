"""TensorRT verification of DETR-style cores on a CPU: an engine whose GridSample is silently wrong
(NVIDIA/TensorRT #4813) is refused, with a hint naming the option that avoids the op.

The "engine" is a stand-in (tests/fake_tensorrt.py: the same graph with GridSample's sampling
convention flipped) run by ONNX Runtime through the same Polygraphy comparison ``verify_tensorrt``
uses; the real engine runs in scripts/gpu_check.sh on a GPU.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from converters.onnx_export import CoreVerification
from detserve.errors import VerificationError
from detserve.families.base import TensorDecl


class _DeformableToy(torch.nn.Module):
    """A deformable-attention-shaped core: offsets predicted from the image, values sampled with
    grid_sample, pooled to per-query logits and boxes (the outputs a DETR-style core declares)."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.offsets = torch.nn.Conv2d(3, 2, 3, padding=1)
        self.values = torch.nn.Conv2d(3, 8, 1)
        self.head = torch.nn.Linear(8, 6)
        for p in self.parameters():
            p.data.copy_(torch.randn(p.shape, generator=gen) * 0.5)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        grid = torch.tanh(self.offsets(images)).permute(0, 2, 3, 1)  # [N, H, W, 2] in -1..1
        sampled = torch.nn.functional.grid_sample(self.values(images), grid, mode="bilinear", align_corners=False)
        q = torch.nn.functional.adaptive_avg_pool2d(sampled, (4, 4)).flatten(2).transpose(1, 2)  # [N, 16, 8]
        out = self.head(q)
        return out[..., :2], torch.sigmoid(out[..., 2:])


def _export(module: torch.nn.Module, path: Path) -> Path:
    torch.onnx.export(
        module, (torch.rand(1, 3, 16, 16),), str(path), input_names=["images"], output_names=["logits", "pred_boxes"],
        dynamic_axes={"images": {0: "n"}, "logits": {0: "n"}, "pred_boxes": {0: "n"}}, opset_version=17, dynamo=False,
    )  # fmt: skip
    return path


@pytest.fixture(scope="module")
def graphs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    import tests.fake_tensorrt as fake

    d = tmp_path_factory.mktemp("gridsample")
    good = _export(_DeformableToy().eval(), d / "core.onnx")
    return {"good": good, "wrong": fake.miscompiled_grid_sample(good, d / "wrong_engine.onnx")}


def _compare(reference: Path, candidate: Path, precision: str = "fp32") -> CoreVerification:
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx

    from converters.tensorrt_verify import compare_runners, tolerances_for, with_full_batch

    decls = [TensorDecl("logits", (16, 2), atol=1e-3, rtol=1e-3), TensorDecl("pred_boxes", (16, 4))]
    runners = [
        OnnxrtRunner(SessionFromOnnx(str(p), providers=["cpu"]), name=n) for p, n in ((reference, "ort"), (candidate, "engine"))
    ]
    gen = torch.Generator().manual_seed(1)
    batches = with_full_batch([torch.rand((1, 3, 16, 16), generator=gen), torch.rand((2, 3, 16, 16), generator=gen)], 4)
    return compare_runners(
        runners[0], runners[1], batches, ["logits", "pred_boxes"], tolerances_for(precision, decls), "stand-in"
    )


def test_a_silently_wrong_grid_sample_engine_is_refused_with_the_option_that_avoids_it(graphs: dict[str, Path]) -> None:
    from converters.tensorrt_verify import grid_sample_nodes, require_engine_ok

    assert grid_sample_nodes(graphs["good"]) == 1
    result = _compare(graphs["good"], graphs["wrong"])
    assert not result.ok and "polygraphy: FAILED" in result.backend
    assert result.input_shapes == [(1, 3, 16, 16), (2, 3, 16, 16), (4, 3, 16, 16)]
    with pytest.raises(VerificationError) as err:
        require_engine_ok(result, graphs["good"])
    hint = err.value.hint or ""
    assert "#4813" in hint and "decoder_method='discrete'" in hint and "onnxruntime" in hint
    loose = _compare(graphs["good"], graphs["wrong"], "fp16")  # wrong even at fp16's looser tolerance
    assert not loose.ok


def test_a_correct_engine_passes(graphs: dict[str, Path]) -> None:
    from converters.tensorrt_verify import require_engine_ok

    result = _compare(graphs["good"], graphs["good"])
    assert result.ok
    require_engine_ok(result, graphs["good"])


def test_the_check_adds_a_batch_at_the_engines_largest_size() -> None:
    from converters.tensorrt_verify import with_full_batch

    a, b = np.zeros((1, 3, 8, 8), np.float32), np.ones((2, 3, 8, 8), np.float32)
    out = with_full_batch([a, b], 5)
    assert [x.shape[0] for x in out] == [1, 2, 5]
    assert [float(x[0, 0, 0]) for x in out[-1]] == [0.0, 1.0, 1.0, 0.0, 1.0]  # the given images, cycled
    assert len(with_full_batch([a, b], 2)) == 2  # already covered


def test_engine_profiles_cover_what_the_processors_produce() -> None:
    """RT-DETR: one fixed canvas; DETR: any short side down to 1 pixel (no padding) up to longest_edge."""
    from converters.tensorrt_profile import derive_profile
    from detserve.runtime.preprocess import shortest_longest_edge
    from detserve.specs import PreprocessSpec

    fixed = derive_profile(PreprocessSpec(resize_mode="transformers", fixed_size=(640, 640), size_divisible=1), 8)
    assert fixed.min == (1, 3, 640, 640) and fixed.max == (8, 3, 640, 640)
    detr = derive_profile(PreprocessSpec(resize_mode="transformers", min_size=800, max_size=1333, size_divisible=1), 4)
    assert detr.min == (1, 3, 1, 1) and detr.max == (4, 3, 1333, 1333)
    for hw in [(37, 5001), (5001, 37), (480, 640), (1, 1), (2000, 3)]:
        h, w = shortest_longest_edge(hw, 800, 1333)
        assert 1 <= h <= 1333 and 1 <= w <= 1333, hw
