"""CPU milliseconds per composing model, per family: preprocess, then each declared step.

In process and side by side in one run (the machines are noisy: compare rows of one table, not
tables of different runs). Each detector is built the way ``detserve build`` builds it (seeded
weights with a score spread: decode cost depends on how many candidates pass the threshold), its
cores exported to temporary ONNX files, and each step timed on the sample photographs, batch 1:
one tool for every family (``Family.steps``). A single-stage family's steps are its three stages
(preprocess, core, decode = the post-processing step); a two-stage family gets a row per composing
model in a table of its own.
"""

from __future__ import annotations

import functools
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from detserve.errors import SpecError

STAGES = ("preprocess", "core", "postprocess")  # the steps of a single-stage family, in the table's columns
# (detector, model keywords): the families' test sizes and the CPU-friendly defaults
DEFAULT_DETECTORS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("ssdlite320_mobilenet_v3_large", {}),
    ("retinanet_resnet50_fpn_v2", {"min_size": 256, "max_size": 320}),
    ("fcos_resnet50_fpn", {"min_size": 256, "max_size": 320}),
    ("yolov8n", {"imgsz": 640}),
    ("yolo11n", {"imgsz": 640}),
    ("fasterrcnn_mobilenet_v3_large_320_fpn", {}),
    ("maskrcnn_resnet50_fpn", {"min_size": 256, "max_size": 320}),
)


@dataclass(frozen=True)
class StageTiming:
    detector: str
    family: str
    input_hw: tuple[int, int]
    preprocess_ms: float
    core_ms: float
    decode_ms: float
    detections: float  # mean per image at the model's default threshold

    def row(self) -> str:
        h, w = self.input_hw
        return (
            f"| {self.detector} | {self.family} | {h}x{w} | {self.preprocess_ms:.1f} | {self.core_ms:.1f} | "
            f"{self.decode_ms:.1f} | {self.detections:.0f} |"
        )


@dataclass(frozen=True)
class StepTiming:
    detector: str
    family: str
    input_hw: tuple[int, int]
    ms: dict[str, float]  # role -> mean ms per image ("preprocess" first, then the declared steps)
    detections: float

    def row(self) -> str:
        h, w = self.input_hw
        steps = " ".join(f"{role} {ms:.1f}" for role, ms in self.ms.items())
        return f"| {self.detector} | {h}x{w} | {steps} | {sum(self.ms.values()):.1f} | {self.detections:.0f} |"


def _median_ms(fn: Callable[[], Any], repeat: int, best: bool = False) -> float:
    """Median of ``repeat`` timed calls after a warm-up (``best``: the minimum, robust on a shared machine)."""
    fn()  # warm
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return min(times) if best else statistics.median(times)


@dataclass(frozen=True)
class _Served:
    """A detector built the way ``detserve build`` builds it, with what its steps are run with."""

    fam: Any
    model: Any
    pre: Any  # the family's preprocessing spec
    spec: Any  # its decode spec
    steps: list[Any]  # the declared steps, in order
    controls: list[Any]  # one request's RequestControls: the model's defaults

    @property
    def single_stage(self) -> bool:
        from detserve.families.base import is_single_stage

        return is_single_stage(self.steps)


def _build_served(detector: str, model_kwargs: dict[str, Any]) -> _Served:
    from detserve.families import family_for_detector
    from detserve.specs import RequestControls

    fam = family_for_detector(detector)
    # seed 0: the seeded weights with a score spread `detserve build` writes (decode cost follows the candidate count)
    model = fam.build(detector, fam.default_num_classes(None), None, dict(model_kwargs), 0)
    pre = fam.preprocess_spec(model)
    spec = fam.decode_spec(model, pre)
    controls = [RequestControls(spec.score_thresh, spec.nms_thresh, spec.detections_per_img)]
    return _Served(fam, model, pre, spec, list(fam.steps(spec)), controls)


def time_steps(
    detector: str,
    model_kwargs: dict[str, Any],
    blobs: Sequence[bytes],
    repeat: int = 3,
    best: bool = False,
    torch_threads: int | None = None,
) -> StepTiming:
    """Median (``best``: minimum) ms per image of each composing model of ``detector``'s pipeline, as served:
    the generic preprocessing, every core in ONNX Runtime with one intra-op thread, every torch step
    through the family's ``run_step``, on the sample photographs, batch 1 (mean over the photos).

    A single-stage family's core is exported as the build exports it (converters.onnx_export.export_core:
    its trace size, a fixed input size kept fixed); the cores of a multi-core family on the inputs the chain
    gives them. ``torch_threads`` sets torch's intra-op threads: on a machine whose cores other processes
    hold, two threads can wait on each other far longer than the work takes.
    """
    import torch

    from converters.multistep import run_chain
    from detserve.runtime.imaging import decode_image
    from detserve.runtime.preprocess import preprocess

    if torch_threads:
        torch.set_num_threads(torch_threads)
    served = _build_served(detector, model_kwargs)
    per_role: dict[str, list[float]] = {"preprocess": [], **{s.role: [] for s in served.steps}}
    counts: list[int] = []
    with tempfile.TemporaryDirectory() as tmp:
        sessions: dict[str, Any] = {}  # role -> ONNX Runtime session, exported on the first image
        for rgb in (decode_image(b, served.pre.max_image_pixels) for b in blobs):
            item = preprocess(rgb, served.pre)
            per_role["preprocess"].append(_median_ms(functools.partial(preprocess, rgb, served.pre), repeat, best))
            info = torch.from_numpy(item.info()[None])
            # every step's inputs for this image, as the served chain hands them on
            tensors, core_inputs = run_chain(served.fam, served.model, served.spec, item.tensor[None], info, served.controls)
            for step in served.steps:
                call = _step_call(served, step, tensors, info, core_inputs, sessions, Path(tmp))
                per_role[step.role].append(_median_ms(call, repeat, best))
            counts.append(int(tensors["num_detections"][0, 0]))
    return StepTiming(
        detector,
        served.fam.name,
        tuple(int(v) for v in item.padded_hw),  # type: ignore[arg-type]
        {role: statistics.mean(v) for role, v in per_role.items()},
        statistics.mean(counts),
    )


def _step_call(
    served: _Served,
    step: Any,
    tensors: dict[str, Any],
    info: Any,
    core_inputs: dict[str, Any],
    sessions: dict[str, Any],
    folder: Path,
) -> Callable[[], Any]:
    """One run of ``step`` on this image's inputs, as served: a core in ONNX Runtime (exported into ``folder``
    and its session kept in ``sessions`` on first use), any other step through the family's ``run_step``."""
    import numpy as np

    from detserve.runtime.onnxrt import cpu_session

    args = [tensors[t.name] for t in step.inputs]
    if step.kind == "core":
        if step.role not in sessions:
            sample = core_inputs[step.role]
            path = _export(served.fam, served.model, served.spec, served.pre, step, sample, folder, served.single_stage)
            sessions[step.role] = cpu_session(path, 1, False)
        feed = {t.name: np.ascontiguousarray(a.numpy()) for t, a in zip(step.inputs, args, strict=True)}
        return functools.partial(sessions[step.role].run, None, feed)
    raw = {t.name: a for t, a in zip(step.inputs, args, strict=True) if t.name != "image_info"}
    return functools.partial(served.fam.run_step, served.spec, step.role, raw, info, served.controls)


def _export(fam: Any, model: Any, spec: Any, pre: Any, step: Any, sample: Sequence[Any], folder: Path, single: bool) -> Path:
    from converters.multistep import export_step
    from converters.onnx_export import export_core

    module = fam.step_module(model, spec, step.role)
    path = folder / f"{step.role}.onnx"
    if single:
        return export_core(module, step.outputs, pre, path, sample_hw=pre.trace_hw)
    return export_step(module, step, sample, path)


def time_detector(
    detector: str,
    model_kwargs: dict[str, Any],
    blobs: Sequence[bytes],
    repeat: int = 5,
    best: bool = False,
    torch_threads: int | None = None,
) -> StageTiming:
    """``time_steps`` of a single-stage family, as its three stages (decode = its post-processing step)."""
    stages = as_stages(time_steps(detector, model_kwargs, blobs, repeat, best, torch_threads))
    if stages is None:
        raise SpecError(f"{detector} is served by more steps than preprocess/core/postprocess", hint="use time_steps")
    return stages


def as_stages(t: StepTiming) -> StageTiming | None:
    """A single-stage family's step timing as its three stages; None for a multi-step family."""
    if tuple(t.ms) != STAGES:
        return None
    pre, core, post = (t.ms[r] for r in STAGES)
    return StageTiming(t.detector, t.family, t.input_hw, pre, core, post, t.detections)


def stage_table(
    detectors: Sequence[tuple[str, dict[str, Any]]] = DEFAULT_DETECTORS,
    echo: Callable[[str], None] = lambda _: None,
    repeat: int = 5,
    best: bool = False,
    torch_threads: int | None = None,
) -> str:
    """A markdown table of ``time_detector`` for each detector, measured one after the other in this run."""
    from detserve.runtime.samples import sample_files

    blobs = list(sample_files().values())
    lines = [
        "| detector | family | input | preprocess ms | core ms (ORT, 1 thread) | decode ms | detections/image |",
        "|---|---|---|---|---|---|---|",
    ]
    multistep: list[StepTiming] = []  # two-stage: a row per composing model, in a table of their own
    for detector, kwargs in detectors:
        echo(f"timing {detector} ...")
        t = time_steps(detector, kwargs, blobs, repeat, best, torch_threads)
        stages = as_stages(t)
        if stages is None:
            multistep.append(t)
        else:
            lines.append(stages.row())
    if multistep:
        lines += [
            "",
            "| detector (multi-step) | input | ms per composing model, batch 1 | total ms | detections/image |",
            "|---|---|---|---|---|",
            *(t.row() for t in multistep),
        ]
    return "\n".join(lines)
