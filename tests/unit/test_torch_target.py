"""The python-torch core target (converters/torch_export.py, runtime/torchcore.py) and the GPU
pipeline's configs (ServingOptions.device): artifacts against eager, configs against golden files.

Regenerate the golden files after an intended change with DETSERVE_UPDATE_GOLDEN=1 and review the diff.
The per-family builds (artifact vs eager on the sample photographs, every core of R-CNN, detections
order-free where the core selects by top-k) are slow: each builds a detector.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from converters.torch_export import dynamic_shapes, export_artifact, verify_artifact
from detserve.errors import SpecError
from detserve.families.base import IMAGES, TensorDecl, single_stage_steps
from detserve.runtime.torchcore import artifact_in, load_core, pack_tensors, run_core
from detserve.tritonconfig import ServingOptions, ensemble_config, own_canvases, parse, preprocess_config, render, step_config
from tests.unit.test_tritonconfig import FCOS_OUT, FCOS_POST, FCOS_PRE, SSD_OUT, SSD_POST, SSD_PRE

GOLDEN = Path(__file__).parent.parent / "golden"
GPU = ServingOptions(device="gpu")


class _Head(torch.nn.Module):
    """A core with dynamic H/W whose output follows the image ([N, H*W/4, 2]), like a detector head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 2, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).flatten(2).transpose(1, 2)


class _DataDependent(_Head):
    """Python control flow on a value: torch.export refuses it (a guard on data), a trace does not."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        return y * 2 if bool(y.sum() > -1e9) else y


HEAD_OUT = (TensorDecl("feat", (-1, 2)),)


def test_the_export_is_dynamic_in_batch_and_size_and_equals_eager(tmp_path: Path) -> None:
    head = _Head().eval()
    record = export_artifact(head, (IMAGES,), (torch.rand(2, 3, 64, 96),), tmp_path)
    assert record["format"] == "torch.export" and record["file"] == "model.pt2" and record["fallback_reason"] is None
    artifact = load_core(tmp_path / "model.pt2")
    samples = [(torch.rand(1, 3, 64, 96),), (torch.rand(3, 3, 96, 32),), (torch.rand(2, 3, 130, 70),)]  # other batch, H, W
    result = verify_artifact(head, artifact, (IMAGES,), HEAD_OUT, samples, "torch")
    assert result.ok and result.outputs[0].max_abs == 0.0, result.summary()


def test_where_export_fails_a_trace_stands_in_and_the_record_says_why(tmp_path: Path) -> None:
    (tmp_path / "model.pt2").write_bytes(b"stale")  # a rebuild leaves one artifact, never both
    record = export_artifact(_DataDependent().eval(), (IMAGES,), (torch.rand(2, 3, 64, 64),), tmp_path)
    assert record["format"] == "torchscript-trace" and record["file"] == "model.ts"
    assert record["fallback_reason"] and not (tmp_path / "model.pt2").exists()
    x = torch.rand(1, 3, 64, 64)
    found = artifact_in(tmp_path, "model.pt2")  # the config's name; the version directory holds the trace
    assert found == tmp_path / "model.ts"
    assert torch.equal(run_core(load_core(found), [x])[0], run_core(_DataDependent().eval(), [x])[0])
    with pytest.raises(SpecError, match="no torch core artifact"):
        artifact_in(tmp_path / "empty", "model.pt2")


def test_a_declared_fixed_size_stays_fixed_and_bad_artifacts_are_refused(tmp_path: Path) -> None:
    assert dynamic_shapes((IMAGES,), (320, 320))[0].keys() == {0}
    assert dynamic_shapes((IMAGES, TensorDecl("boxes", (-1, 4))))[1].keys() == {0, 1}
    with pytest.raises(SpecError, match="not a torch core artifact"):
        load_core(tmp_path / "model.onnx")
    with pytest.raises(SpecError, match="device"):
        load_core(tmp_path / "model.pt2", device="tpu")


class _Anchored(_Head):
    """A tensor made inside forward (anchors, grids): traced on the CPU, the graph names device "cpu"."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        return y + torch.arange(y.shape[1], dtype=y.dtype)[None, :, None]


@pytest.mark.gpu
def test_the_artifact_runs_on_the_gpu_as_on_the_cpu(tmp_path: Path) -> None:
    """Exported on the CPU (the build machine), served on the GPU: weights and the graph's own devices move."""
    record = export_artifact(_Anchored().eval(), (IMAGES,), (torch.rand(2, 3, 64, 96),), tmp_path)
    assert record["format"] == "torch.export"
    x = torch.rand(3, 3, 96, 64)
    cpu = run_core(load_core(tmp_path / "model.pt2"), [x])[0]
    gpu = run_core(load_core(tmp_path / "model.pt2", device="cuda"), [x.numpy()], device="cuda")[0]
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-4 * max(1.0, float(cpu.abs().max())), rtol=1e-4)


def test_pack_tensors_pads_like_the_numpy_pack() -> None:
    from detserve.runtime.canvas import pack

    rows = [torch.ones(3, 2), torch.full((5, 2), 2.0)]
    packed, shapes = pack_tensors(rows)
    want, want_shapes = pack([r.numpy() for r in rows])
    assert np.array_equal(packed.numpy(), want) and np.array_equal(shapes, want_shapes)


# ------------------------------------------------------------------------------------------ configs


def _core(target: str, opts: ServingOptions, pre: Any = SSD_PRE, outputs: Any = SSD_OUT) -> Any:
    return step_config("ssd", single_stage_steps(outputs)[0], target, None, opts, last=False, pre=pre)


def _post(opts: ServingOptions, outputs: Any = SSD_OUT, post: Any = SSD_POST) -> Any:
    return step_config("ssd", single_stage_steps(outputs)[1], "python-torch", post, opts, last=True)


def _configs() -> dict[str, str]:
    return {
        "torch_ssd_core": render(_core("python-torch", ServingOptions())),
        "torch_ssd_core_gpu": render(_core("python-torch", GPU)),
        "torch_ssd_postprocess_gpu": render(_post(GPU)),
    }


@pytest.mark.parametrize("name", sorted(_configs()))
def test_matches_golden(name: str) -> None:
    text = _configs()[name]
    path = GOLDEN / f"{name}.pbtxt"
    if os.environ.get("DETSERVE_UPDATE_GOLDEN") == "1":
        path.write_text(text)
    assert path.is_file(), f"missing golden file {path}; run with DETSERVE_UPDATE_GOLDEN=1"
    assert text == path.read_text()
    assert render(parse(text)) == text


def test_device_gpu_puts_every_python_step_on_the_gpu_with_device_cuda() -> None:
    from tritonclient.grpc import model_config_pb2 as mc

    steps = [
        preprocess_config("fcos", FCOS_PRE, GPU),
        _core("python-torch", GPU, FCOS_PRE, FCOS_OUT),
        _post(GPU, FCOS_OUT, FCOS_POST),
    ]
    own_canvases(steps, "python-torch")
    ensemble_config("fcos", steps, GPU)  # still wires
    for config in steps:
        assert [g.kind for g in config.instance_group] == [mc.ModelInstanceGroup.KIND_GPU], config.name
        assert config.parameters["device"].string_value == "cuda", config.name
    for config in steps[1:]:  # inputs stay where the previous step left them (DLPack, no host copy)
        assert config.parameters["FORCE_CPU_ONLY_INPUT_TENSORS"].string_value == "no", config.name
    # the torch core crops per-image canvases like the python-onnxruntime core: companions for dynamic outputs
    assert "cls_logits__shape" in [t.name for t in steps[1].output]
    assert "cls_logits__shape" in [t.name for t in steps[2].input]
    cpu = preprocess_config("fcos", FCOS_PRE, ServingOptions())
    assert "device" not in cpu.parameters and cpu.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU


def test_device_gpu_is_refused_off_the_torch_target() -> None:
    from converters.repository import BuildRequest, build_repository

    with pytest.raises(SpecError, match="device must be one of"):
        ServingOptions(device="cuda")
    for target in ("python-onnxruntime", "onnxruntime", "tensorrt"):
        with pytest.raises(SpecError, match="python-torch"):
            _core(target, GPU)
    with pytest.raises(SpecError, match="--device gpu needs --target python-torch"):  # before any model is built
        build_repository(BuildRequest("ssdlite320_mobilenet_v3_large", Path("/nonexistent"), options=GPU))
    with pytest.raises(SpecError, match="fused CPU layout"):
        build_repository(BuildRequest("ssdlite320_mobilenet_v3_large", Path("/nonexistent"), target="python-torch",
                                      fused_out=Path("/nonexistent")))  # fmt: skip


# ------------------------------------------------------------------------------- per family (slow)

# where torch.export cannot capture a core, the build traces it instead (TorchScript) and says why:
# transformers' RT-DETR reads the batch size with len(tensor) (modeling_rt_detr.py), a Python int
# that torch.export specialises to the example's batch; the trace keeps it as a size read
TRACED = {"rtdetr_tiny": "specialized"}
_FAMILIES = {  # detector -> (num_classes, model kwargs, what needs to be installed)
    "ssdlite320_mobilenet_v3_large": (5, {}, None),
    "retinanet_resnet50_fpn_v2": (5, {"min_size": 256, "max_size": 320}, None),
    "fcos_resnet50_fpn": (5, {"min_size": 256, "max_size": 320}, None),
    "yolov8n": (None, {"imgsz": 320}, "ultralytics"),
    "rtdetr_tiny": (None, {}, "transformers"),
    "detr_tiny": (None, {}, "transformers"),
    "fasterrcnn_mobilenet_v3_large_320_fpn": (5, {}, None),
    "maskrcnn_resnet50_fpn": (5, {"min_size": 160, "max_size": 224, "rpn_post_nms_top_n_test": 100}, None),
}


def _family_param(detector: str) -> Any:
    needs = _FAMILIES[detector][2]
    missing = needs is not None and importlib.util.find_spec(needs) is None
    return pytest.param(detector, id=detector, marks=[pytest.mark.slow, pytest.mark.skipif(missing, reason=f"needs {needs}")])


@pytest.mark.parametrize("detector", [_family_param(d) for d in _FAMILIES])
def test_every_core_of_the_family_exports_and_equals_eager(detector: str, tmp_path: Path) -> None:
    """The build's own check on the sample photographs (per tensor, batches of 1 and 2, every size the
    photographs give; by decoded detections order-free where the core selects)."""
    from converters.repository import BuildRequest, build_repository
    from detserve.families import family_for_detector

    classes, kwargs, _ = _FAMILIES[detector]
    req = BuildRequest(detector, tmp_path, num_classes=classes, spread_init_seed=0, model_kwargs=kwargs, target="python-torch")
    result = build_repository(req)
    record = result.record
    assert record["verification"]["ok"] and record["onnx_sha256"] is None
    family = family_for_detector(detector)
    cores = [s.role for s in family.steps(result.spec.postprocess) if s.kind == "core"]
    assert sorted(record["torch_core"]) == sorted(cores)
    for role in cores:
        artifact = record["torch_core"][role]
        if detector in TRACED and role == "core":
            assert artifact["format"] == "torchscript-trace" and TRACED[detector] in artifact["fallback_reason"]
        else:
            assert artifact["format"] == "torch.export", artifact["fallback_reason"]
        assert (tmp_path / f"{result.name}_{role}" / "1" / artifact["file"]).is_file()
        assert record["verification"][role]["ok"]
    if family.core_selects(result.spec.postprocess):
        assert record["verification"]["core"]["judged_by"] == "detections"


def test_bench_prints_the_torch_core_beside_the_onnxruntime_core(monkeypatch: pytest.MonkeyPatch) -> None:
    from loadtest.bench_figures import TORCH_CORE_RATIO, ratios
    from loadtest.bench_report import render_bench
    from tests.unit.test_bench_accounting import _results

    r = _results(monkeypatch)
    assert TORCH_CORE_RATIO not in r["ratios"]  # (g) only when asked for
    r["torch_core"] = {"report": {**r["triton"]["report"], "throughput_rps": r["triton"]["report"]["throughput_rps"] / 2}}
    r["ratios"] = ratios(r)
    assert r["ratios"][TORCH_CORE_RATIO] == pytest.approx(0.5)
    text = render_bench(r)
    assert "(g) Triton ensemble, torch core (python-torch)" in text and f"| {TORCH_CORE_RATIO} | 0.50 |" in text
