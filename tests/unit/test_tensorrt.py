"""The TensorRT path: everything a CPU can check, and (marker ``gpu``) engines built and compared on a GPU.

CPU: optimisation profiles, model.plan.json metadata and the compatibility check, calibration
data, error mapping (TensorRT missing, no GPU, parser errors, precisions TensorRT 11 lacks), the
Polygraphy comparison plumbing (ONNX Runtime runners), the end-to-end NMS graph (evaluated by a
numpy stand-in for TensorRT against the torch post-processing), the post-processing model's
DLPack path, the CLI/repository refusals. GPU: real engines, verified against ONNX Runtime.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from converters.tensorrt_build import (
    BuildOptions,
    PrecisionUnsupportedError,
    apply_precision,
    attach_timing_cache,
    build_engine,
    check_precision_supported,
    save_timing_cache,
    validate_precision,
)
from converters.tensorrt_calibration import (
    CalibrationCache,
    CalibrationDataError,
    fit_to_canvas,
    list_calibration_images,
    load_calibration_batches,
    make_batches,
)
from converters.tensorrt_env import (
    EngineEnvironment,
    EngineMismatchError,
    NoCudaGpuError,
    PlanMetadata,
    TensorRTNotInstalledError,
    check_plan_compatible,
    check_plan_metadata,
    import_tensorrt,
    metadata_path,
    read_plan_metadata,
    require_cuda_gpu,
    write_plan_metadata,
)
from converters.tensorrt_parse import OnnxParseError, ParserIssue, UnsupportedOpError, parse_error, parser_issues
from converters.tensorrt_profile import ShapeRange, calibration_shape, derive_profile
from detserve.errors import SpecError
from detserve.families import family
from detserve.families.base import TensorDecl
from detserve.specs import PreprocessSpec
from tests.unit.test_tritonconfig import FCOS_POST, FCOS_PRE, SSD_OUT, SSD_POST, SSD_PRE

HAS_TENSORRT = True
try:
    import tensorrt  # noqa: F401
except ImportError:
    HAS_TENSORRT = False
needs_tensorrt = pytest.mark.skipif(not HAS_TENSORRT, reason="needs TensorRT (pip install 'detserve[tensorrt]')")

ENV = EngineEnvironment(tensorrt_version="10.16.0.72", gpu_name="NVIDIA H100 80GB HBM3", compute_capability="9.0")


def _meta(**changes: Any) -> PlanMetadata:
    base = PlanMetadata(
        tensorrt_version=ENV.tensorrt_version,
        gpu_name=ENV.gpu_name,
        compute_capability=ENV.compute_capability,
        precision="fp16",
        profiles={"images": derive_profile(SSD_PRE, 8).to_dict()},
        build_seconds=12.5,
        onnx_sha256="ab" * 32,
    )
    return PlanMetadata(**{**base.to_dict(), **changes})


# --------------------------------------------------------------------------------------------
# profiles
# --------------------------------------------------------------------------------------------


def test_fixed_core_profile_spans_only_the_batch() -> None:
    p = derive_profile(SSD_PRE, 8)
    assert p == ShapeRange((1, 3, 320, 320), (8, 3, 320, 320), (8, 3, 320, 320))
    assert derive_profile(SSD_PRE, 32, opt_batch=4).opt == (4, 3, 320, 320)
    assert calibration_shape(p) == (8, 3, 320, 320)
    assert calibration_shape(derive_profile(SSD_PRE, 2)) == (2, 3, 320, 320)


def test_dynamic_core_profile_spans_the_sizes_preprocessing_can_give() -> None:
    p = derive_profile(FCOS_PRE, 8)  # min_size 256, max_size 320, multiples of 32
    assert p.min == (1, 3, 32, 32)
    assert p.opt == (8, 3, 256, 320)  # 4:3 landscape, the size the ONNX export traces with
    assert p.max == (8, 3, 320, 320)
    big = derive_profile(PreprocessSpec(min_size=800, max_size=1333), 4)
    assert big.max == (4, 3, 1344, 1344) and big.opt == (4, 3, 800, 1088)
    assert calibration_shape(big) == (4, 3, 800, 1088)


def test_profile_arguments_are_checked() -> None:
    with pytest.raises(SpecError, match="max_batch_size"):
        derive_profile(SSD_PRE, 0)
    with pytest.raises(SpecError, match="opt batch"):
        derive_profile(SSD_PRE, 8, opt_batch=9)


# --------------------------------------------------------------------------------------------
# metadata
# --------------------------------------------------------------------------------------------


def test_metadata_round_trip_and_same_environment_passes(tmp_path: Path) -> None:
    plan = tmp_path / "model.plan"
    meta = _meta(calibration={"images": 5})
    assert write_plan_metadata(plan, meta) == tmp_path / "model.plan.json" == metadata_path(plan)
    again = read_plan_metadata(plan)
    assert again == meta
    check_plan_metadata(again, ENV)


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"tensorrt_version": "10.13.2.6"}, ["TensorRT 10.13.2.6", "10.16.0.72"]),
        ({"compute_capability": "8.0"}, ["compute capability 8.0", "9.0"]),
        ({"gpu_name": "NVIDIA A100-SXM4-40GB"}, ["A100", "H100"]),
    ],
)
def test_an_engine_from_another_gpu_or_tensorrt_is_refused(change: dict[str, str], words: list[str]) -> None:
    with pytest.raises(EngineMismatchError) as e:
        check_plan_metadata(_meta(**change), ENV)
    for word in words:
        assert word in e.value.message
    assert e.value.hint and "rebuild" in e.value.hint


def test_another_gpu_model_of_the_same_capability_can_be_accepted() -> None:
    check_plan_metadata(_meta(gpu_name="NVIDIA H100 PCIe"), ENV, same_gpu_model=False)
    with pytest.raises(EngineMismatchError):
        check_plan_metadata(_meta(compute_capability="8.9"), ENV, same_gpu_model=False)


def test_missing_or_corrupt_metadata_is_a_clear_error(tmp_path: Path) -> None:
    plan = tmp_path / "model.plan"
    plan.write_bytes(b"engine")
    with pytest.raises(EngineMismatchError, match=r"model.plan.json is missing"):
        read_plan_metadata(plan)
    metadata_path(plan).write_text("{not json")
    with pytest.raises(EngineMismatchError, match="not valid JSON"):
        read_plan_metadata(plan)
    metadata_path(plan).write_text(json.dumps({"precision": "fp32"}))
    with pytest.raises(EngineMismatchError, match="lacks"):
        read_plan_metadata(plan)


def test_check_plan_compatible_compares_with_the_running_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import converters.tensorrt_env as te

    plan = tmp_path / "model.plan"
    plan.write_bytes(b"engine")
    write_plan_metadata(plan, _meta())
    monkeypatch.setattr(te, "current_environment", lambda: ENV)
    assert check_plan_compatible(plan).precision == "fp16"
    monkeypatch.setattr(te, "current_environment", lambda: EngineEnvironment("11.4.0.106", ENV.gpu_name, "9.0"))
    with pytest.raises(EngineMismatchError, match=r"TensorRT 10\.16\.0\.72"):
        check_plan_compatible(plan)
    with pytest.raises(EngineMismatchError, match="not found"):
        check_plan_compatible(tmp_path / "other.plan")


# --------------------------------------------------------------------------------------------
# environment errors
# --------------------------------------------------------------------------------------------


def test_missing_tensorrt_is_a_clear_error_with_the_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError
    with pytest.raises(TensorRTNotInstalledError) as e:
        import_tensorrt()
    assert e.value.hint and "pip install 'detserve[tensorrt]'" in e.value.hint


def test_no_gpu_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(NoCudaGpuError, match="no CUDA GPU") as e:
        require_cuda_gpu()
    assert e.value.hint and "nvidia-smi" in e.value.hint
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(NoCudaGpuError, match="CPU-only build"):
        require_cuda_gpu()


def test_build_engine_checks_arguments_then_tensorrt_then_the_gpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SpecError, match="calibration images"):
        build_engine(tmp_path / "m.onnx", tmp_path / "m.plan", SSD_PRE, 8, BuildOptions(precision="int8"))
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(TensorRTNotInstalledError):
        build_engine(tmp_path / "m.onnx", tmp_path / "m.plan", SSD_PRE, 8)
    monkeypatch.setitem(sys.modules, "tensorrt", SimpleNamespace(__version__="10.16.0.72"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(NoCudaGpuError):
        build_engine(tmp_path / "m.onnx", tmp_path / "m.plan", SSD_PRE, 8)


def _fake_trt(*flags: str, calibrator: bool = True) -> Any:
    ns = SimpleNamespace(__version__="x", BuilderFlag=SimpleNamespace(**{f: f for f in flags}))
    if calibrator:
        ns.IInt8EntropyCalibrator2 = object
    return ns


def test_precisions_tensorrt_11_cannot_build_are_refused() -> None:
    trt10 = _fake_trt("FP16", "INT8", "TF32")
    for precision in ("fp32", "fp16", "int8"):
        check_precision_supported(trt10, precision)
    trt11 = _fake_trt("TF32", calibrator=False)
    check_precision_supported(trt11, "fp32")
    for precision in ("fp16", "int8"):
        with pytest.raises(PrecisionUnsupportedError, match="strongly typed") as e:
            check_precision_supported(trt11, precision)
        assert e.value.hint and "<11" in e.value.hint


def test_precision_arguments() -> None:
    validate_precision("fp32", None)
    validate_precision("int8", Path("photos"))
    with pytest.raises(SpecError, match="unknown precision"):
        validate_precision("bf16", None)
    with pytest.raises(SpecError, match="int8 needs calibration images"):
        validate_precision("int8", None)
    with pytest.raises(SpecError, match="only used with --precision int8"):
        validate_precision("fp16", Path("photos"))


class _Config:
    """Records what the builder config is told."""

    def __init__(self, accept_cache: bool = True) -> None:
        self.flags: set[str] = set()
        self.cleared: set[str] = set()
        self.accept_cache = accept_cache
        self.cache: bytes | None = None
        self.int8_calibrator: Any = None

    def set_flag(self, flag: str) -> None:
        self.flags.add(flag)

    def clear_flag(self, flag: str) -> None:
        self.cleared.add(flag)

    def create_timing_cache(self, data: bytes) -> bytes:
        return data

    def set_timing_cache(self, cache: bytes, ignore_mismatch: bool) -> bool:
        if not self.accept_cache and cache:
            return False
        self.cache = cache
        return True

    def get_timing_cache(self) -> Any:
        return SimpleNamespace(serialize=lambda: b"tactics" + (self.cache or b""))


def test_precision_flags() -> None:
    trt = _fake_trt("FP16", "INT8", "TF32")
    config = _Config()
    apply_precision(trt, config, "fp32")
    assert config.flags == set() and config.cleared == {"TF32"}  # strict fp32
    apply_precision(trt, config, "int8", calibrator="calibrator")
    assert config.flags == {"FP16", "INT8"} and config.int8_calibrator == "calibrator"


def test_timing_cache_is_loaded_reset_when_foreign_and_saved(tmp_path: Path) -> None:
    path = tmp_path / "repo" / ".trt_timing_cache"
    config = _Config()
    assert attach_timing_cache(None, config, path) is False  # no file yet
    save_timing_cache(config, path)
    assert path.read_bytes() == b"tactics"
    config = _Config()
    assert attach_timing_cache(None, config, path) is True and config.cache == b"tactics"
    foreign = _Config(accept_cache=False)
    assert attach_timing_cache(None, foreign, path) is False and foreign.cache == b""
    assert attach_timing_cache(None, _Config(), None) is False


# --------------------------------------------------------------------------------------------
# ONNX parser errors
# --------------------------------------------------------------------------------------------


def _tiny_onnx(path: Path, scale: float = 1.0, op: str = "Relu") -> Path:
    """images [N, 3, 4, 4] -> cls_logits [N, 16, 3] and bbox_regression [N, 16, 3] (scaled)."""
    import onnx
    from onnx import TensorProto, helper

    shape = helper.make_tensor("shape", TensorProto.INT64, [3], [0, 16, 3])
    perm = [0, 2, 3, 1]
    nodes = [
        helper.make_node(op, ["images"], ["act"], name="act_node"),
        helper.make_node("Transpose", ["act"], ["nhwc"], name="to_nhwc", perm=perm),
        helper.make_node("Reshape", ["nhwc", "shape"], ["cls_logits"], name="flatten"),
        helper.make_node("Mul", ["cls_logits", "scale"], ["bbox_regression"], name="scale_node"),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, 4, 4])],
        [
            helper.make_tensor_value_info("cls_logits", TensorProto.FLOAT, ["batch", 16, 3]),
            helper.make_tensor_value_info("bbox_regression", TensorProto.FLOAT, ["batch", 16, 3]),
        ],
        initializer=[shape, helper.make_tensor("scale", TensorProto.FLOAT, [], [scale])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


class _ParserError:
    def __init__(self, code: str, desc: str, node: int, name: str = "", op: str = "") -> None:
        self._values = {"code": f"ErrorCode.{code}", "desc": desc, "node": node, "node_name": name, "node_operator": op}

    def __getattr__(self, item: str) -> Any:
        return lambda: self._values[item]


def test_unsupported_op_names_the_node_and_the_op(tmp_path: Path) -> None:
    from converters.tensorrt_parse import onnx_nodes

    nodes = onnx_nodes(_tiny_onnx(tmp_path / "m.onnx"))
    parser = SimpleNamespace(
        num_errors=1, get_error=lambda i: _ParserError("UNSUPPORTED_NODE", "No importer registered for op: Relu", 0)
    )
    issues = parser_issues(parser)
    assert issues == [ParserIssue("UNSUPPORTED_NODE", "No importer registered for op: Relu", 0)]
    err = parse_error(issues, nodes, "10.16.0.72")
    assert isinstance(err, UnsupportedOpError)
    assert "act_node" in err.message and "op Relu" in err.message and "TensorRT 10.16.0.72" in err.message
    assert err.hint and "--target onnxruntime" in err.hint


def test_other_parser_errors_are_reported_with_their_node() -> None:
    issues = [ParserIssue("INVALID_NODE", "bad attribute", 2, "flatten", "Reshape")]
    err = parse_error(issues)
    assert isinstance(err, OnnxParseError) and "'flatten' (op Reshape): bad attribute" in err.message
    assert isinstance(parse_error([]), OnnxParseError)
    many = [ParserIssue("UNSUPPORTED_NODE_ATTR", f"attr {i}", i, f"n{i}", "Resize") for i in range(7)]
    err = parse_error(many)
    assert isinstance(err, UnsupportedOpError) and "and 2 more" in err.message


# --------------------------------------------------------------------------------------------
# calibration data
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from detserve.runtime.samples import write_samples

    folder = tmp_path_factory.mktemp("photos")
    write_samples(folder)
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_calibration_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(CalibrationDataError, match="not found"):
        list_calibration_images(tmp_path / "nope")
    (tmp_path / "a.jpg").write_bytes(b"x")
    with pytest.raises(CalibrationDataError, match="folder of images"):
        list_calibration_images(tmp_path / "a.jpg")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.md").write_text("no images here")
    with pytest.raises(CalibrationDataError, match="no images") as e:
        list_calibration_images(empty)
    assert e.value.hint and "detserve samples" in e.value.hint
    with pytest.raises(CalibrationDataError, match=r"a.jpg: not a decodable image"):
        load_calibration_batches(tmp_path, SSD_PRE, (2, 3, 320, 320))


def test_calibration_batches_are_preprocessed_as_served(photos: Path) -> None:
    from detserve.runtime.imaging import decode_image
    from detserve.runtime.preprocess import preprocess

    files, batches = load_calibration_batches(photos, SSD_PRE, (2, 3, 320, 320))
    assert [f.name for f in files] == sorted(["astronaut.jpg", "camera.png", "chelsea.png", "coffee.jpg", "rocket.jpg"])
    assert len(batches) == 3 and all(b.shape == (2, 3, 320, 320) and b.dtype == np.float32 for b in batches)
    first = preprocess(decode_image(files[0].read_bytes(), 1 << 31), SSD_PRE).tensor.numpy()
    assert np.array_equal(batches[0][0], first)  # bit for bit what the server feeds the core
    assert np.array_equal(batches[2][1], batches[0][0])  # the last batch is filled by cycling


def test_dynamic_calibration_canvas_pads_and_crops(photos: Path) -> None:
    files, batches = load_calibration_batches(photos, FCOS_PRE, (4, 3, 256, 320))
    assert len(files) == 5 and [b.shape for b in batches] == [(4, 3, 256, 320)] * 2
    t = torch.arange(2 * 3 * 5, dtype=torch.float32).reshape(2, 3, 5)
    out = fit_to_canvas(t, (4, 2), -1.0)
    assert out.shape == (2, 4, 2) and torch.equal(out[:, :3, :2], t[:, :, :2]) and bool((out[:, 3:] == -1).all())


def test_make_batches_fills_the_last_batch_and_handles_none() -> None:
    imgs = [np.full((1,), i, np.float32) for i in range(3)]
    assert [b[:, 0].tolist() for b in make_batches(imgs, 2)] == [[0, 1], [2, 0]]
    assert make_batches([], 4) == []


def test_calibration_cache_is_reused_only_for_the_same_inputs(photos: Path, tmp_path: Path) -> None:
    files = list_calibration_images(photos)
    cache = CalibrationCache.for_inputs(tmp_path / "calibration.cache", "sha-a", files, (2, 3, 320, 320))
    assert cache.read() is None
    cache.write(b"TRT-100-EntropyCalibration2\nimages: 3c010204")
    assert cache.read() == b"TRT-100-EntropyCalibration2\nimages: 3c010204"
    for other in (
        CalibrationCache.for_inputs(cache.path, "sha-b", files, (2, 3, 320, 320)),
        CalibrationCache.for_inputs(cache.path, "sha-a", files[:-1], (2, 3, 320, 320)),
        CalibrationCache.for_inputs(cache.path, "sha-a", files, (4, 3, 320, 320)),
    ):
        assert other.key != cache.key and other.read() is None


# --------------------------------------------------------------------------------------------
# verification plumbing (Polygraphy runners on the CPU)
# --------------------------------------------------------------------------------------------


def test_polygraphy_comparison_gives_per_output_errors(tmp_path: Path) -> None:
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx

    from converters.tensorrt_verify import compare_runners, tolerances_for

    ref = _tiny_onnx(tmp_path / "ref.onnx", scale=1.0)
    off = _tiny_onnx(tmp_path / "off.onnx", scale=1.001)  # bbox_regression 0.1% off
    runners = [OnnxrtRunner(SessionFromOnnx(str(p), providers=["cpu"]), name=n) for p, n in ((ref, "ref"), (off, "cand"))]
    batches = [torch.rand(1, 3, 4, 4) + 1, np.random.default_rng(0).random((3, 3, 4, 4), dtype=np.float32) + 1]
    names = ["cls_logits", "bbox_regression"]
    decls = [TensorDecl(n, (-1, 3)) for n in names]
    result = compare_runners(*runners, batches, names, tolerances_for("fp32", decls), "candidate")
    assert [o.name for o in result.outputs] == names
    assert result.input_shapes == [(1, 3, 4, 4), (3, 3, 4, 4)]
    cls, reg = result.outputs
    assert cls.ok and cls.max_abs == 0.0
    assert not reg.ok and 5e-4 < reg.max_rel < 2e-3 and reg.shape == (3, 16, 3)
    assert not result.ok and "polygraphy: FAILED" in result.backend
    loose = compare_runners(*runners, batches, names, tolerances_for("fp16", decls), "candidate")
    assert loose.ok and "polygraphy: passed" in loose.backend and loose.atol == 2e-2


def test_every_declared_output_has_a_tolerance_per_precision() -> None:
    from converters.tensorrt_build import PRECISIONS
    from converters.tensorrt_verify import tolerances_for
    from detserve.families import outputs_of

    for post in (SSD_POST, FCOS_POST):
        decls = outputs_of(post)
        for precision in PRECISIONS:
            assert set(tolerances_for(precision, decls)) == {d.name for d in decls}
        for d in decls:
            assert d.tolerance("fp32") < d.tolerance("fp16") < d.tolerance("int8")


def test_cudart_of_the_torch_wheels_is_made_visible_to_polygraphy(monkeypatch: pytest.MonkeyPatch) -> None:
    from converters.tensorrt_verify import cudart_dirs, ensure_cudart_visible

    dirs = cudart_dirs()
    if not dirs:
        pytest.skip("no pip-installed CUDA runtime here")
    monkeypatch.setenv("LD_LIBRARY_PATH", "/opt/x")
    ensure_cudart_visible()
    parts = __import__("os").environ["LD_LIBRARY_PATH"].split(":")
    assert parts[0] == "/opt/x" and str(dirs[0]) in parts
    ensure_cudart_visible()
    assert __import__("os").environ["LD_LIBRARY_PATH"].split(":") == parts  # idempotent


# --------------------------------------------------------------------------------------------
# end-to-end NMS graph, evaluated by a numpy stand-in for TensorRT
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ssdlite() -> dict[str, Any]:
    from detserve.families import family, output_names
    from detserve.families.torchvision.from_model import postprocess_spec_from_model, preprocess_spec_from_model
    from detserve.families.torchvision.models import spread_init_detector
    from detserve.runtime.imaging import decode_image
    from detserve.runtime.preprocess import preprocess
    from detserve.runtime.samples import sample_files

    model = spread_init_detector("ssdlite320_mobilenet_v3_large", 5, 0)
    pre, post = preprocess_spec_from_model(model), postprocess_spec_from_model(model, "ssd")
    items = [preprocess(decode_image(b, 1 << 31), pre) for b in list(sample_files().values())[:3]]
    with torch.no_grad():
        raw = family("ssd").core(model, post)(torch.stack([it.tensor for it in items]))
    names = output_names(post)
    return {"model": model, "pre": pre, "post": post, "items": items, "raw": dict(zip(names, raw, strict=True))}


def test_decoding_layers_equal_the_models_box_coder(ssdlite: dict[str, Any]) -> None:
    from torchvision.models.detection._utils import BoxCoder

    import tests.fake_tensorrt as fake
    from converters.tensorrt_nms import _decode, _Layers, ssd_decode_constants
    from detserve.families.torchvision.decode import anchors_for

    pre, post = ssdlite["pre"], ssdlite["post"]
    codes = ssdlite["raw"]["bbox_regression"]
    net = fake.Network({"bbox_regression": codes.numpy()})
    consts = ssd_decode_constants(pre, post)
    got = _decode(_Layers(fake, net), net.get_output(0), consts).value
    anchors, _ = anchors_for(post, pre.fixed_input_hw)
    coder = BoxCoder(tuple(post.box_coder_weights), bbox_xform_clip=post.bbox_xform_clip)
    want = torch.stack([coder.decode_single(c, anchors) for c in codes]).clamp(min=0).clamp(max=320.0)
    assert got.shape == (3, consts.num_anchors, 4) == tuple(want.shape)
    np.testing.assert_allclose(got, want.numpy(), rtol=0, atol=1e-4)


def test_nms_graph_matches_the_torch_post_processing(ssdlite: dict[str, Any]) -> None:
    import tests.fake_tensorrt as fake
    from converters.tensorrt_nms import append_nms, to_original
    from detserve.families.torchvision.decode import postprocess_batch
    from detserve.specs import RequestControls
    from detserve.verification.matching import check_parity

    pre, post, items, raw = ssdlite["pre"], ssdlite["post"], ssdlite["items"], ssdlite["raw"]
    net = fake.Network({k: v.numpy() for k, v in raw.items()})
    keep = append_nms(fake, net, pre, post)
    assert keep and all(isinstance(a, np.ndarray) for a in keep)
    out = net.result()
    k = post.detections_per_img
    assert list(out) == ["num_detections", "boxes", "scores", "labels"]
    assert out["num_detections"].shape == (3, 1) and out["num_detections"].dtype == np.int32
    assert out["boxes"].shape == (3, k, 4) and out["scores"].shape == (3, k) and out["labels"].dtype == np.int32

    resized = torch.tensor([it.resized_hw for it in items])
    original = torch.tensor([it.original_hw for it in items])
    controls = [RequestControls(post.score_thresh, post.nms_thresh, post.detections_per_img)] * 3
    ref = postprocess_batch(post, raw, pre.fixed_input_hw, resized, original, controls)
    total = 0
    for i, it in enumerate(items):
        n = int(out["num_detections"][i, 0])
        assert n > 0 and (out["scores"][i, n:] == 0).all() and (out["labels"][i, n:] == 0).all()
        assert (np.diff(out["scores"][i, :n]) <= 0).all() and set(out["labels"][i, :n]) <= set(range(1, post.num_classes))
        boxes = to_original(torch.from_numpy(out["boxes"][i, :n]), it.resized_hw, it.original_hw).numpy()
        parity = check_parity(
            (ref[i]["boxes"].numpy(), ref[i]["scores"].numpy(), ref[i]["labels"].numpy()),
            (boxes, out["scores"][i, :n], out["labels"][i, :n]),
        )
        assert parity.ok, parity.failures[:5]
        total += parity.total
    assert total > 10  # the spread-init heads give real detections above 0.05


def test_nms_engine_is_refused_for_dynamic_cores() -> None:
    from converters.tensorrt_nms import build_nms_engine, check_nms_supported
    from tests.unit.test_tritonconfig import FCOS_POST

    with pytest.raises(SpecError, match="fixed-size SSD"):
        check_nms_supported(FCOS_PRE, FCOS_POST)
    assert check_nms_supported(SSD_PRE, SSD_POST) == (320, 320)
    with pytest.raises(SpecError, match="fp32 or fp16"):
        build_nms_engine(Path("m.onnx"), Path("m.plan"), SSD_PRE, SSD_POST, 8, "int8")


# --------------------------------------------------------------------------------------------
# Triton config, repository and CLI wiring
# --------------------------------------------------------------------------------------------


def test_tensorrt_core_config_runs_the_plan_on_the_gpu() -> None:
    from tritonclient.grpc import model_config_pb2 as mc

    from detserve.tritonconfig import ServingOptions
    from tests.unit.test_tritonconfig import core_config, postprocess_config

    config = core_config("ssd", "tensorrt", SSD_PRE, SSD_OUT, ServingOptions())
    assert config.platform == "tensorrt_plan" and config.default_model_filename == "model.plan" and not config.backend
    assert config.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU
    assert [list(t.dims) for t in config.input] == [[3, 320, 320]]
    cpu = postprocess_config("ssd", SSD_POST, SSD_OUT, ServingOptions())
    assert cpu.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU and "FORCE_CPU_ONLY_INPUT_TENSORS" not in cpu.parameters
    gpu = postprocess_config("ssd", SSD_POST, SSD_OUT, ServingOptions(postprocess_on_gpu=True))
    assert gpu.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU
    assert gpu.parameters["FORCE_CPU_ONLY_INPUT_TENSORS"].string_value == "no"


def test_repository_refuses_tensorrt_options_elsewhere_and_a_machine_without_tensorrt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from converters.repository import BuildRequest, build_repository
    from detserve.tritonconfig import ServingOptions

    def req(**kw: Any) -> BuildRequest:
        return BuildRequest("ssdlite320_mobilenet_v3_large", tmp_path / "repo", num_classes=3, **kw)

    with pytest.raises(SpecError, match="apply to --target tensorrt"):
        build_repository(req(precision="fp16"))
    with pytest.raises(SpecError, match="needs --target tensorrt"):
        build_repository(req(options=ServingOptions(postprocess_on_gpu=True)))
    with pytest.raises(SpecError, match="int8 needs calibration images"):
        build_repository(req(target="tensorrt", precision="int8"))
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(TensorRTNotInstalledError):
        build_repository(req(target="tensorrt"))
    assert not (tmp_path / "repo").exists()  # refused before the export


def test_cli_build_tensorrt_without_tensorrt_exits_1_with_a_hint(tmp_path: Path) -> None:
    if HAS_TENSORRT and torch.cuda.is_available():
        pytest.skip("this machine can build engines")
    proc = subprocess.run(
        [sys.executable, "-m", "detserve.app.cli", "build", "ssdlite320_mobilenet_v3_large", "--repository", str(tmp_path),
         "--num-classes", "3", "--random-weights", "--target", "tensorrt", "--precision", "fp16"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    assert "error:" in proc.stderr and "hint:" in proc.stderr and "Traceback" not in proc.stderr


# --------------------------------------------------------------------------------------------
# post-processing model: the DLPack (GPU) input path gives what the numpy path gives
# --------------------------------------------------------------------------------------------


class _PbTensor:
    def __init__(self, name: str, value: np.ndarray, on_gpu: bool = False) -> None:
        self._name, self._value, self._gpu = name, value, on_gpu

    def name(self) -> str:
        return self._name

    def is_cpu(self) -> bool:
        return not self._gpu

    def as_numpy(self) -> np.ndarray:
        assert not self._gpu, "as_numpy on a GPU tensor fails in Triton"
        return self._value

    def to_dlpack(self) -> Any:
        return torch.utils.dlpack.to_dlpack(torch.from_numpy(self._value))


def _pb_utils() -> Any:
    class InferenceResponse:
        def __init__(self, output_tensors: Any = None, error: Any = None) -> None:
            self.output_tensors, self.error = output_tensors, error

    class TritonError(str):  # the message, like pb_utils.TritonError's; the code is kept aside
        INTERNAL, INVALID_ARG = 1, 3

        def __new__(cls, message: str, code: int = 1) -> TritonError:
            obj = super().__new__(cls, message)
            obj.code = code  # type: ignore[attr-defined]
            return obj

    def get(request: Any, name: str) -> Any:
        return request.tensors[name]

    types = {"TYPE_FP32": np.float32, "TYPE_FP16": np.float16, "TYPE_INT32": np.int32}
    return SimpleNamespace(
        Tensor=_PbTensor,
        InferenceResponse=InferenceResponse,
        TritonError=TritonError,
        get_input_tensor_by_name=get,
        triton_string_to_numpy=types.__getitem__,
    )


STEP_MODULES = ("step_model", "postprocess_model")


@pytest.fixture
def backend(monkeypatch: pytest.MonkeyPatch) -> Any:
    """The python step model, and the alias that repositories built before name, imported against a
    stand-in ``triton_python_backend_utils``, then forgotten."""
    import importlib

    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", _pb_utils())
    for m in STEP_MODULES:
        monkeypatch.delitem(sys.modules, f"detserve.runtime.backend.{m}", raising=False)
    yield {m: importlib.import_module(f"detserve.runtime.backend.{m}") for m in STEP_MODULES}
    for m in STEP_MODULES:
        sys.modules.pop(f"detserve.runtime.backend.{m}", None)


def _loaded(module: Any, config: Any, post: Any) -> Any:
    """The model of ``module`` initialised with ``config`` as Triton hands it over (JSON), with ``post`` as its spec."""
    from google.protobuf import json_format

    config.parameters["postprocess_spec"].string_value = post.to_json()
    model = module.TritonPythonModel()
    model.initialize({"model_config": json.dumps(json_format.MessageToDict(config, preserving_proto_field_name=True))})
    return model


def _requests(ssdlite: dict[str, Any], on_gpu: bool) -> list[Any]:
    raw, items = ssdlite["raw"], ssdlite["items"]

    def request(i: int) -> Any:
        tensors = {n: _PbTensor(n, raw[n][i : i + 1].numpy(), on_gpu) for n in raw}
        tensors["image_info"] = _PbTensor("image_info", items[i].info()[None], on_gpu)
        return SimpleNamespace(tensors=tensors, parameters=lambda: json.dumps({"max_det": 50}))

    return [request(i) for i in range(len(items))]


def _same_responses(a: list[Any], b: list[Any]) -> None:
    for ra, rb in zip(a, b, strict=True):
        assert ra.error is None and rb.error is None, (ra.error, rb.error)
        for ta, tb in zip(ra.output_tensors, rb.output_tensors, strict=True):
            assert ta.name() == tb.name() and np.array_equal(ta.as_numpy(), tb.as_numpy())


def _postprocess_config(post: Any, **options: Any) -> Any:
    from detserve.families.base import single_stage_steps
    from detserve.tritonconfig import ServingOptions, step_config

    decl = single_stage_steps(family("ssd").outputs(post))[1]
    return step_config("p", decl, "tensorrt", post, ServingOptions(**options), last=True)


def test_postprocess_model_reads_gpu_inputs_through_dlpack(ssdlite: dict[str, Any], backend: Any) -> None:
    model = _loaded(backend["step_model"], _postprocess_config(ssdlite["post"], postprocess_on_gpu=True), ssdlite["post"])
    cpu, gpu = model.execute(_requests(ssdlite, False)), model.execute(_requests(ssdlite, True))
    _same_responses(cpu, gpu)
    assert [t.name() for t in cpu[0].output_tensors] == ["num_detections", "boxes", "scores", "labels"]
    assert int(cpu[0].output_tensors[0].as_numpy()[0, 0]) > 0


def test_a_postprocess_config_of_the_old_writer_still_serves(ssdlite: dict[str, Any], backend: Any) -> None:
    """A repository built before every step ran in one python model: its model.py names
    ``postprocess_model`` and its config (tests/golden/legacy: the old writer's) has no ``step``
    parameter. It loads, and answers what the step model answers with the config written now."""
    from detserve.tritonconfig import parse

    legacy = parse((Path(__file__).parent.parent / "golden" / "legacy" / "ssd_postprocess.pbtxt").read_text())
    assert "step" not in legacy.parameters
    raw = ssdlite["raw"]  # SSDlite320 with 5 classes: the legacy config's tensors
    assert all(t.name == "image_info" or tuple(t.dims) == tuple(raw[t.name].shape[1:]) for t in legacy.input)
    old = _loaded(backend["postprocess_model"], legacy, ssdlite["post"])
    new = _loaded(backend["step_model"], _postprocess_config(ssdlite["post"]), ssdlite["post"])
    _same_responses(old.execute(_requests(ssdlite, False)), new.execute(_requests(ssdlite, False)))


# --------------------------------------------------------------------------------------------
# GPU: real engines (skipped without CUDA; TensorRT needed too)
# --------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_postprocess_on_the_gpu_equals_the_cpu(ssdlite: dict[str, Any]) -> None:
    from detserve.families.torchvision.decode import postprocess_batch
    from detserve.specs import RequestControls
    from detserve.verification.matching import check_parity

    pre, post, items, raw = ssdlite["pre"], ssdlite["post"], ssdlite["items"], ssdlite["raw"]
    resized = torch.tensor([it.resized_hw for it in items])
    original = torch.tensor([it.original_hw for it in items])
    controls = [RequestControls(post.score_thresh, post.nms_thresh, post.detections_per_img)] * len(items)
    cpu = postprocess_batch(post, raw, pre.fixed_input_hw, resized, original, controls)
    gpu = postprocess_batch(post, {k: v.cuda() for k, v in raw.items()}, pre.fixed_input_hw, resized, original, controls)
    for a, b in zip(cpu, gpu, strict=True):
        parity = check_parity(*(tuple(d[k].cpu().numpy() for k in ("boxes", "scores", "labels")) for d in (a, b)))
        assert parity.ok, parity.failures[:5]


@pytest.fixture(scope="module")
def small_engine(ssdlite: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from converters.onnx_export import export_core

    folder = tmp_path_factory.mktemp("engine")
    pre, post = ssdlite["pre"], ssdlite["post"]
    fam = family("ssd")
    core = fam.core(ssdlite["model"], post)
    onnx_path = export_core(core, fam.outputs(post), pre, folder / "model.onnx", sample_hw=pre.trace_hw)
    plan = folder / "model.plan"
    meta = build_engine(onnx_path, plan, pre, 2, BuildOptions(timing_cache=folder / ".trt_timing_cache"))
    return {"onnx": onnx_path, "plan": plan, "meta": meta, "folder": folder}


@pytest.mark.gpu
@needs_tensorrt
def test_fp32_engine_is_built_described_and_verified(ssdlite: dict[str, Any], small_engine: dict[str, Any]) -> None:
    from converters.tensorrt_env import current_environment
    from converters.tensorrt_verify import verify_tensorrt

    meta = small_engine["meta"]
    assert meta.environment == current_environment() and meta.precision == "fp32" and meta.build_seconds > 0
    assert meta.profiles == {"images": {"min": [1, 3, 320, 320], "opt": [2, 3, 320, 320], "max": [2, 3, 320, 320]}}
    assert (small_engine["folder"] / ".trt_timing_cache").stat().st_size > 0
    images = torch.stack([it.tensor for it in ssdlite["items"]])
    outputs = family("ssd").outputs(ssdlite["post"])
    result = verify_tensorrt(small_engine["onnx"], small_engine["plan"], [images[:1], images[1:3]], "fp32", outputs)
    assert result.ok, result.summary()


@pytest.mark.gpu
@needs_tensorrt
def test_in_process_engine_matches_onnxruntime_and_refuses_a_foreign_plan(
    ssdlite: dict[str, Any], small_engine: dict[str, Any]
) -> None:
    import onnxruntime as ort

    from converters.tensorrt_runtime import TrtEngine

    images = torch.stack([it.tensor for it in ssdlite["items"][:2]])
    got = TrtEngine(small_engine["plan"])(images.cuda())
    ref = ort.InferenceSession(str(small_engine["onnx"]), providers=["CPUExecutionProvider"]).run(
        None, {"images": images.numpy()}
    )
    for name, want in zip(ssdlite["raw"], ref, strict=True):
        np.testing.assert_allclose(got[name].cpu().numpy(), want, atol=1e-3, rtol=1e-3)
    foreign = small_engine["folder"] / "foreign.plan"
    foreign.write_bytes(small_engine["plan"].read_bytes())
    write_plan_metadata(foreign, PlanMetadata(**{**small_engine["meta"].to_dict(), "tensorrt_version": "9.0.0"}))
    with pytest.raises(EngineMismatchError, match=r"TensorRT 9\.0\.0"):
        TrtEngine(foreign)


@pytest.mark.gpu
@needs_tensorrt
def test_end_to_end_nms_engine_agrees_with_the_split_pipeline(ssdlite: dict[str, Any], small_engine: dict[str, Any]) -> None:
    from converters.tensorrt_nms import build_nms_engine, to_original
    from converters.tensorrt_runtime import TrtEngine
    from detserve.families.torchvision.decode import postprocess_batch
    from detserve.specs import RequestControls
    from detserve.verification.matching import check_parity

    pre, post, items = ssdlite["pre"], ssdlite["post"], ssdlite["items"][:2]
    plan = small_engine["folder"] / "e2e.plan"
    meta = build_nms_engine(small_engine["onnx"], plan, pre, post, 2, "fp32", small_engine["folder"] / ".trt_timing_cache")
    assert meta.variant == "end_to_end_nms" and meta.extra and meta.extra["nms"]["iou_threshold"] == post.nms_thresh
    images = torch.stack([it.tensor for it in items]).cuda()
    out = TrtEngine(plan)(images)
    raw = TrtEngine(small_engine["plan"])(images)
    controls = [RequestControls(post.score_thresh, post.nms_thresh, post.detections_per_img)] * 2
    resized = torch.tensor([it.resized_hw for it in items])
    original = torch.tensor([it.original_hw for it in items])
    split = postprocess_batch(post, raw, pre.fixed_input_hw, resized, original, controls)
    for i, it in enumerate(items):
        n = int(out["num_detections"][i, 0])
        boxes = to_original(out["boxes"][i, :n], it.resized_hw, it.original_hw)
        parity = check_parity(
            tuple(split[i][k].cpu().numpy() for k in ("boxes", "scores", "labels")),  # type: ignore[arg-type]
            (boxes.cpu().numpy(), out["scores"][i, :n].cpu().numpy(), out["labels"][i, :n].cpu().numpy()),
        )
        assert parity.ok, parity.failures[:5]


# --------------------------------------------------------------------------------------------
# the GPU check script's CPU-capable parts
# --------------------------------------------------------------------------------------------


def test_gpu_check_records_a_failed_step_and_stops(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from scripts.gpu_check import run_checks

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    results = run_checks(tmp_path, budget_s=60)
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    assert saved["environment"]["ok"] is False and "TensorRTNotInstalledError" in saved["environment"]["error"]
    assert set(results) == {"environment", "elapsed_s"}


def test_gpu_check_prepares_the_demo_detector_and_compares_detections(tmp_path: Path) -> None:
    from scripts.gpu_check import Run, _parity, _postprocess, prepare

    run = Run(tmp_path, budget_s=60)
    info = run.step("prepare", prepare)
    assert run.results["prepare"]["ok"], run.results["prepare"]
    assert info["input_hw"] == [320, 320] and Path(info["onnx"]).is_file() and len(info["photos"]) == 5
    images = run.state["images"][:2]
    with torch.no_grad():
        names = [o.name for o in run.state["outputs"]]
        raw = dict(zip(names, run.state["family"].core(run.state["model"], run.state["post"])(images), strict=True))
    dets = _postprocess(run, raw, 2)
    parity = _parity(dets, dets)
    assert parity["ok"] and parity["images"] == 2 and parity["matched"] == parity["detections_above_0.05"] > 0
    assert run.step("too_long", prepare, needs_s=1e9) is None and "skipped" in run.results["too_long"]
