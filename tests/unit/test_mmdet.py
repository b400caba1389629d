"""The mmdet family (CenterNet, CornerNet) against mmdet/mmcv themselves.

Fast: the corner-pool rewrite vs ``torch.cummax`` on many sizes, the float32 ``expf`` vs glibc's,
the torch soft-NMS vs mmcv's compiled one, the decode vs the heads' own ``predict_by_feat`` on the
same raw tensors (bit for bit), and the preprocessing vs mmdet's test pipeline + data preprocessor
(difference 0). mmdet heads and pipelines are built from the configs alone (no backbone), which
keeps this file cheap. The served parity is in tests/integration/test_parity.py (rows cn18, cntiny).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib
import importlib.util
from typing import Any

import numpy as np
import pytest
import torch

from detserve.errors import SpecError
from detserve.families.mmdet.pool import MODES, ExportableCornerPool, running_max, steps_for
from detserve.families.mmdet.spec import MmdetDecodeSpec
from detserve.specs import PreprocessSpec, RequestControls

D = importlib.import_module("detserve.families.mmdet.decode")  # the package's ``decode`` is the function
HAS_MMDET = importlib.util.find_spec("mmdet") is not None
needs_mmdet = pytest.mark.skipif(not HAS_MMDET, reason="mmdet not installed (scripts/setup.sh installs the extra)")


@pytest.mark.parametrize("length", [1, 2, 3, 5, 8, 17, 64, 127, 128, 129, 300])
def test_running_max_is_cummax_exactly(length: int) -> None:
    gen = torch.Generator().manual_seed(length)
    x = torch.randn((2, 3, length, 7), generator=gen)
    x[:, :, ::3] = x[:, :, :1].clone()  # ties
    for dim in (2, 3):
        want = torch.cummax(x, dim).values
        assert torch.equal(running_max(x, dim, steps_for(max(x.shape[dim], 2))), want)
        assert torch.equal(running_max(x, dim, steps_for(512)), want)  # more steps than needed: the same


def test_corner_pools_equal_mmcv_modes_and_export() -> None:
    import onnxruntime as ort

    x = torch.randn((1, 4, 23, 31), generator=torch.Generator().manual_seed(1))
    for mode, (dim, flip) in MODES.items():
        pool = ExportableCornerPool(mode, steps_for(64))
        ref = torch.cummax(x.flip(dim) if flip else x, dim).values
        assert torch.equal(pool(x), ref.flip(dim) if flip else ref), mode
    import io

    buf = io.BytesIO()
    pool = ExportableCornerPool("top", steps_for(64))
    torch.onnx.export(pool, (x,), buf, input_names=["x"], output_names=["y"], opset_version=17, dynamo=False,
                      dynamic_axes={"x": {2: "h", 3: "w"}})  # fmt: skip
    sess = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    for hw in ((23, 31), (5, 60), (64, 3)):
        y = torch.randn((1, 4, *hw), generator=torch.Generator().manual_seed(hw[0]))
        got = sess.run(None, {"x": y.numpy()})[0]
        assert np.array_equal(got, pool(y).numpy()), hw  # exact in ONNX Runtime too


def test_expf_equals_glibc() -> None:
    libm = ctypes.CDLL(ctypes.util.find_library("m"))
    libm.expf.restype, libm.expf.argtypes = ctypes.c_float, [ctypes.c_float]
    gen = torch.Generator().manual_seed(0)
    x = torch.cat([-2 * torch.rand(60_000, generator=gen), -(torch.rand(20_000, generator=gen) ** 2) / 0.5])
    x = torch.cat([x, torch.tensor([0.0, -0.0, -2.0, -1e-30])])
    want = torch.tensor([libm.expf(v) for v in x.tolist()], dtype=torch.float32)
    assert torch.equal(D.expf(x), want)
    assert not torch.equal(torch.exp(x), want)  # why expf exists: SLEEF's exp differs in the last bit


def _compiled_softnms() -> Any:
    from detserve.families.mmdet import zoo

    ext = zoo._load_softnms()
    if ext is None:
        pytest.skip("mmcv's soft-NMS extension is not built (scripts/setup.sh)")
    return ext


@pytest.mark.parametrize("method", ["gaussian", "linear", "naive"])
def test_soft_nms_equals_mmcv_compiled(method: str) -> None:
    ext = _compiled_softnms()
    gen = torch.Generator().manual_seed(7)
    for n in (0, 1, 7, 300, 1000):
        xy = torch.rand((n, 2), generator=gen) * 60
        boxes = torch.cat([xy, xy + 2 + torch.rand((n, 2), generator=gen) * 30], 1)
        if n >= 20:
            boxes[n // 2 : n // 2 + 5] = boxes[:5]  # duplicates
        scores = torch.rand(n, generator=gen)
        scores[::11] = 0.5  # ties
        scores[::13] = 5e-4  # under min_score from the start
        dets = boxes.new_empty((n, 5))
        inds = ext.softnms(boxes, scores, dets, iou_threshold=0.3, sigma=0.5, min_score=1e-3,
                           method=["naive", "linear", "gaussian"].index(method), offset=0)  # fmt: skip
        got_scores, got_inds = D.soft_nms(boxes, scores, 0.3, 0.5, 1e-3, method)
        assert torch.equal(got_inds, inds), (method, n)
        assert torch.equal(got_scores, dets[: inds.numel(), 4]), (method, n)


def _heads() -> dict[str, Any]:
    from detserve.families.mmdet.models import DETECTORS, _config, _mmdet

    _mmdet()
    from mmdet.registry import MODELS

    out = {}
    for name in ("centernet_r18", "cornernet_tiny"):
        cfg = _config(name, {})
        head_cfg = cfg.model.bbox_head.copy()
        head_cfg.update(num_classes=3, test_cfg=cfg.model.test_cfg)
        out[name] = (cfg, MODELS.build(head_cfg).eval())
    assert set(out) <= set(DETECTORS)
    return out


@pytest.fixture(scope="module")
def heads() -> dict[str, Any]:
    if not HAS_MMDET:
        pytest.skip("mmdet not installed")
    return _heads()


def _raw(head: str, hw: tuple[int, int], seed: int) -> dict[str, torch.Tensor]:
    """Well-spread raw maps (3 classes: many same-class corner pairs; embeddings around the threshold)."""
    gen = torch.Generator().manual_seed(seed)

    def r(c: int, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
        return torch.randn((1, c, *hw), generator=gen) * scale + shift

    if head == "centernet":
        return {"center_heatmap": torch.rand((1, 3, *hw), generator=gen), "wh": r(2, 3.0, 6.0), "offset": r(2, 0.3)}
    return {
        "tl_heat": r(3, 2.0, -2.0), "br_heat": r(3, 2.0, -2.0), "tl_emb": r(1, 0.4), "br_emb": r(1, 0.4),
        "tl_off": r(2, 0.3), "br_off": r(2, 0.3),
    }  # fmt: skip


def _spec(name: str, head: Any) -> MmdetDecodeSpec:
    cfg = head.test_cfg
    if name.startswith("centernet"):
        return MmdetDecodeSpec(head="centernet", num_classes=3, class_names=("a", "b", "c"), topk=cfg.topk)
    return MmdetDecodeSpec(head="cornernet", num_classes=3, class_names=("a", "b", "c"), topk=cfg.corner_topk,
                           distance_threshold=cfg.distance_threshold, max_per_img=cfg.max_per_img, nms_thresh=0.5)  # fmt: skip


@needs_mmdet
@pytest.mark.parametrize("name", ["centernet_r18", "cornernet_tiny"])
def test_decode_is_bit_equal_to_the_heads_predict(heads: dict[str, Any], name: str) -> None:
    """Same raw tensors: mmdet's ``predict_by_feat`` (CornerNet: with mmcv's compiled soft-NMS) vs ours."""
    if name.startswith("cornernet"):
        _compiled_softnms()
    _, head = heads[name]
    spec = _spec(name, head)
    canvas, original = (96, 128), (86, 117)  # border: top 48 - 43 = 5, left 64 - 58 = 6
    top, left = D.border(canvas, original)
    meta = {"batch_input_shape": canvas, "border": np.array([top, top + 86, left, left + 117], dtype=np.float32)}
    total = 0
    for seed in range(3):
        raw = _raw(spec.head, (24, 32), seed)
        if spec.head == "centernet":
            ref = head.predict_by_feat([raw["center_heatmap"]], [raw["wh"]], [raw["offset"]], [meta], rescale=True)[0]
        else:
            lists = [[raw[k]] for k in ("tl_heat", "br_heat", "tl_emb", "br_emb", "tl_off", "br_off")]
            ref = head.predict_by_feat(*lists, batch_img_metas=[meta], rescale=False)[0]
        keep = ref.scores > 0.0
        got = D.decode(spec, raw, canvas, torch.tensor([original]), torch.tensor([original]), [RequestControls(0.0, 0.5, 1000)])[
            0
        ]
        assert torch.equal(got["boxes"], ref.bboxes[keep]), seed
        assert torch.equal(got["scores"], ref.scores[keep]), seed
        assert torch.equal(got["labels"], ref.labels[keep]), seed
        total += int(keep.sum())
    assert total > 100  # the maps gave real work (many pairs through soft-NMS)


@needs_mmdet
@pytest.mark.parametrize("name", ["centernet_r18", "cornernet_tiny"])
def test_preprocessing_is_mmdets_to_the_bit(heads: dict[str, Any], name: str) -> None:
    from mmdet.apis.inference import get_test_pipeline_cfg
    from mmdet.registry import MODELS
    from mmengine.dataset import Compose

    from detserve.families.mmdet.models import preprocess_spec
    from detserve.runtime.preprocess import preprocess

    cfg, _ = heads[name]
    data_preprocessor = MODELS.build(cfg.model.data_preprocessor)

    class Model:  # what preprocess_spec reads
        detserve_max_side = 2048

    model = Model()
    model.cfg, model.data_preprocessor = cfg, data_preprocessor  # type: ignore[attr-defined]
    spec = preprocess_spec(model)
    steps = get_test_pipeline_cfg(cfg.copy())
    steps[0].type = "mmdet.LoadImageFromNDArray"
    pipeline = Compose(steps)
    rng = np.random.default_rng(0)
    for h, w in ((3, 3), (31, 32), (127, 128), (128, 255), (181, 243), (300, 451)):  # 127: cropped by a row
        rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        data = pipeline({"img": np.ascontiguousarray(rgb[..., ::-1]), "img_id": 0})
        theirs = data_preprocessor({"inputs": [data["inputs"]], "data_samples": [data["data_samples"]]}, False)
        ours = preprocess(rgb, spec)
        assert ours.tensor.shape == theirs["inputs"][0].shape, (h, w)
        assert torch.equal(ours.tensor, theirs["inputs"][0]), (h, w)
        border = theirs["data_samples"][0].border
        assert D.border(ours.padded_hw, ours.original_hw) == (int(border[0]), int(border[2])), (h, w)


def test_spec_refuses_bad_values() -> None:
    with pytest.raises(SpecError, match="topk must be >= 32"):
        MmdetDecodeSpec(head="cornernet", num_classes=1, class_names=("a",), topk=20)
    with pytest.raises(SpecError, match="unknown key"):
        MmdetDecodeSpec.from_dict({"head": "centernet", "num_classes": 1, "class_names": ["a"], "nms": 1})
    with pytest.raises(SpecError, match="power of two"):
        PreprocessSpec(resize_mode="mmdet_center", size_divisible=100)
    spec = PreprocessSpec(resize_mode="mmdet_center", size_divisible=128, min_size=256, max_size=256, pixel_max=1.0)
    assert spec.padded_hw((300, 128)) == (383, 255)
    from detserve.errors import ImageError
    from detserve.runtime.preprocess import preprocess

    with pytest.raises(ImageError, match="largest side 256"):
        preprocess(np.zeros((300, 10, 3), np.uint8), spec)
