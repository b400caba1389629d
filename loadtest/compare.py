"""``detserve compare``: the detection-level diff between every way one model is run.

Sides: eager PyTorch (the reference), ONNX Runtime in this process (the served ONNX and the served
pre/post-processing code, no server), the live endpoint, and TensorRT where the version has an engine
and this machine a GPU. Detections are matched order-free (same label, greedy by score, IoU ≥ 0.5)
and counted per score band, because conversion is never lossless: high-score boxes must agree,
low-score boxes may flip, and the report shows how many did.

Also: the core's raw-tensor error (max abs / rel against PyTorch), judged as the build judges it: per
tensor, ``|diff| <= atol * max(1, max|ref|) + rtol * |ref|``, where every output slot is fixed; where the
core picks its slots by a top-k (``Family.core_selects``: RT-DETR, D-FINE) near-ties reorder the slots
between runtimes, so those figures are information and the detection comparison decides. And the
batch-position check — the same image at other positions and beside other images must give the same
detections.

It lives in the tools layer (converters, loadtest, training), not in ``detserve.verification``: it
exports and checks cores (``converters.onnx_export``, ``converters.multistep``) and runs TensorRT
engines (``converters.tensorrt_*``), which the verification layer below may not import. Within that
layer it sits in ``loadtest``, beside the in-process pipeline it runs (``loadtest.inprocess``):
loadtest imports converters, so compare in ``converters`` would close a converters <-> loadtest cycle.
``detserve compare`` calls :func:`run_compare` and :func:`write_report`.
"""

from __future__ import annotations

import html
import json
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from detserve.verification.matching import match_detections

Det = dict[str, np.ndarray]  # boxes [K, 4], scores [K], labels [K]

BANDS: tuple[tuple[str, float, float], ...] = (
    ("≥0.5", 0.5, math.inf),
    ("0.2–0.5", 0.2, 0.5),
    ("0.05–0.2", 0.05, 0.2),
    ("<0.05", 0.0, 0.05),
)


@dataclass
class BandStats:
    band: str
    reference: int = 0  # reference detections in the band
    matched: int = 0
    missing: int = 0  # reference detections with no partner
    extra: int = 0  # other side's detections (in the band by their own score) with no partner
    moved: int = 0  # matched, but IoU below the agreement threshold
    max_box_delta: float = 0.0  # pixels, over matched pairs
    max_score_delta: float = 0.0
    min_iou: float = 1.0


@dataclass
class SideComparison:
    side: str
    bands: list[BandStats]
    images: int

    def band(self, name: str) -> BandStats:
        return next(b for b in self.bands if b.band == name)


def _band_of(score: float) -> int:
    for k, (_, lo, hi) in enumerate(BANDS):
        if lo <= score < hi:
            return k
    return len(BANDS) - 1  # negative scores cannot happen; keep them in the lowest band


def compare_side(side: str, reference: Sequence[Det], other: Sequence[Det], agree_iou: float = 0.9) -> SideComparison:
    """Per-band counts of ``other`` against ``reference``, image by image (lists in the same image order)."""
    if len(reference) != len(other):
        raise ValueError(f"{side}: {len(other)} results for {len(reference)} images")
    bands = [BandStats(name) for name, _, _ in BANDS]
    for ref, got in zip(reference, other, strict=True):
        m = match_detections(ref["boxes"], ref["scores"], ref["labels"], got["boxes"], got["scores"], got["labels"], iou_min=0.5)
        for s in ref["scores"]:
            bands[_band_of(float(s))].reference += 1
        for (i, _j), iou, ds, db in zip(m.pairs, m.ious, m.score_deltas, m.box_deltas, strict=True):
            b = bands[_band_of(float(ref["scores"][i]))]
            b.matched += 1
            b.moved += int(iou < agree_iou)
            b.max_box_delta = max(b.max_box_delta, db)
            b.max_score_delta = max(b.max_score_delta, ds)
            b.min_iou = min(b.min_iou, iou)
        for i in m.unmatched_a:
            bands[_band_of(float(ref["scores"][i]))].missing += 1
        for j in m.unmatched_b:
            bands[_band_of(float(got["scores"][j]))].extra += 1
    return SideComparison(side, bands, len(reference))


def high_score_disagreements(cmp: SideComparison, score_tol: float) -> list[str]:
    """What makes compare fail: a ≥0.5 detection missing, extra, moved, or its score off by more than ``score_tol``."""
    b = cmp.bands[0]
    problems = []
    if b.missing:
        problems.append(f"{cmp.side}: {b.missing} high-score reference detection(s) missing")
    if b.extra:
        problems.append(f"{cmp.side}: {b.extra} extra high-score detection(s)")
    if b.moved:
        problems.append(f"{cmp.side}: {b.moved} high-score detection(s) moved (IoU below the agreement threshold)")
    if b.max_score_delta > score_tol:
        problems.append(f"{cmp.side}: high-score |Δscore| {b.max_score_delta:.2e} > {score_tol:g}")
    return problems


@dataclass
class PositionCheck:
    side: str
    how: str
    images: int
    trials: int  # results compared against the image's own single result
    identical: int
    max_box_delta: float
    max_score_delta: float

    @property
    def ok(self) -> bool:
        return self.identical == self.trials


def _canonical(det: Det) -> Det:
    """Rows sorted by score (descending), then label and box: equal sets compare equal in any order (ties included)."""
    b = det["boxes"]
    order = np.lexsort((b[:, 3], b[:, 2], b[:, 1], b[:, 0], det["labels"], -det["scores"])) if len(b) else np.arange(0)
    return {k: v[order] for k, v in det.items()}


def position_check(side: str, how: str, singles: Sequence[Det], trials: Sequence[tuple[int, Det]]) -> PositionCheck:
    """``trials``: (image index, result when batched differently); each must equal the single result exactly
    (as a set: detections of tied score may come back in another order)."""
    identical, max_box, max_score = 0, 0.0, 0.0
    for idx, got in trials:
        ref, det = _canonical(singles[idx]), _canonical(got)
        if len(det["scores"]) == len(ref["scores"]) and np.array_equal(det["labels"], ref["labels"]):
            max_box = max(max_box, float(np.abs(det["boxes"] - ref["boxes"]).max(initial=0.0)))
            max_score = max(max_score, float(np.abs(det["scores"] - ref["scores"]).max(initial=0.0)))
            identical += int(np.array_equal(det["boxes"], ref["boxes"]) and np.array_equal(det["scores"], ref["scores"]))
        else:
            max_box = math.inf
    return PositionCheck(side, how, len(singles), len(trials), identical, max_box, max_score)


@dataclass
class CompareReport:
    model: str
    version: int
    images: list[str]
    score_threshold: float
    sides: list[SideComparison] = field(default_factory=list)
    raw: list[dict[str, Any]] = field(default_factory=list)  # per backend: per-output max abs / rel (raw_record)
    positions: list[PositionCheck] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # side -> why not compared
    score_tol: float = 1e-3

    @property
    def problems(self) -> list[str]:
        out = [p for s in self.sides for p in high_score_disagreements(s, self.score_tol)]
        out += [p for r in self.raw for p in raw_disagreements(r)]
        out += [
            f"{p.side}: {p.trials - p.identical} of {p.trials} batch-position trials differ ({p.how})"
            for p in self.positions
            if not p.ok
        ]
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "version": self.version,
            "images": self.images,
            "score_threshold": self.score_threshold,
            "bands": [b[0] for b in BANDS],
            "sides": [{"side": s.side, "images": s.images, "bands": [asdict(b) for b in s.bands]} for s in self.sides],
            "raw_tensor_error": self.raw,
            "batch_position": [{**asdict(p), "ok": p.ok} for p in self.positions],
            "skipped": self.skipped,
            "score_tol": self.score_tol,
            "problems": self.problems,
            "ok": not self.problems,
        }

    def tables(self) -> list[tuple[str, list[str], list[list[str]]]]:
        """(title, header, rows) for markdown and HTML alike."""
        out = []
        head = ["side", "band", "reference", "matched", "missing", "extra", "moved", "max box Δ px", "max score Δ", "min IoU"]
        rows = [
            [s.side, b.band, str(b.reference), str(b.matched), str(b.missing), str(b.extra), str(b.moved),
             f"{b.max_box_delta:.2e}", f"{b.max_score_delta:.2e}", f"{b.min_iou:.5f}"]
            for s in self.sides for b in s.bands
        ]  # fmt: skip
        out.append(("Detections against eager PyTorch, per score band (reference's score; extra by their own)", head, rows))
        rows = [
            [r["backend"], o["name"], str(o["shape"]), f"{o['max_abs']:.2e}", f"{o['max_rel']:.2e}", f"{o.get('scale', 1.0):.3g}",
             _raw_verdict(r, o)]
            for r in self.raw for o in r["outputs"]
        ]  # fmt: skip
        head = ["backend", "output", "shape", "max abs", "max rel", "scale", "verdict"]
        out.append(("Core raw-tensor error against its reference", head, rows))
        rows = [
            [
                p.side,
                p.how,
                str(p.trials),
                str(p.identical),
                f"{p.max_box_delta:.2e}",
                f"{p.max_score_delta:.2e}",
                "yes" if p.ok else "NO",
            ]
            for p in self.positions
        ]
        out.append(
            (
                "Batch position (same image, other positions and neighbours)",
                ["side", "how", "trials", "identical", "max box Δ", "max score Δ", "ok"],
                rows,
            )
        )
        return out

    def markdown(self) -> str:
        lines = [
            f"# detserve compare: {self.model} v{self.version}",
            "",
            f"{len(self.images)} images, score threshold {self.score_threshold}; matched by label and IoU ≥ 0.5, greedy by score.",
            "",
        ]
        for title, head, rows in self.tables():
            lines += [f"## {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            lines += ["| " + " | ".join(r) + " |" for r in rows]
            lines.append("")
        for side, why in self.skipped.items():
            lines.append(f"- {side}: not compared ({why})")
        lines.append("")
        lines.append("**Result: " + ("agree** on every high-score detection." if not self.problems else "DISAGREE**:"))
        lines += [f"- {p}" for p in self.problems]
        return "\n".join(lines) + "\n"

    def html(self) -> str:
        e = html.escape
        parts = [
            "<!doctype html><meta charset='utf-8'><title>detserve compare</title>",
            "<style>body{font-family:sans-serif}table{border-collapse:collapse;margin-bottom:1em}"
            "td,th{border:1px solid #bbb;padding:2px 8px;text-align:right}.bad{color:#b00;font-weight:bold}</style>",
            f"<h1>detserve compare: {e(self.model)} v{self.version}</h1>",
            f"<p>{len(self.images)} images, score threshold {self.score_threshold}</p>",
        ]
        for title, head, rows in self.tables():
            parts.append(f"<h2>{e(title)}</h2><table><tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr>")
            parts += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in rows]
            parts.append("</table>")
        parts += [f"<p>{e(side)}: not compared ({e(why)})</p>" for side, why in self.skipped.items()]
        if self.problems:
            parts.append("<p class='bad'>DISAGREE</p><ul>" + "".join(f"<li>{e(p)}</li>" for p in self.problems) + "</ul>")
        else:
            parts.append("<p>Agree on every high-score detection.</p>")
        return "\n".join(parts) + "\n"


def write_report(report: CompareReport, out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "compare.json", "markdown": out / "compare.md", "html": out / "compare.html"}
    paths["json"].write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    paths["markdown"].write_text(report.markdown())
    paths["html"].write_text(report.html())
    return paths


def raw_record(result: Any, selects: bool) -> dict[str, Any]:
    """A raw-tensor comparison (``CoreVerification``) for the report, with how it counts: ``judged_by``
    "tensors" (fixed slots: beyond the scaled tolerance is a problem) or "detections" (the core picks its
    slots: the figures are information, the detection sides decide)."""
    return {**result.to_dict(), "judged_by": "detections" if selects else "tensors"}


def raw_disagreements(raw: dict[str, Any]) -> list[str]:
    """What makes compare fail on the raw line: an output of a fixed-slot core beyond its scaled tolerance."""
    if raw.get("judged_by") == "detections" or raw["ok"]:
        return []
    bad = [o for o in raw["outputs"] if o["worst_excess"] > 0]
    return [
        f"{raw['backend']}: raw tensors beyond tolerance: "
        + "; ".join(f"{o['name']} max abs {o['max_abs']:.2e} (scale {o.get('scale', 1.0):.3g})" for o in bad)
    ]


def _raw_verdict(raw: dict[str, Any], out: dict[str, Any]) -> str:
    if raw.get("judged_by") == "detections":
        return "information (slots chosen by top-k: detections decide)"
    return "ok" if out["worst_excess"] <= 0 else "BEYOND tolerance"


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
