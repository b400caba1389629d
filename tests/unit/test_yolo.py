"""The YOLO family against ultralytics itself: preprocessing bit for bit, detections order-free.

Seeded models with a score spread (``spread_head_init``) at imgsz 320 keep this file fast; one case
runs the default 640. ultralytics is the reference only: skipped where the ``yolo`` extra is absent.
"""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from detserve.errors import SpecError
from detserve.families import yolo
from detserve.families.yolo.models import ultralytics_env
from detserve.families.yolo.spec import num_anchors
from detserve.runtime.imaging import decode_image
from detserve.runtime.preprocess import preprocess
from detserve.specs import PreprocessSpec, RequestControls
from detserve.verification.matching import check_parity

needs_ultralytics = pytest.mark.skipif(
    importlib.util.find_spec("ultralytics") is None, reason="ultralytics not installed (pip install -e '.[yolo]')"
)
needs_cv2 = pytest.mark.skipif(importlib.util.find_spec("cv2") is None, reason="opencv not installed (the server extra)")

# parity runs below the 0.05 floor and with room above max_det, so no detection >= 0.05 sits at a cut
CONF, IOU, MAX_DET = 0.01, 0.7, 1000
_MODELS: dict[tuple[str, int, bool], Any] = {}
_REFS: dict[tuple[str, int, bool, str], dict[str, np.ndarray]] = {}


def _model(detector: str, imgsz: int = 320, end2end: bool = False) -> Any:
    key = (detector, imgsz, end2end)
    if key not in _MODELS:
        kwargs: dict[str, Any] = {"imgsz": imgsz, **({"end2end": True} if end2end else {})}
        _MODELS[key] = yolo.FAMILY.build(detector, 80, None, kwargs, seed=0)
    return _MODELS[key]


def _reference(key: tuple[str, int, bool], name: str, rgb: np.ndarray) -> dict[str, np.ndarray]:
    if (*key, name) not in _REFS:
        _REFS[(*key, name)] = yolo.FAMILY.reference(_model(*key), rgb, CONF, IOU, MAX_DET)
    return _REFS[(*key, name)]


@pytest.fixture(scope="module")
def photos(samples: dict[str, bytes]) -> dict[str, np.ndarray]:
    return {name: decode_image(blob, 1 << 30) for name, blob in samples.items()}


def _run(model: Any, batch: list[np.ndarray], controls: list[RequestControls], core: Any = None) -> list[dict[str, np.ndarray]]:
    """preprocess -> core (torch, or a callable on numpy) -> decode, as the served pipeline does."""
    import torch

    pre = yolo.FAMILY.preprocess_spec(model)
    spec = yolo.FAMILY.decode_spec(model, pre)
    items = [preprocess(rgb, pre) for rgb in batch]
    images = torch.stack([p.tensor for p in items])
    if core is None:
        with torch.no_grad():
            raw = yolo.FAMILY.core(model, spec)(images)
    else:
        raw = torch.from_numpy(core(images.numpy()))
    dets = yolo.FAMILY.decode(
        spec,
        {yolo.FAMILY.outputs(spec)[0].name: raw},
        items[0].padded_hw,
        torch.tensor([p.resized_hw for p in items]),
        torch.tensor([p.original_hw for p in items]),
        controls,
    )
    return [{k: v.numpy() for k, v in d.items()} for d in dets]


def _triple(d: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return d["boxes"], d["scores"], d["labels"]


def _assert_parity(ours: dict[str, np.ndarray], ref: dict[str, np.ndarray], label: str) -> None:
    check = check_parity(_triple(ours), _triple(ref), score_floor=0.05, iou_min=0.99, score_tol=1e-3)
    assert check.ok, f"{label}: {check.matched}/{check.total} matched; {check.failures[:5]}"
    assert check.total > 0, f"{label}: no detection above 0.05 -- the score spread did not work"


# --------------------------------------------------------------------------- preprocessing


@needs_ultralytics
@pytest.mark.parametrize("imgsz", [320, 640])
def test_preprocessing_equals_ultralytics_predictor(samples: dict[str, bytes], tmp_path: Path, imgsz: int) -> None:
    """Same file -> detserve's tensor == the tensor ultralytics' predictor feeds the model (difference 0)."""
    import torch

    model = _model("yolov8n", 320)
    ultralytics_env()
    from ultralytics.models.yolo.detect import DetectionPredictor
    from ultralytics.utils.patches import imread

    predictor = DetectionPredictor(overrides={"imgsz": imgsz, "rect": False, "device": "cpu", "verbose": False})
    predictor.setup_model(model, verbose=False)
    predictor.imgsz = (imgsz, imgsz)
    pre = PreprocessSpec.from_dict({**yolo.FAMILY.preprocess_spec(model).to_dict(), "fixed_size": (imgsz, imgsz)})
    rng = np.random.default_rng(0)
    files = dict(samples)  # grey PNG (camera), PNG, JPEG, non-square
    for h, w in [(1, 1), (1, 997), (997, 1), (3, 5), (333, 517), (imgsz + 1, imgsz - 1)]:  # odd and tiny sizes
        import cv2

        ok, png = cv2.imencode(".png", rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        assert ok
        files[f"noise_{h}x{w}.png"] = png.tobytes()
    for name, blob in files.items():
        path = tmp_path / name
        path.write_bytes(blob)
        theirs = predictor.preprocess([imread(str(path))])[0]  # ultralytics reads files with cv2 (BGR)
        ours = preprocess(decode_image(blob, 1 << 30), pre)
        assert ours.tensor.shape == theirs.shape, name
        assert torch.equal(ours.tensor, theirs), f"{name}: max diff {(ours.tensor - theirs).abs().max().item()}"
        # post-processing undoes the centred padding from (resized_hw, padded_hw) alone
        rh, rw = ours.resized_hw
        top, left = round((imgsz - rh) / 2 - 0.1), round((imgsz - rw) / 2 - 0.1)
        pad = float(np.float32(114) / np.float32(255))
        assert (theirs[:, :top] == pad).all() and (theirs[:, :, :left] == pad).all(), name
        assert ours.padded_hw == (imgsz, imgsz)


@needs_cv2
def test_ultralytics_spec_validation() -> None:
    good = dict(resize_mode="ultralytics", fixed_size=(320, 320), size_divisible=32, pad_value=114 / 255)
    PreprocessSpec(**good)  # type: ignore[arg-type]
    with pytest.raises(SpecError, match="multiple of size_divisible"):
        PreprocessSpec(**{**good, "fixed_size": (330, 330)})  # type: ignore[arg-type]
    with pytest.raises(SpecError, match=r"integer in 0\.\.255"):
        PreprocessSpec(**{**good, "pad_value": 0.3})  # type: ignore[arg-type]


# --------------------------------------------------------------------------- detections


@needs_ultralytics
@pytest.mark.parametrize("detector", ["yolov8n", "yolo11n"])
def test_torch_core_and_decode_match_ultralytics_predict(detector: str, photos: dict[str, np.ndarray]) -> None:
    model = _model(detector)
    names = list(photos)
    ours = _run(model, [photos[n] for n in names], [RequestControls(CONF, IOU, MAX_DET)] * len(names))
    for name, dets in zip(names, ours, strict=True):
        _assert_parity(dets, _reference((detector, 320, False), name, photos[name]), f"{detector} {name}")


def _onnx_session(model: Any, path: Path) -> Any:
    """The core through torch.onnx.export (dynamic batch, opset 17) -> an ONNX Runtime callable."""
    import onnxruntime as ort
    import torch

    pre = yolo.FAMILY.preprocess_spec(model)
    spec = yolo.FAMILY.decode_spec(model, pre)
    core = yolo.FAMILY.core(model, spec)
    size = pre.fixed_size
    assert size is not None
    name = yolo.FAMILY.outputs(spec)[0].name
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notices
        torch.onnx.export(
            core,
            (torch.zeros((2, 3, *size)),),
            str(path),
            input_names=["images"],
            output_names=[name],
            dynamic_axes={"images": {0: "batch"}, name: {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda images: session.run([name], {"images": images})[0]


@needs_ultralytics
@pytest.mark.parametrize(("detector", "imgsz"), [("yolov8n", 320), ("yolo11n", 320), ("yolov8n", 640)])
def test_onnxruntime_core_matches_torch_and_ultralytics(
    detector: str, imgsz: int, photos: dict[str, np.ndarray], tmp_path: Path
) -> None:
    """ORT within the declared tolerance of torch; decoded ORT output vs ultralytics' predict; batch invariance."""
    import torch

    model = _model(detector, imgsz)
    run_ort = _onnx_session(model, tmp_path / "core.onnx")
    pre = yolo.FAMILY.preprocess_spec(model)
    spec = yolo.FAMILY.decode_spec(model, pre)
    (decl,) = yolo.FAMILY.outputs(spec)
    names = list(photos)
    images = torch.stack([preprocess(photos[n], pre).tensor for n in names])
    with torch.no_grad():
        want = yolo.FAMILY.core(model, spec)(images).numpy()
    got = run_ort(images.numpy())
    assert tuple(got.shape[1:]) == decl.dims
    assert np.allclose(got, want, atol=decl.atol, rtol=decl.rtol), f"max abs err {np.abs(got - want).max()}"

    controls = [RequestControls(CONF, IOU, MAX_DET)] * len(names)
    batched = _run(model, [photos[n] for n in names], controls, core=run_ort)
    for name, dets in zip(names, batched, strict=True):
        _assert_parity(dets, _reference((detector, imgsz, False), name, photos[name]), f"{detector}@{imgsz} ORT {name}")
    # batch invariance: each image alone gives its detections in the batch (ORT may differ in the last bits)
    for name, dets in zip(names[:2], batched[:2], strict=True):
        alone = _run(model, [photos[name]], controls[:1], core=run_ort)[0]
        check = check_parity(_triple(alone), _triple(dets), score_floor=0.05, iou_min=0.999, score_tol=1e-5)
        assert check.ok and len(alone["scores"]) == len(dets["scores"]), f"{name}: {check.failures[:5]}"


@needs_ultralytics
def test_end2end_head_matches_ultralytics(photos: dict[str, np.ndarray]) -> None:
    """YOLO26's one-to-one head (top-k in the graph, no NMS) decoded as ultralytics' predict(nms=False)."""
    model = _model("yolo26n", 320, end2end=True)
    spec = yolo.FAMILY.decode_spec(model, yolo.FAMILY.preprocess_spec(model))
    assert spec.end2end and [o.name for o in yolo.FAMILY.outputs(spec)] == ["detections"]
    names = list(photos)[:3]
    ours = _run(model, [photos[n] for n in names], [RequestControls(CONF, IOU, 100)] * len(names))
    for name, dets in zip(names, ours, strict=True):
        ref = yolo.FAMILY.reference(model, photos[name], CONF, IOU, 100)
        _assert_parity(dets, ref, f"yolo26n end2end {name}")


# --------------------------------------------------------------------------- decode semantics (no ultralytics needed)


def _decode_spec(nc: int = 3, imgsz: int = 64) -> yolo.YoloDecodeSpec:
    return yolo.YoloDecodeSpec(
        num_classes=nc,
        class_names=tuple(str(i) for i in range(nc)),
        imgsz=imgsz,
        strides=(8, 16, 32),
        num_predictions=num_anchors(imgsz, (8, 16, 32)),
    )


def _random_predictions(spec: yolo.YoloDecodeSpec, n: int, seed: int) -> Any:
    import torch

    gen = torch.Generator().manual_seed(seed)
    a = spec.num_predictions
    xy = torch.rand((n, 2, a), generator=gen) * spec.imgsz
    wh = torch.rand((n, 2, a), generator=gen) * spec.imgsz / 3
    cls = torch.rand((n, spec.num_classes, a), generator=gen) ** 3
    return torch.cat((xy, wh, cls), 1)


def test_decode_is_batch_invariant_and_takes_per_request_controls() -> None:
    import torch

    spec = _decode_spec()
    pred = _random_predictions(spec, 3, seed=1)
    resized, original = torch.tensor([[64, 48], [32, 64], [64, 64]]), torch.tensor([[640, 480], [100, 200], [64, 64]])
    controls = [RequestControls(0.2, 0.5, 7), RequestControls(0.6, 0.3, 100), RequestControls(0.0, 1.0, 300)]
    together = yolo.decode(spec, {"predictions": pred}, (64, 64), resized, original, controls)
    for i in range(3):
        alone = yolo.decode(
            spec, {"predictions": pred[i : i + 1]}, (64, 64), resized[i : i + 1], original[i : i + 1], controls[i : i + 1]
        )[0]
        for key in ("boxes", "scores", "labels"):
            assert torch.equal(alone[key], together[i][key]), (i, key)
    assert len(together[0]["scores"]) == 7  # max_det
    assert (together[1]["scores"] > 0.6).all() and (together[0]["scores"] > 0.2).all()
    assert len(together[1]["scores"]) < len(together[2]["scores"])
    for d, (h, w) in zip(together, original.tolist(), strict=True):  # clipped to the original image
        b = d["boxes"]
        assert (b >= 0).all() and (b[:, 0::2] <= w).all() and (b[:, 1::2] <= h).all()
        assert torch.equal(d["scores"], d["scores"].sort(descending=True).values)


@needs_ultralytics
def test_decode_equals_ultralytics_nms_and_scale_boxes() -> None:
    """The vectorised decode against ultralytics' own functions on random raw outputs, per image."""
    import torch

    ultralytics_env()
    from ultralytics.utils import nms, ops

    spec = _decode_spec(nc=5, imgsz=96)
    pred = _random_predictions(spec, 4, seed=2)
    resized, original = (
        torch.tensor([[96, 72], [37, 96], [96, 96], [96, 1]]),
        torch.tensor([[480, 360], [101, 262], [9, 9], [3000, 1]]),
    )
    controls = [
        RequestControls(0.1, 0.45, 50),
        RequestControls(0.3, 0.7, 300),
        RequestControls(0.05, 0.6, 10),
        RequestControls(0.2, 0.5, 5),
    ]
    ours = yolo.decode(spec, {"predictions": pred}, (96, 96), resized, original, controls)
    for i, c in enumerate(controls):
        (ref,) = nms.non_max_suppression(pred[i : i + 1].clone(), c.score_threshold, c.iou_threshold, max_det=c.max_det)
        ref[:, :4] = ops.scale_boxes((96, 96), ref[:, :4], tuple(original[i].tolist()))
        assert torch.equal(ours[i]["boxes"], ref[:, :4]), i
        assert torch.equal(ours[i]["scores"], ref[:, 4]), i
        assert torch.equal(ours[i]["labels"], ref[:, 5].long()), i


def test_decode_spec_rejects_unknown_keys_and_bad_values() -> None:
    spec = _decode_spec()
    assert yolo.YoloDecodeSpec.from_json(spec.to_json()) == spec
    with pytest.raises(SpecError, match="unknown key") as err:
        yolo.YoloDecodeSpec.from_dict({**spec.to_dict(), "conf_thres": 0.3})
    assert "score_thresh" in (err.value.hint or "")
    with pytest.raises(SpecError, match="multiple of the largest stride"):
        yolo.YoloDecodeSpec.from_dict({**spec.to_dict(), "imgsz": 100})
    with pytest.raises(SpecError, match="num_predictions"):
        yolo.YoloDecodeSpec.from_dict({**spec.to_dict(), "num_predictions": 10})
    with pytest.raises(SpecError, match="family"):
        yolo.YoloDecodeSpec.from_dict({**spec.to_dict(), "family": "ssd"})


@needs_ultralytics
def test_build_rejects_bad_options() -> None:
    with pytest.raises(SpecError, match="multiple of the model's largest stride"):
        yolo.FAMILY.build("yolov8n", 80, None, {"imgsz": 100}, seed=0)
    with pytest.raises(SpecError, match="unknown YOLO model option"):
        yolo.FAMILY.build("yolov8n", 80, None, {"img_size": 320}, seed=0)
    with pytest.raises(SpecError, match="no end-to-end"):
        yolo.FAMILY.build("yolov8n", 80, None, {"end2end": True}, seed=0)


@needs_ultralytics
def test_checkpoint_brings_architecture_classes_and_names(tmp_path: Path) -> None:
    """A ``best.pt`` as ultralytics' trainer saves it (pickled half-precision model + train_args)."""
    import copy

    import torch

    model = copy.deepcopy(_model("yolov8n", 320))
    model.names = {i: f"thing{i}" for i in range(80)}
    path = tmp_path / "best.pt"
    torch.save({"model": model.half(), "train_args": {"imgsz": 320}, "epoch": -1}, path)
    loaded = yolo.FAMILY.build("yolo", 0, path, {}, seed=None)
    spec = yolo.FAMILY.decode_spec(loaded, yolo.FAMILY.preprocess_spec(loaded))
    assert (spec.num_classes, spec.imgsz, spec.class_names[3]) == (80, 320, "thing3")
    assert next(loaded.parameters()).dtype == torch.float32
    with pytest.raises(Exception, match="80 classes"):
        yolo.FAMILY.build("yolo", 3, path, {}, seed=None)


@needs_ultralytics
def test_importing_ultralytics_leaves_this_process_as_it_was() -> None:
    """ultralytics' import patches PIL.Image.open (and torch.save, numpy, OpenCV): detserve undoes it."""
    import torch
    from PIL import Image

    from detserve.errors import ImageError
    from detserve.runtime.imaging import decode_image

    before = (Image.open, torch.save)
    ultralytics_env()
    import ultralytics.utils.patches  # noqa: F401

    assert (Image.open, torch.save) == before
    with pytest.raises(ImageError, match="not a JPEG, PNG"):
        decode_image(b"%!PS-Adobe-3.0 EPSF-3.0\n" + b"\0" * 64, 1 << 20)
