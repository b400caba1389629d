"""``detserve compare``: the detection-level diff between every way one model is run.

Sides: eager PyTorch (the reference), ONNX Runtime in this process (the served ONNX and the served
pre/post-processing code, no server), the live endpoint, and TensorRT where the version has an engine
and this machine a GPU. This module runs each side (one function per side) and the core's raw-tensor
check; :mod:`loadtest.compare_report` matches the detections, judges them and renders the report.

It lives in the tools layer (converters, loadtest, training), not in ``detserve.verification``: it
exports and checks cores (``converters.onnx_export``, ``converters.multistep``) and runs TensorRT
engines (``converters.tensorrt_*``), which the verification layer below may not import. Within that
layer it sits in ``loadtest``, beside the in-process pipeline it runs (``loadtest.inprocess``):
loadtest imports converters, so compare in ``converters`` would close a converters <-> loadtest cycle.
``detserve compare`` calls :func:`run_compare` and :func:`write_report`.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from loadtest.compare_report import CompareReport, Det, compare_side, position_check, raw_record


def write_report(report: CompareReport, out: Path) -> dict[str, Path]:
    """``compare.json``, ``compare.md`` and ``compare.html`` in ``out``; their paths by format."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "compare.json", "markdown": out / "compare.md", "html": out / "compare.html"}
    paths["json"].write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    paths["markdown"].write_text(report.markdown())
    paths["html"].write_text(report.html())
    return paths


class _TrtSession:
    """An ``onnxruntime.InferenceSession``-shaped wrapper around a TensorRT engine (Polygraphy runner)."""

    def __init__(self, plan: Path) -> None:
        from converters.tensorrt_env import check_plan_compatible, import_tensorrt
        from converters.tensorrt_verify import ensure_cudart_visible

        check_plan_compatible(plan)
        import_tensorrt()
        ensure_cudart_visible()
        from polygraphy.backend.common import BytesFromPath
        from polygraphy.backend.trt import EngineFromBytes, TrtRunner

        self._runner = TrtRunner(EngineFromBytes(BytesFromPath(str(plan))), name="tensorrt")
        self._runner.activate()

    def run(self, names: Sequence[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        out = self._runner.infer(feeds)
        return [np.asarray(out[n].cpu() if hasattr(out[n], "cpu") else out[n]) for n in names]


def _as_det(d: Any) -> Det:
    """A detections mapping (in-process sides) or a client ``Detections`` (server) as arrays."""
    get = d.__getitem__ if isinstance(d, dict) else lambda k: getattr(d, k)
    return {
        "boxes": np.asarray(get("boxes"), dtype=np.float32).reshape(-1, 4),
        "scores": np.asarray(get("scores"), dtype=np.float32),
        "labels": np.asarray(get("labels"), dtype=np.int64),
    }


def _step_raw_errors(
    repository: Path, model: str, version: int, reference: Any, pipeline: Any, items: Sequence[Any], controls: Any
) -> list[dict[str, Any]]:
    """Each core step's served ONNX against its torch module, per declared output, on the inputs the
    whole chain (cores as torch modules, the family's torch steps) gives it for each image."""
    import torch

    from converters.multistep import run_chain, verify_step
    from detserve.pipeline import model_name

    family, post = reference.family, pipeline.spec.postprocess
    selects = family.core_selects(post)
    samples: dict[str, list[list[Any]]] = {}
    for it in items:
        info = torch.from_numpy(it.info()[None])
        _, inputs = run_chain(family, reference.model, post, it.tensor[None], info, [controls])
        for role, args in inputs.items():
            samples.setdefault(role, []).append(args)
    out = []
    for step in pipeline.steps:
        if step.kind != "core" or step.role not in samples:
            continue
        onnx = repository / model_name(model, step.role) / str(version) / "model.onnx"
        module = family.step_module(reference.model, post, step.role)
        out.append(raw_record(verify_step(module, step, onnx, samples[step.role]), selects))
    return out


@dataclass(frozen=True)
class _Inputs:
    """What every side is compared on: the images, the served pipeline run in process, the eager reference."""

    repository: Path
    model: str
    version: int
    record: dict[str, Any]  # the version's build record
    pipeline: Any  # loadtest.inprocess.InProcessPipeline over the version's ONNX
    controls: Any  # RequestControls: the score threshold, the spec's NMS IoU and max detections
    blobs: list[bytes]
    items: list[Any]  # the preprocessed images (the cores' inputs)
    torch_model: Any  # verification.reference's eager model
    reference: list[Any]  # its detections, one per image
    score_threshold: float
    max_det: int
    agree_iou: float
    seed: int


def run_compare(
    repository: Path,
    model: str,
    images: Sequence[Path],
    url: str | None = None,
    score_threshold: float = 0.0,
    score_tol: float = 1e-3,
    agree_iou: float = 0.9,
    seed: int = 0,
    echo: Callable[[str], None] = print,
) -> CompareReport:
    """Every side against eager PyTorch on ``images``; a side that cannot run here is listed in ``skipped``."""
    if not images:
        raise ValueError("no images to compare")
    run = _prepare(repository, model, images, score_threshold, agree_iou, seed, echo)
    report = CompareReport(model, run.version, [p.name for p in images], score_threshold, score_tol=score_tol)
    _onnxruntime_side(run, report, echo)
    report.raw += _raw_errors(run)
    _tensorrt_side(run, report, echo)
    if url is None:
        report.skipped["server"] = "no --url given"
    else:
        _server_side(run, report, url, echo)
    return report


def _prepare(
    repository: Path,
    model: str,
    images: Sequence[Path],
    score_threshold: float,
    agree_iou: float,
    seed: int,
    echo: Callable[[str], None],
) -> _Inputs:
    """Decode and preprocess the images, load the version's pipeline, and run the eager reference once."""
    from detserve.runtime.imaging import decode_image
    from detserve.runtime.preprocess import preprocess
    from detserve.specs import RequestControls
    from detserve.verification.reference import build_record, reference_model
    from loadtest.inprocess import InProcessPipeline

    version, record = build_record(repository, model)
    pipeline = InProcessPipeline.from_repository(repository, model, version)
    spec = pipeline.spec
    max_det = spec.postprocess.detections_per_img
    controls = RequestControls(score_threshold, spec.postprocess.nms_thresh, max_det)
    blobs = [p.read_bytes() for p in images]
    rgbs = [decode_image(b, spec.preprocess.max_image_pixels) for b in blobs]
    echo(f"pytorch: eager {record['detector']} on {len(images)} images")
    torch_model = reference_model(record)
    reference = [torch_model.detect(rgb, score_threshold, max_det) for rgb in rgbs]
    items = [preprocess(rgb, spec.preprocess) for rgb in rgbs]
    return _Inputs(
        repository=repository,
        model=model,
        version=version,
        record=record,
        pipeline=pipeline,
        controls=controls,
        blobs=blobs,
        items=items,
        torch_model=torch_model,
        reference=reference,
        score_threshold=score_threshold,
        max_det=max_det,
        agree_iou=agree_iou,
        seed=seed,
    )


def _onnxruntime_side(run: _Inputs, report: CompareReport, echo: Callable[[str], None]) -> None:
    """The served ONNX and pre/post-processing in process: each image alone, then all of them in one shuffled call."""
    echo("onnxruntime: the served ONNX and pre/post-processing, in process")
    single = [_as_det(run.pipeline.run([b], run.controls)[0]) for b in run.blobs]
    report.sides.append(compare_side("onnxruntime", run.reference, single, run.agree_iou))
    order = list(range(len(run.blobs)))
    random.Random(run.seed).shuffle(order)
    batched = run.pipeline.run([run.blobs[i] for i in order], run.controls)
    trials = [(i, _as_det(d)) for i, d in zip(order, batched, strict=True)]
    report.positions.append(position_check("onnxruntime", "all images in one call, shuffled", single, trials))


def _raw_errors(run: _Inputs) -> list[dict[str, Any]]:
    """The cores' raw tensors against their torch modules: every core step of a multi-step family on the
    inputs the chain gives it, or the single core on the preprocessed images."""
    from converters.onnx_export import verify_onnxruntime

    if run.pipeline.steps is not None:
        return _step_raw_errors(run.repository, run.model, run.version, run.torch_model, run.pipeline, run.items, run.controls)
    family, post = run.torch_model.family, run.pipeline.spec.postprocess
    core = family.core(run.torch_model.model, post)
    onnx = run.pipeline.version_dir / "model.onnx"
    raw = verify_onnxruntime(core, family.outputs(post), onnx, [it.tensor[None] for it in run.items])
    return [raw_record(raw, family.core_selects(post))]


def _tensorrt_side(run: _Inputs, report: CompareReport, echo: Callable[[str], None]) -> None:
    """The version's engine in process, where it has one and this machine can run it.

    Only the errors that mean "TensorRT cannot run this engine here" make the side "skipped": no
    TensorRT, no CUDA GPU, an engine built for another GPU or TensorRT version (or without its
    metadata). Anything else is a bug or a real failure, and raises.
    """
    from converters.tensorrt_env import EngineMismatchError, NoCudaGpuError, TensorRTNotInstalledError
    from converters.tensorrt_verify import verify_tensorrt
    from loadtest.inprocess import InProcessPipeline

    plan = run.pipeline.version_dir / "model.plan"
    if run.pipeline.steps is not None:
        report.skipped["tensorrt"] = (
            "no in-process TensorRT side for multi-step pipelines yet; served engines are compared with --url"
        )
        return
    if not plan.is_file():
        report.skipped["tensorrt"] = "no model.plan in this version (built for onnxruntime)"
        return
    try:
        session = _TrtSession(plan)
    except (TensorRTNotInstalledError, NoCudaGpuError, EngineMismatchError) as e:  # say so, compare the rest
        report.skipped["tensorrt"] = f"{type(e).__name__}: {e}"
        return
    spec = run.pipeline.spec
    trt = InProcessPipeline(spec, session, run.pipeline.version_dir)
    echo("tensorrt: the version's engine, in process")
    single = [_as_det(trt.run([b], run.controls)[0]) for b in run.blobs]
    report.sides.append(compare_side("tensorrt", run.reference, single, run.agree_iou))
    family = run.torch_model.family
    batches = [it.tensor[None] for it in run.items]
    engine_raw = verify_tensorrt(
        run.pipeline.version_dir / "model.onnx",
        plan,
        batches,
        run.record.get("precision", "fp32"),
        family.outputs(spec.postprocess),
    )
    report.raw.append(raw_record(engine_raw, family.core_selects(spec.postprocess)))


def _server_side(run: _Inputs, report: CompareReport, url: str, echo: Callable[[str], None]) -> None:
    """The live endpoint: one request per image, then shuffled concurrent rounds (dynamic batching mixes
    them), then multi-image requests where the canvas is fixed. An unreachable server raises (``--url``
    names it: not being able to reach it is the user's error, not a side to skip)."""
    from clients.grpc_client import DetectorClient

    echo(f"server: {run.model} at {url}, one request per image, then shuffled concurrent rounds")
    blobs, threshold, max_det = run.blobs, run.score_threshold, run.max_det
    with DetectorClient(url, run.model, retries=3) as client:
        client.check_ready()
        served = [_as_det(client.detect(b, threshold, None, max_det)) for b in blobs]
        report.sides.append(compare_side("server", run.reference, served, run.agree_iou))
        trials: list[tuple[int, Det]] = []
        rng = random.Random(run.seed)
        for _ in range(3):
            order = [i for i in range(len(blobs)) for _ in range(2)]
            rng.shuffle(order)
            results = client.detect_many([blobs[i] for i in order], threshold, None, max_det, max_in_flight=len(order))
            for i, res in zip(order, results, strict=True):
                if isinstance(res, Exception):
                    raise res
                trials.append((i, _as_det(res)))
        report.positions.append(position_check("server", "concurrent requests, shuffled, dynamic batching", served, trials))
        if run.pipeline.spec.preprocess.fixed_input_hw is not None:  # fixed canvas: images of one request are independent
            trials = []
            for shift in range(min(3, len(blobs))):
                order = [(k + shift) % len(blobs) for k in range(len(blobs))][:8]
                batch = client.detect_batch([blobs[i] for i in order], threshold, None, max_det)
                trials += [(i, _as_det(res)) for i, res in zip(order, batch, strict=True)]
            report.positions.append(position_check("server", "multi-image requests, rotated", served, trials))
