"""The TensorRT path, proved on a CUDA machine in one run (``scripts/gpu_check.sh``).

On the demo detector (ssdlite320_mobilenet_v3_large, 91 classes, spread-init seed 0: the one
``make demo`` serves) it:

1. exports the core ONNX and builds fp32, fp16 and int8 engines (int8 calibrated on the sample
   photographs of :mod:`detserve.runtime.samples`) with one shared timing cache;
2. verifies each engine against ONNX Runtime (:func:`converters.tensorrt_verify.verify_tensorrt`);
3. checks the torch post-processing on the GPU against the same on the CPU (same raw outputs);
4. builds the end-to-end variant (NMS inside the engine) and matches its detections with the split
   pipeline's (TensorRT fp32 core + torch post-processing) on the same images;
5. RT-DETR (transformers, small seeded configuration): fp32 engines of the grid-sample core
   (``rtdetr_tiny``) and of RT-DETRv2's discrete-sampling core (``rtdetr_v2_tiny``, no GridSample),
   each verified against ONNX Runtime up to the engine's largest batch; the verdict, the GridSample
   count and a refusal's message are recorded (a GridSample engine TensorRT gets wrong, NVIDIA/TensorRT
   #4813, must be refused; the discrete one must pass);
   two-stage: ``detserve build --target tensorrt`` of fasterrcnn_mobilenet_v3_large_320_fpn and
   maskrcnn_resnet50_fpn (320..512): an engine per core step, each verified per output (rcnn_engines);
6. benchmarks, at batch 1/8/32, images/s of: eager PyTorch (torchvision's full forward), the split
   pipeline in PyTorch (core + torch post-processing), the split pipeline with each TensorRT
   engine, and the end-to-end engine — all on the same GPU, inputs already on the GPU, after a
   warm-up, timed between ``torch.cuda.synchronize()`` calls.

Every step's result (or its error) is written to ``<out>/gpu_check.json`` as soon as it ends, so a
run cut short still leaves what it measured; steps that would not fit the time budget are skipped
and say so. Nothing is installed at run time.

A script, not part of the installed package: ``scripts/gpu_check.sh`` runs it from the repository
root (``python scripts/gpu_check.py --out DIR --budget-s S``) with the project importable.
"""

from __future__ import annotations

import argparse
import functools
import json
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

DETECTOR = "ssdlite320_mobilenet_v3_large"
NUM_CLASSES = 91
SEED = 0
MAX_BATCH = 32
BENCH_BATCHES = (1, 8, 32)
PRECISIONS = ("fp32", "fp16", "int8")
BENCH_RESERVE_S = 60.0  # kept free for the benchmark when deciding whether a build still fits


@dataclass
class Run:
    """Results so far, the time budget, and the objects later steps share."""

    out: Path
    budget_s: float
    results: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)
    state: dict[str, Any] = field(default_factory=dict)

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.started)

    def save(self) -> None:
        self.results["elapsed_s"] = round(time.monotonic() - self.started, 1)
        (self.out / "gpu_check.json").write_text(json.dumps(self.results, indent=2, default=str) + "\n")

    def step(self, name: str, fn: Callable[[Run], Any], needs_s: float = 0.0) -> Any:
        """Run one step unless the budget is short; record its result or error; never raise."""
        if self.left() < needs_s:
            self.results[name] = {"skipped": f"needs ~{needs_s:.0f} s, {self.left():.0f} s left"}
            self.save()
            return None
        t = time.monotonic()
        print(f"[gpu_check] {name} ...", flush=True)
        try:
            value = fn(self)
            self.results[name] = {"ok": True, "seconds": round(time.monotonic() - t, 1), "result": value}
        except Exception as e:
            value = None
            self.results[name] = {"ok": False, "seconds": round(time.monotonic() - t, 1), "error": f"{type(e).__name__}: {e}"}
            self.results[name]["traceback"] = traceback.format_exc(limit=8)
        print(f"[gpu_check] {name}: {'ok' if self.results[name].get('ok') else 'FAILED'}", flush=True)
        self.save()
        return value


def environment(run: Run) -> dict[str, Any]:
    import torch

    from converters.tensorrt_env import import_tensorrt, require_cuda_gpu

    trt = import_tensorrt()
    gpu = require_cuda_gpu()
    return {"tensorrt": trt.__version__, "torch": torch.__version__, "torch_cuda": torch.version.cuda, "gpu": asdict(gpu)}


def prepare(run: Run) -> dict[str, Any]:
    """The demo detector, its specs, its core ONNX, and the sample photographs preprocessed as served."""
    import torch

    from converters.onnx_export import export_core
    from detserve.families import family_for_detector
    from detserve.runtime.imaging import decode_image
    from detserve.runtime.preprocess import preprocess
    from detserve.runtime.samples import write_samples

    family = family_for_detector(DETECTOR)
    model = family.build(DETECTOR, NUM_CLASSES, None, {}, SEED)
    pre = family.preprocess_spec(model)
    post = family.decode_spec(model, pre)
    outputs = list(family.outputs(post))
    work = run.out / "work"
    onnx_path = export_core(family.core(model, post), outputs, pre, work / "model.onnx", sample_hw=pre.trace_hw)
    photos = write_samples(work / "samples")
    items = [preprocess(decode_image(p.read_bytes(), 1 << 31), pre) for p in photos]
    run.state.update(
        model=model, family=family, outputs=outputs, pre=pre, post=post, onnx=onnx_path, photos=work / "samples", items=items
    )
    run.state["images"] = torch.stack([it.tensor for it in items])
    return {"onnx": str(onnx_path), "photos": [p.name for p in photos], "input_hw": list(items[0].padded_hw)}


def _cycle(tensor: Any, n: int) -> Any:
    """n images by cycling the samples (benchmark and verification batches of any size)."""
    import torch

    return tensor[torch.arange(n) % tensor.shape[0]].contiguous()


def _hw_info(run: Run, n: int) -> tuple[Any, Any]:
    import torch

    items = run.state["items"]
    resized = torch.tensor([items[i % len(items)].resized_hw for i in range(n)])
    original = torch.tensor([items[i % len(items)].original_hw for i in range(n)])
    return resized, original


def build_and_verify(precision: str) -> Callable[[Run], dict[str, Any]]:
    def step(run: Run) -> dict[str, Any]:
        from converters.tensorrt_build import BuildOptions, build_engine
        from converters.tensorrt_verify import verify_tensorrt

        plan = run.out / "work" / f"model_{precision}.plan"
        opts = BuildOptions(
            precision=precision,
            timing_cache=run.out / "work" / ".trt_timing_cache",
            calibration_images=run.state["photos"] if precision == "int8" else None,
        )
        meta = build_engine(run.state["onnx"], plan, run.state["pre"], MAX_BATCH, opts)
        images = run.state["images"]
        batches = [images[i : i + 1] for i in range(images.shape[0])] + [_cycle(images, 8)]
        verification = verify_tensorrt(run.state["onnx"], plan, batches, precision, run.state["outputs"])
        run.state[f"plan_{precision}"] = plan
        return {"engine": meta.to_dict(), "verification": verification.to_dict(), "summary": verification.summary()}

    return step


def _controls(run: Run, n: int) -> list[Any]:
    from detserve.specs import RequestControls

    post = run.state["post"]
    return [RequestControls(post.score_thresh, post.nms_thresh, post.detections_per_img)] * n


def _postprocess(run: Run, raw: dict[str, Any], n: int) -> list[dict[str, Any]]:
    from detserve.families.torchvision.decode import postprocess_batch

    resized, original = _hw_info(run, n)
    pre = run.state["pre"]
    return postprocess_batch(run.state["post"], raw, pre.fixed_input_hw, resized, original, _controls(run, n))


def _parity(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> dict[str, Any]:
    """check_parity per image (detections >= 0.05 matched by IoU >= 0.99, |dscore| <= 1e-3)."""
    from detserve.verification.matching import check_parity

    def arrays(d: dict[str, Any]) -> tuple[Any, Any, Any]:
        return tuple(d[k].detach().cpu().numpy() for k in ("boxes", "scores", "labels"))  # type: ignore[return-value]

    checks = [check_parity(arrays(x), arrays(y)) for x, y in zip(a, b, strict=True)]
    return {
        "ok": all(c.ok for c in checks),
        "images": len(checks),
        "detections_above_0.05": sum(c.total for c in checks),
        "matched": sum(c.matched for c in checks),
        "max_score_delta": max(c.max_score_delta for c in checks),
        "max_box_delta_px": max(c.max_box_delta for c in checks),
        "min_iou": min(c.min_iou for c in checks),
        "failures": [f for c in checks for f in c.failures][:20],
    }


def postprocess_gpu_vs_cpu(run: Run) -> dict[str, Any]:
    """The served post-processing on the GPU (postprocess_on_gpu) against the CPU path, same raw outputs."""
    import torch

    from converters.tensorrt_runtime import TrtEngine

    engine = TrtEngine(run.state["plan_fp32"])
    images = run.state["images"].cuda()
    raw_gpu = {k: v.float() for k, v in engine(images).items()}
    gpu = _postprocess(run, raw_gpu, images.shape[0])
    cpu = _postprocess(run, {k: v.cpu() for k, v in raw_gpu.items()}, images.shape[0])
    torch.cuda.synchronize()
    return _parity(cpu, gpu)


def end_to_end_nms(run: Run) -> dict[str, Any]:
    """The NMS-in-engine variant against the split pipeline (TensorRT fp32 core + torch post-processing)."""
    from converters.tensorrt_nms import build_nms_engine, to_original
    from converters.tensorrt_runtime import TrtEngine

    plan = run.out / "work" / "model_e2e_fp32.plan"
    meta = build_nms_engine(
        run.state["onnx"], plan, run.state["pre"], run.state["post"], MAX_BATCH, "fp32", run.out / "work" / ".trt_timing_cache"
    )
    run.state["plan_e2e"] = plan
    images = run.state["images"].cuda()
    split = _postprocess(run, TrtEngine(run.state["plan_fp32"])(images), images.shape[0])
    out = TrtEngine(plan)(images)
    items = run.state["items"]
    e2e = []
    for i, it in enumerate(items):
        k = int(out["num_detections"][i, 0])
        boxes = to_original(out["boxes"][i, :k], it.resized_hw, it.original_hw)
        e2e.append({"boxes": boxes, "scores": out["scores"][i, :k], "labels": out["labels"][i, :k]})
    counts = {"split": [len(d["scores"]) for d in split], "end_to_end": [len(d["scores"]) for d in e2e]}
    return {"engine": meta.to_dict(), "parity": _parity(split, e2e), "detections_per_image": counts}


def _throughput(fn: Callable[[], Any], batch: int, min_seconds: float = 1.5, warmup: int = 5) -> dict[str, float]:
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    iterations, started = 0, time.perf_counter()
    while True:
        fn()
        iterations += 1
        if iterations % 5 == 0:
            torch.cuda.synchronize()
            if time.perf_counter() - started >= min_seconds:
                break
    elapsed = time.perf_counter() - started
    return {"images_per_s": round(batch * iterations / elapsed, 1), "ms_per_batch": round(1000 * elapsed / iterations, 3)}


def _pipelines(run: Run, batch: int) -> dict[str, Callable[[], Any]]:
    import torch

    from converters.tensorrt_runtime import TrtEngine
    from detserve.runtime.preprocess import normalize

    pre = run.state["pre"]
    model = run.state["model"].cuda().eval()
    images = _cycle(run.state["images"], batch).cuda()
    std = torch.tensor(pre.image_std, device="cuda")[:, None, None]
    mean = torch.tensor(pre.image_mean, device="cuda")[:, None, None]
    pixels = list(images * std + mean)  # back to 0..1: the eager model normalises itself
    assert torch.allclose(normalize(pixels[0], pre), images[0], atol=1e-5)
    core = run.state["family"].core(model, run.state["post"])
    out: dict[str, Callable[[], Any]] = {
        "eager_pytorch": lambda: model(pixels),
        "split_pytorch": lambda: _postprocess(run, dict(zip(core.output_names, core(images), strict=True)), batch),
    }
    for precision in PRECISIONS:
        if f"plan_{precision}" in run.state:
            out[f"split_tensorrt_{precision}"] = _split_tensorrt(run, TrtEngine(run.state[f"plan_{precision}"]), images)
    if "plan_e2e" in run.state:
        out["end_to_end_tensorrt_fp32"] = functools.partial(TrtEngine(run.state["plan_e2e"]), images)
    return out


def _split_tensorrt(run: Run, engine: Any, images: Any) -> Callable[[], Any]:
    """TensorRT core + torch post-processing on the GPU: what the ensemble runs with postprocess_on_gpu."""

    def call() -> Any:
        return _postprocess(run, {k: v.float() for k, v in engine(images).items()}, int(images.shape[0]))

    return call


RTDETR_CASES = ("rtdetr_tiny", "rtdetr_v2_tiny")  # grid-sample core, discrete-sampling core
RTDETR_MAX_BATCH = 8


def rtdetr_engines(run: Run) -> dict[str, Any]:
    """fp32 engines of the two RT-DETR cores, verified; a refused GridSample engine is the check working."""
    from converters.onnx_export import export_core
    from converters.tensorrt_build import BuildOptions, build_engine
    from converters.tensorrt_verify import grid_sample_nodes, verify_engine
    from detserve.errors import VerificationError
    from detserve.families import family_for_detector
    from detserve.runtime.imaging import decode_image
    from detserve.runtime.preprocess import preprocess

    out: dict[str, Any] = {}
    for detector in RTDETR_CASES:
        family = family_for_detector(detector)
        model = family.build(detector, 80, None, {}, SEED)
        pre = family.preprocess_spec(model)
        post = family.decode_spec(model, pre)
        outputs = list(family.outputs(post))
        work = run.out / "work" / detector
        onnx_path = export_core(family.core(model, post), outputs, pre, work / "model.onnx", sample_hw=pre.trace_hw)
        photos = sorted((run.out / "work" / "samples").iterdir())
        items = [preprocess(decode_image(p.read_bytes(), 1 << 31), pre) for p in photos[:3]]
        plan = work / "model.plan"
        opts = BuildOptions(precision="fp32", timing_cache=run.out / "work" / ".trt_timing_cache")
        build_engine(onnx_path, plan, pre, RTDETR_MAX_BATCH, opts)
        case: dict[str, Any] = {"grid_sample_nodes": grid_sample_nodes(onnx_path)}
        try:
            # the build's own check: a top-k core is judged by its decoded detections, not its raw slots
            case["verification"] = verify_engine(family, post, onnx_path, plan, items, "fp32", outputs)
            case["verdict"] = "accepted"
        except VerificationError as e:
            case["verdict"] = f"refused: {e.message}"
            if case["grid_sample_nodes"] == 0:  # the discrete core has no known TensorRT issue: a real failure
                raise
        out[detector] = case
    return out


# two-stage detectors (R-CNN): every core step an engine (FPN maps + proposals/boxes as inputs, RoIAlign through
# the parser's ROIAlign_TRT plugin), verified per output; Mask R-CNN at a reduced size to fit the budget
RCNN_CASES: tuple[tuple[str, dict[str, Any]], ...] = (
    ("fasterrcnn_mobilenet_v3_large_320_fpn", {}),
    ("maskrcnn_resnet50_fpn", {"min_size": 320, "max_size": 512}),
)
RCNN_MAX_BATCH = 4


def rcnn_engines(run: Run) -> dict[str, Any]:
    """detserve build --target tensorrt of a Faster R-CNN and a Mask R-CNN: an fp32 engine per core step
    (core, roi_core, mask_core), each verified against ONNX Runtime on the inputs the chain really gives it."""
    from converters.repository import BuildRequest, build_repository
    from detserve.tritonconfig import ServingOptions

    out: dict[str, Any] = {}
    for detector, kwargs in RCNN_CASES:
        req = BuildRequest(
            detector, run.out / "work" / "rcnn_repo", num_classes=NUM_CLASSES, target="tensorrt", model_kwargs=dict(kwargs),
            spread_init_seed=SEED, options=ServingOptions(max_batch_size=RCNN_MAX_BATCH),
            timing_cache=run.out / "work" / ".trt_timing_cache",
        )  # fmt: skip
        t = time.monotonic()
        record = build_repository(req).record
        checks = record["verification"]
        out[detector] = {
            "seconds": round(time.monotonic() - t, 1),
            "ok": checks["ok"],
            "engines": {
                role: {"build_seconds": e["build_seconds"], "profiles": e["profiles"], "roi_align": e["extra"]["roi_align"]}
                for role, e in record["tensorrt"].items()
            },
            "verification": {k: v for k, v in checks.items() if k.startswith("tensorrt_")},
        }
    return out


def benchmark(run: Run) -> dict[str, Any]:
    """images/s per pipeline and batch size, on inputs already on the GPU (decode/preprocess excluded)."""
    import torch

    results: dict[str, Any] = {}
    with torch.inference_mode():
        for batch in BENCH_BATCHES:
            results[str(batch)] = {name: _throughput(fn, batch) for name, fn in _pipelines(run, batch).items()}
            run.results["benchmark_partial"] = results
            run.save()
    run.results.pop("benchmark_partial", None)
    return {
        "note": "inputs on the GPU; eager PyTorch includes torchvision's transform (normalise, resize 320->320); "
        "split pipelines start from the normalised batch (the preprocess model's output)",
        "images_per_s": results,
    }


def run_checks(out: Path, budget_s: float = 480.0) -> dict[str, Any]:
    """Every step in order of importance; builds are skipped before the benchmark loses its time."""
    out.mkdir(parents=True, exist_ok=True)
    run = Run(out, budget_s)
    if run.step("environment", environment) is None:
        return run.results
    if run.step("prepare", prepare, needs_s=30) is None:
        return run.results
    run.step("build_verify_fp32", build_and_verify("fp32"), needs_s=60 + BENCH_RESERVE_S)
    if "plan_fp32" in run.state:
        run.step("postprocess_gpu_vs_cpu", postprocess_gpu_vs_cpu, needs_s=10 + BENCH_RESERVE_S)
    run.step("build_verify_fp16", build_and_verify("fp16"), needs_s=90 + BENCH_RESERVE_S)
    if "plan_fp32" in run.state:
        run.step("end_to_end_nms", end_to_end_nms, needs_s=60 + BENCH_RESERVE_S)
    run.step("build_verify_int8", build_and_verify("int8"), needs_s=120 + BENCH_RESERVE_S)
    run.step("rtdetr_engines", rtdetr_engines, needs_s=60 + BENCH_RESERVE_S)
    run.step("rcnn_engines", rcnn_engines, needs_s=150 + BENCH_RESERVE_S)
    run.step("benchmark", benchmark, needs_s=30)
    return run.results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out/gpu_check"))
    parser.add_argument("--budget-s", type=float, default=480.0, help="skip steps that would not fit in this many seconds")
    args = parser.parse_args()
    results = run_checks(args.out, args.budget_s)
    failed = [k for k, v in results.items() if isinstance(v, dict) and v.get("ok") is False]
    print(f"[gpu_check] results: {args.out / 'gpu_check.json'}; failed steps: {', '.join(failed) or 'none'}")
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
