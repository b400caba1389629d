"""The DETR family (RT-DETR, RT-DETRv2, D-FINE, DETR) against transformers itself.

Preprocessing bit for bit against the image processors, the torch decode against
``post_process_object_detection`` on the same raw tensors, the ONNX core against the eager model,
per-request controls, specs and the build paths. Small configurations of the real architectures
keep this file fast; transformers is the reference only (skipped where the extra is absent).
"""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from detserve.errors import CheckpointError, SpecError
from detserve.families import decode_spec_from_dict, family_for_detector
from detserve.families.detr import FAMILY, DetrDecodeSpec
from detserve.runtime.imaging import decode_image
from detserve.runtime.preprocess import preprocess, shortest_longest_edge
from detserve.specs import RequestControls
from detserve.verification.matching import check_parity

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None, reason="transformers not installed (pip install -e '.[transformers]')"
)
_MODELS: dict[str, Any] = {}


def _model(detector: str) -> Any:
    if detector not in _MODELS:
        _MODELS[detector] = FAMILY.build(detector, 5, None, {}, seed=0)
    return _MODELS[detector]


def _processor(kind: str, size: dict[str, int]) -> Any:
    from detserve.families.detr.models import hf_env

    hf_env()
    import transformers

    return getattr(transformers, kind)(size=size)


@pytest.fixture(scope="module")
def photos(samples: dict[str, bytes]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    odd = {f"{h}x{w}": rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(37, 501), (480, 17), (3, 3), (5, 7)]}
    return {**{n: decode_image(b, 1 << 30) for n, b in samples.items()}, **odd}


@pytest.mark.parametrize(
    ("kind", "size"),
    [
        ("RTDetrImageProcessor", {"height": 320, "width": 320}),
        ("RTDetrImageProcessor", {"height": 256, "width": 416}),
        ("DetrImageProcessor", {"shortest_edge": 256, "longest_edge": 384}),
        ("DetrImageProcessor", {"shortest_edge": 800, "longest_edge": 1333}),
    ],
)
def test_preprocessing_equals_the_image_processor_bit_for_bit(
    kind: str, size: dict[str, int], photos: dict[str, np.ndarray]
) -> None:
    from detserve.families.detr.models import preprocess_spec

    processor = _processor(kind, size)
    holder = type("M", (), {"detserve_processor": processor})()
    spec = preprocess_spec(holder)
    assert spec.resize_mode == "transformers" and spec.size_divisible == 1
    for name, rgb in photos.items():
        theirs = processor(images=rgb, input_data_format="channels_last", return_tensors="pt")["pixel_values"][0].numpy()
        ours = preprocess(rgb, spec).tensor.numpy()
        assert ours.shape == theirs.shape, name
        assert np.array_equal(ours, theirs), f"{name}: max diff {np.abs(ours - theirs).max()}"


def test_shortest_longest_edge_is_transformers_arithmetic() -> None:
    from transformers.image_transforms import get_size_with_aspect_ratio

    rng = np.random.default_rng(1)
    for h, w in rng.integers(1, 3000, (500, 2)).tolist():
        for size, max_size in ((800, 1333), (256, 384), (640, 640)):
            assert shortest_longest_edge((h, w), size, max_size) == get_size_with_aspect_ratio((h, w), size, max_size)


def _spec(activation: str, nc: int = 5, queries: int = 30) -> DetrDecodeSpec:
    model_type = "detr" if activation == "softmax" else "rt_detr"
    names = tuple(str(i) for i in range(nc))
    return DetrDecodeSpec(
        model_type=model_type,  # type: ignore[arg-type]
        activation=activation,  # type: ignore[arg-type]
        num_classes=nc,
        num_queries=queries,
        class_names=names,
        detections_per_img=min(100, queries),
    )


@pytest.mark.parametrize("activation", ["sigmoid", "softmax"])
def test_decode_equals_post_process_object_detection(activation: str) -> None:
    """Random raw tensors for a batch of 3 images of different sizes and thresholds: same detections as the processor."""
    import torch
    from transformers.utils import ModelOutput

    spec = _spec(activation)
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn((3, spec.num_queries, spec.logit_columns), generator=gen) * 3
    boxes = torch.rand((3, spec.num_queries, 4), generator=gen)
    original = torch.tensor([[480, 640], [37, 501], [1000, 700]])
    thresholds = [0.05, 0.3, 0.0]
    processor = _processor(
        "RTDetrImageProcessor" if activation == "sigmoid" else "DetrImageProcessor", {"height": 32, "width": 32}
    )
    out = ModelOutput(logits=logits, pred_boxes=boxes)
    controls = [RequestControls(t, 0.5, spec.num_queries) for t in thresholds]
    ours = FAMILY.decode(
        spec, {"logits": logits, "pred_boxes": boxes}, (320, 320), torch.tensor([[320, 320]] * 3), original, controls
    )
    for i, thresh in enumerate(thresholds):
        sizes = [tuple(o) for o in original.tolist()]
        ref = processor.post_process_object_detection(out, threshold=thresh, target_sizes=sizes)[i]
        order = torch.argsort(ref["scores"], descending=True, stable=True)
        assert torch.equal(ours[i]["scores"], ref["scores"][order])
        assert torch.equal(ours[i]["boxes"], ref["boxes"][order])
        assert torch.equal(ours[i]["labels"], ref["labels"][order].to(torch.int64))
        assert len(ours[i]["scores"]) > 0


@pytest.mark.parametrize("activation", ["sigmoid", "softmax"])
def test_decode_controls_batch_neighbours_and_max_det_bound(activation: str) -> None:
    import torch

    spec = _spec(activation)
    gen = torch.Generator().manual_seed(1)
    raw = {
        "logits": torch.randn((4, spec.num_queries, spec.logit_columns), generator=gen) * 3,
        "pred_boxes": torch.rand((4, spec.num_queries, 4), generator=gen),
    }
    hw = torch.tensor([[320, 320]] * 4)
    orig = torch.tensor([[100, 200], [300, 300], [50, 60], [640, 480]])
    controls = [
        RequestControls(0.0, 1.0, 10_000),
        RequestControls(0.2, 0.01, 3),
        RequestControls(0.9, 0.5, 100),
        RequestControls(0.1, 0.5, 7),
    ]
    batch = FAMILY.decode(spec, raw, (320, 320), hw, orig, controls)
    assert len(batch[0]["scores"]) == spec.num_queries  # max_det beyond the queries: every query, no more
    assert len(batch[1]["scores"]) <= 3 and bool((batch[1]["scores"] > 0.2).all())
    assert bool((batch[2]["scores"] > 0.9).all())
    for i in range(4):
        alone = FAMILY.decode(
            spec, {k: v[i : i + 1] for k, v in raw.items()}, (320, 320), hw[i : i + 1], orig[i : i + 1], [controls[i]]
        )[0]
        for key in ("boxes", "scores", "labels"):
            assert torch.equal(alone[key], batch[i][key]), (i, key)
        assert bool((batch[i]["scores"][:-1] >= batch[i]["scores"][1:]).all())  # by score


def test_decode_of_an_image_padded_to_a_larger_neighbour() -> None:
    """A multi-image DETR request pads to the largest image: boxes relative to the canvas, mapped back through it."""
    import torch

    spec = _spec("softmax", queries=1)
    logits = torch.tensor([[[5.0, 0, 0, 0, 0, 0]]])
    rel = torch.tensor([[[0.25, 0.25, 0.5, 0.5]]])  # x 0..0.5, y 0..0.5 of the canvas
    out = FAMILY.decode(
        spec,
        {"logits": logits, "pred_boxes": rel},
        (400, 600),
        torch.tensor([[200, 300]]),
        torch.tensor([[100, 150]]),
        [RequestControls(0.0, 1.0, 1)],
    )
    assert torch.allclose(out[0]["boxes"], torch.tensor([[0.0, 0.0, 150.0, 100.0]]))


def test_decode_spec_is_validated_and_round_trips() -> None:
    spec = _spec("sigmoid")
    assert decode_spec_from_dict(spec.to_dict()) == spec
    with pytest.raises(SpecError, match="unknown key"):
        DetrDecodeSpec.from_dict({**spec.to_dict(), "nms": 0.5})
    with pytest.raises(SpecError, match="no NMS"):
        DetrDecodeSpec.from_dict({**spec.to_dict(), "nms_thresh": 0.5})
    with pytest.raises(SpecError, match="num_queries"):
        DetrDecodeSpec.from_dict({**spec.to_dict(), "detections_per_img": 31})
    controls = RequestControls.from_parameters({"iou_threshold": 0.2}, spec)  # type: ignore[arg-type]  # any family's spec
    assert controls.max_det == spec.detections_per_img and controls.score_threshold == 0.5


@pytest.mark.slow  # the real server runs the same pipeline in tests/integration/test_parity_detr.py
def test_rtdetr_onnx_core_and_served_pipeline_equal_transformers(photos: dict[str, np.ndarray], tmp_path: Path) -> None:
    """The exported core (opset 17, grid-sample) within its declared tolerance of the eager model, and
    preprocess -> ONNX Runtime -> decode equals the processor + model + post-processing, order-free."""
    import onnx
    import onnxruntime as ort
    import torch

    from converters.onnx_export import export_core, require_ok, verify_onnxruntime

    model = _model("rtdetr_tiny")
    pre = FAMILY.preprocess_spec(model)
    spec = FAMILY.decode_spec(model, pre)
    core, outputs = FAMILY.core(model, spec), FAMILY.outputs(spec)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = export_core(core, outputs, pre, tmp_path / "model.onnx", sample_hw=pre.trace_hw)
    assert "GridSample" in {n.op_type for n in onnx.load(str(path)).graph.node}
    items = {name: preprocess(rgb, pre) for name, rgb in photos.items()}
    batches = [torch.stack([p.tensor for p in list(items.values())[:3]]), next(iter(items.values())).tensor[None]]
    require_ok(verify_onnxruntime(core, outputs, path, batches))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    total = 0
    for name, rgb in photos.items():
        p = items[name]
        raw = dict(zip(["logits", "pred_boxes"], session.run(None, {"images": p.tensor[None].numpy()}), strict=True))
        tensors = {k: torch.from_numpy(v) for k, v in raw.items()}
        dets = FAMILY.decode(
            spec,
            tensors,
            p.padded_hw,
            torch.tensor([p.resized_hw]),
            torch.tensor([p.original_hw]),
            [RequestControls(0.01, 0.5, 30)],
        )[0]
        ref = FAMILY.reference(model, rgb, 0.01, None, 30)
        got = (dets["boxes"].numpy(), dets["scores"].numpy(), dets["labels"].numpy().astype(np.int32))
        result = check_parity(got, (ref["boxes"], ref["scores"], ref["labels"].astype(np.int32)))
        assert result.ok, f"{name}: {result.failures[:5]}"
        total += result.total
    assert total > 50, "the fixture needs a score spread"


def test_family_registry_and_build_refusals(tmp_path: Path) -> None:
    assert family_for_detector("rtdetr_tiny") is FAMILY and family_for_detector("hf") is FAMILY
    with pytest.raises(SpecError, match="takes none"):
        FAMILY.build("rtdetr_tiny", 5, None, {"imgsz": 320}, None)
    with pytest.raises(SpecError, match="unknown DETR-family detector"):
        FAMILY.build("hf", 5, None, {}, None)
    with pytest.raises(CheckpointError, match=r"config\.json"):
        FAMILY.build("hf", 0, tmp_path, {}, None)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"preprocessor_config\.json"):
        FAMILY.build("hf", 0, tmp_path, {}, None)


def test_save_pretrained_folder_serves_the_same_model(tmp_path: Path) -> None:
    """A user's save_pretrained folder (model + image processor) builds the same spec and the same outputs."""
    import torch

    model = _model("detr_tiny")
    model.save_pretrained(tmp_path)
    model.detserve_processor.save_pretrained(tmp_path)
    loaded = FAMILY.build("hf", 0, tmp_path, {}, None)
    with pytest.raises(CheckpointError, match="6 were asked"):
        FAMILY.build("hf", 6, tmp_path, {}, None)
    assert FAMILY.preprocess_spec(loaded) == FAMILY.preprocess_spec(model)
    pre = FAMILY.preprocess_spec(model)
    assert FAMILY.decode_spec(loaded, pre) == FAMILY.decode_spec(model, pre)
    x = torch.rand((1, 3, 256, 320), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = FAMILY.core(model, FAMILY.decode_spec(model, pre))(x), FAMILY.core(loaded, FAMILY.decode_spec(loaded, pre))(x)
    assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))


@pytest.mark.slow
@pytest.mark.parametrize("detector", ["rtdetr_v2_tiny", "dfine_tiny", "detr_tiny"])
def test_other_cores_export_and_match_their_library(detector: str, photos: dict[str, np.ndarray], tmp_path: Path) -> None:
    import onnx
    import torch

    from converters.onnx_export import export_core, require_ok, verify_onnxruntime

    model = _model(detector)
    pre = FAMILY.preprocess_spec(model)
    spec = FAMILY.decode_spec(model, pre)
    core, outputs = FAMILY.core(model, spec), FAMILY.outputs(spec)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = export_core(core, outputs, pre, tmp_path / "model.onnx", sample_hw=pre.trace_hw)
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    if detector == "rtdetr_v2_tiny":
        assert "GridSample" not in ops  # discrete sampling: the TensorRT-safe option
    items = [preprocess(rgb, pre) for rgb in photos.values()]
    require_ok(verify_onnxruntime(core, outputs, path, [p.tensor[None] for p in items[:4]]))
    for rgb, p in zip(photos.values(), items, strict=True):
        with torch.no_grad():
            logits, boxes = core(p.tensor[None])
        dets = FAMILY.decode(
            spec,
            {"logits": logits, "pred_boxes": boxes},
            p.padded_hw,
            torch.tensor([p.resized_hw]),
            torch.tensor([p.original_hw]),
            [RequestControls(0.01, 0.5, 30)],
        )[0]
        ref = FAMILY.reference(model, rgb, 0.01, None, 30)
        assert np.array_equal(dets["scores"].numpy(), ref["scores"]) and np.array_equal(dets["boxes"].numpy(), ref["boxes"])


def test_building_writes_nothing_in_home_and_stays_offline(tmp_path: Path) -> None:
    """transformers imported and a model built in a fresh process: no files under $HOME, the Hub offline."""
    import os
    import subprocess
    import sys

    home = tmp_path / "home"
    home.mkdir()
    code = (
        "from detserve.families.detr import FAMILY\n"
        "m = FAMILY.build('rtdetr_tiny', 5, None, {}, 0)\n"
        "import huggingface_hub.constants as c\n"
        "assert c.HF_HUB_OFFLINE and c.HF_HUB_DISABLE_TELEMETRY\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "XDG_"))} | {"HOME": str(home)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=Path(__file__).resolve().parents[2], timeout=300)
    assert not any(home.rglob("*")), sorted(str(p) for p in home.rglob("*"))


@pytest.mark.slow  # the fast set loads a save_pretrained folder; this is the other checkpoint path
def test_a_weights_file_for_a_named_configuration(tmp_path: Path) -> None:
    """``rtdetr_tiny --checkpoint weights.safetensors`` (or a torch state dict): the same model; a mismatch is refused."""
    import torch
    from safetensors.torch import save_file

    model = _model("rtdetr_tiny")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp_path / "w.safetensors"))
    torch.save({"model": state}, tmp_path / "w.pt")
    assert FAMILY.default_num_classes(tmp_path / "w.pt") == 80 and FAMILY.default_num_classes(tmp_path) == 0
    x = torch.rand((1, 3, 320, 320), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(pixel_values=x).logits
        for file in ("w.safetensors", "w.pt"):
            loaded = FAMILY.build("rtdetr_tiny", 5, tmp_path / file, {}, None)
            assert torch.equal(loaded(pixel_values=x).logits, want), file
    with pytest.raises(CheckpointError, match="same --num-classes"):
        FAMILY.build("rtdetr_tiny", 7, tmp_path / "w.safetensors", {}, None)
