"""The TensorRT check of a core that selects its slots (RT-DETR's query top-k) judges detections, on a CPU.

Only the ENGINE is a test double: a Polygraphy runner that runs the same ONNX in ONNX Runtime and then
does to its outputs what another runtime does -- query slots permuted (near-ties at the top-k cut
ordered the other way), fp16-sized score noise -- or an ONNX whose weights are wrong. The reference
runner, the per-tensor figures, the family's decode and the order-free matching are the real
``converters.tensorrt_verify.verify_engine``. Real engines run in scripts/gpu_check.sh on a GPU.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from converters.tensorrt_env import EngineEnvironment, PlanMetadata, write_plan_metadata
from detserve.errors import VerificationError

pytestmark = pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="the DETR family needs transformers")

ENV = EngineEnvironment("stand-in", "stand-in GPU", "9.0")


@pytest.fixture(scope="module")
def rtdetr(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A seeded tiny RT-DETR, its ONNX, one with wrong weights, and the sample photos preprocessed as served."""
    import onnx
    from onnx import numpy_helper

    from converters.onnx_export import export_core
    from detserve.families.detr import FAMILY
    from detserve.runtime.imaging import decode_image
    from detserve.runtime.preprocess import preprocess
    from detserve.runtime.samples import sample_files

    d = tmp_path_factory.mktemp("rtdetr_trt")
    model = FAMILY.build("rtdetr_tiny", 5, None, {}, seed=0)
    pre = FAMILY.preprocess_spec(model)
    spec = FAMILY.decode_spec(model, pre)
    outputs = list(FAMILY.outputs(spec))
    onnx_path = export_core(FAMILY.core(model, spec), outputs, pre, d / "model.onnx", pre.trace_hw)
    graph = onnx.load(str(onnx_path))
    rng = np.random.default_rng(3)
    for init in graph.graph.initializer:  # every weight 10 % off: what a wrong checkpoint or a broken import gives
        w = numpy_helper.to_array(init)
        if w.dtype == np.float32 and w.size > 16:
            init.CopyFrom(numpy_helper.from_array(w * rng.uniform(0.9, 1.1, w.shape).astype(np.float32), init.name))
    onnx.save(graph, str(d / "wrong.onnx"))
    blobs = list(sample_files().values())[:2]  # two photos keep it cheap; each is also run in batches of 2 and 4
    items = [preprocess(decode_image(blob, 1 << 31), pre) for blob in blobs]  # as the build does
    return SimpleNamespace(family=FAMILY, spec=spec, outputs=outputs, onnx=onnx_path, wrong=d / "wrong.onnx", items=items, dir=d)


@pytest.fixture
def on_stand_in_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    import converters.tensorrt_env as te

    monkeypatch.setattr(te, "current_environment", lambda: ENV)


def _plan(d: Path, precision: str, max_batch_size: int = 4) -> Path:
    plan = d / f"{precision}.plan"
    plan.write_bytes(b"stand-in engine")
    meta = PlanMetadata(ENV.tensorrt_version, ENV.gpu_name, ENV.compute_capability, precision, {}, 0.0, "00" * 32)
    write_plan_metadata(plan, PlanMetadata(**{**meta.to_dict(), "max_batch_size": max_batch_size}))
    return plan


def _engine(onnx_path: Path, change: Callable[[dict[str, np.ndarray]], None] | None = None) -> Any:
    """ONNX Runtime on ``onnx_path`` as the "engine", its outputs passed through ``change``."""
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx

    class Engine(OnnxrtRunner):  # type: ignore[misc]
        def infer_impl(self, feed_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            out = {n: np.array(v) for n, v in super().infer_impl(feed_dict).items()}
            if change is not None:
                change(out)
            return out

    return Engine(SessionFromOnnx(str(onnx_path), providers=["cpu"]), name="engine stand-in")


def _permute(out: dict[str, np.ndarray]) -> None:
    order = np.random.default_rng(0).permutation(out["logits"].shape[1])
    out["logits"], out["pred_boxes"] = out["logits"][:, order], out["pred_boxes"][:, order]


def _verify(rt: SimpleNamespace, engine: Any, precision: str = "fp32", family: Any = None) -> dict[str, Any]:
    from converters.tensorrt_verify import verify_engine

    plan = _plan(rt.dir, precision)
    return verify_engine(family or rt.family, rt.spec, rt.onnx, plan, rt.items, precision, rt.outputs, candidate=engine)


def test_permuted_query_slots_fail_per_tensor_but_the_engine_passes_by_detections(
    rtdetr: SimpleNamespace, on_stand_in_gpu: None
) -> None:
    record = _verify(rtdetr, _engine(rtdetr.onnx, _permute))
    d = record["detections"]
    assert record["judged_by"] == "detections" and record["ok"] and not record["tensors_ok"]
    assert d["against"] == "ONNX Runtime" and d["rule"].startswith("label, IoU >= 0.99, |dscore| <= 0.001")
    # every sample alone, two together, and a batch at the engine's largest size (4): every row decoded
    assert record["input_shapes"][-2:] == [(2, 3, 320, 320), (4, 3, 320, 320)]
    assert d["images"] == len(rtdetr.items) + 2 + 4
    assert d["reference"] > 20 and d["matched"] == d["reference"] and d["max_score_delta"] < 1e-5


def test_fp16_noise_passes_at_fp16_and_is_refused_at_fp32(rtdetr: SimpleNamespace, on_stand_in_gpu: None) -> None:
    def fp16_like(out: dict[str, np.ndarray]) -> None:
        _permute(out)
        noise = np.random.default_rng(1).uniform(-2e-2, 2e-2, out["logits"].shape)  # fp16's declared logit atol
        out["logits"] = (out["logits"] + noise).astype(np.float32)

    record = _verify(rtdetr, _engine(rtdetr.onnx, fp16_like), "fp16")
    d = record["detections"]
    assert record["ok"] and d["matched"] == d["reference"] and 1e-3 < d["max_score_delta"] <= 1e-2
    with pytest.raises(VerificationError, match="detections disagree"):
        _verify(rtdetr, _engine(rtdetr.onnx, fp16_like), "fp32")


def test_an_engine_with_wrong_weights_is_refused(rtdetr: SimpleNamespace, on_stand_in_gpu: None) -> None:
    for precision in ("fp32", "int8"):  # refused even under int8's loosest rule
        with pytest.raises(VerificationError, match="TensorRT engine's detections disagree with ONNX Runtime's") as err:
            _verify(rtdetr, _engine(rtdetr.wrong), precision)
        assert "#4813" in (err.value.hint or "")  # the graph has GridSample: the refusal names the way around it


def test_a_fixed_slot_core_keeps_the_per_tensor_check(rtdetr: SimpleNamespace, on_stand_in_gpu: None) -> None:
    """The same engines judged as a fixed-slot core: identical outputs pass per tensor, permuted slots fail."""
    fixed = SimpleNamespace(core_selects=lambda spec: False)
    record = _verify(rtdetr, _engine(rtdetr.onnx), family=fixed)
    assert record["ok"] and "judged_by" not in record and "polygraphy: passed" in record["backend"]
    with pytest.raises(VerificationError, match="logits max abs"):
        _verify(rtdetr, _engine(rtdetr.onnx, _permute), family=fixed)


def test_the_per_tensor_floor_scales_with_the_output() -> None:
    """An engine's logits of scale 24 off by 1e-3 near 0: float32 noise of a trained-size network (the FCOS case of
    issue 21); the floor is 1e-4 x 24 there. The same error on an output of scale 1 is refused."""
    from converters.tensorrt_verify import tensor_errors

    ref = np.zeros((1, 8, 3), np.float32)
    ref[0, 0, 0] = 24.0
    small = ref / 24
    got, got_small = ref.copy(), small.copy()
    got[0, 1, 1] = got_small[0, 1, 1] = 1e-3
    pairs = [({"a": ref, "b": small}, {"a": got, "b": got_small})]
    feeds = [{"images": np.zeros((1, 3, 4, 4), np.float32)}]
    result = tensor_errors(pairs, feeds, ["a", "b"], {"a": (1e-4, 1e-4), "b": (1e-4, 1e-4)}, "stand-in", True)
    a, b = result.outputs
    assert a.ok and a.scale == 24.0 and a.max_abs == pytest.approx(1e-3)
    assert not b.ok and b.scale == 1.0
