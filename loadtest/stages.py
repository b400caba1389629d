"""CPU milliseconds per pipeline stage, per family: preprocess, core (ONNX Runtime), decode.

In process and side by side in one run (the machines are noisy: compare rows of one table, not
tables of different runs). Each detector is built the way ``detserve build`` builds it (seeded
weights with a score spread: decode cost depends on how many candidates pass the threshold), its
core exported to a temporary ONNX file, and each stage timed on the sample photographs, batch 1.
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


def _median_ms(fn: Callable[[], Any], repeat: int, best: bool = False) -> float:
    """Median of ``repeat`` timed calls after a warm-up (``best``: the minimum, robust on a shared machine)."""
    fn()  # warm
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return min(times) if best else statistics.median(times)


def time_detector(
    detector: str,
    model_kwargs: dict[str, Any],
    blobs: Sequence[bytes],
    repeat: int = 5,
    best: bool = False,
    torch_threads: int | None = None,
) -> StageTiming:
    """Median (``best``: minimum) ms per image of each stage for one detector (ONNX Runtime with 1 intra-op thread, as served).

    ``torch_threads`` sets torch's intra-op threads for preprocess/decode: on a machine whose cores
    other processes hold, two threads can wait on each other far longer than the work takes.
    """
    import torch

    if torch_threads:
        torch.set_num_threads(torch_threads)

    from converters.onnx_export import export_core
    from detserve.families import family_for_detector
    from detserve.runtime.imaging import decode_image
    from detserve.runtime.onnxrt import cpu_session
    from detserve.runtime.preprocess import preprocess
    from detserve.specs import RequestControls

    fam = family_for_detector(detector)
    model = fam.build(detector, fam.default_num_classes(None), None, dict(model_kwargs), 0)
    pre = fam.preprocess_spec(model)
    spec = fam.decode_spec(model, pre)
    outputs = list(fam.outputs(spec))
    with tempfile.TemporaryDirectory() as tmp:
        onnx = export_core(fam.core(model, spec), outputs, pre, Path(tmp) / "model.onnx", sample_hw=pre.trace_hw)
        session = cpu_session(onnx, 1, False)
        rgbs = [decode_image(b, pre.max_image_pixels) for b in blobs]
        controls = [RequestControls(spec.score_thresh, spec.nms_thresh, spec.detections_per_img)]
        pre_ms: list[float] = []
        core_ms: list[float] = []
        dec_ms: list[float] = []
        counts: list[int] = []
        for rgb in rgbs:
            item = preprocess(rgb, pre)
            pre_ms.append(_median_ms(functools.partial(preprocess, rgb, pre), repeat, best))
            batch = item.tensor[None].numpy()
            core_ms.append(_median_ms(functools.partial(session.run, None, {"images": batch}), repeat, best))
            raw = {o.name: torch.from_numpy(a) for o, a in zip(outputs, session.run(None, {"images": batch}), strict=True)}
            resized, original = torch.tensor([item.resized_hw]), torch.tensor([item.original_hw])

            def decode(raw: dict[str, Any] = raw, item: Any = item, r: Any = resized, o: Any = original) -> Any:
                return fam.decode(spec, raw, item.padded_hw, r, o, controls)

            dec_ms.append(_median_ms(decode, repeat, best))
            counts.append(len(decode()[0]["scores"]))
    return StageTiming(
        detector,
        fam.name,
        tuple(int(v) for v in item.padded_hw),  # type: ignore[arg-type]
        statistics.mean(pre_ms),
        statistics.mean(core_ms),
        statistics.mean(dec_ms),
        statistics.mean(counts),
    )


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
    from loadtest.stage_steps import is_multistep, step_table

    multistep = [(d, kw) for d, kw in detectors if is_multistep(d)]  # two-stage: a row per composing model
    for detector, kwargs in detectors:
        if (detector, kwargs) in multistep:
            continue
        echo(f"timing {detector} ...")
        lines.append(time_detector(detector, kwargs, blobs, repeat, best, torch_threads).row())
    if multistep:
        lines += ["", step_table(multistep, blobs, echo)]
    return "\n".join(lines)
