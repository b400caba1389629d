"""CPU milliseconds per composing model of a multi-step (two-stage) pipeline, in process, batch 1.

The counterpart of ``loadtest.stages.time_detector`` for families that declare their steps
(``Family.steps``: R-CNN): the generic preprocessing, then each declared step as it is served --
every core exported to ONNX and run by ONNX Runtime with one intra-op thread, every torch step
through the family's ``run_step`` -- on the sample photographs, median of ``repeat`` runs per photo,
mean over the photos.
"""

from __future__ import annotations

import functools
import statistics
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loadtest.stages import _median_ms


@dataclass(frozen=True)
class StepTiming:
    detector: str
    input_hw: tuple[int, int]
    ms: dict[str, float]  # role -> mean ms per image ("preprocess" first, then the declared steps)
    detections: float

    def row(self) -> str:
        h, w = self.input_hw
        steps = " ".join(f"{role} {ms:.1f}" for role, ms in self.ms.items())
        return f"| {self.detector} | {h}x{w} | {steps} | {sum(self.ms.values()):.1f} | {self.detections:.0f} |"


def time_steps(detector: str, model_kwargs: dict[str, Any], blobs: Sequence[bytes], repeat: int = 3) -> StepTiming:
    """Median ms per image of each composing model of ``detector``'s pipeline."""
    import numpy as np
    import torch

    from converters.multistep import declared_steps, export_step, run_chain
    from detserve.families import family_for_detector
    from detserve.runtime.imaging import decode_image
    from detserve.runtime.onnxrt import cpu_session
    from detserve.runtime.preprocess import preprocess
    from detserve.specs import RequestControls

    fam: Any = family_for_detector(detector)  # a multi-step family (steps, step_module, run_step)
    model = fam.build(detector, fam.default_num_classes(None), None, dict(model_kwargs), 0)
    pre = fam.preprocess_spec(model)
    spec = fam.decode_spec(model, pre)
    steps = declared_steps(fam, spec) or []
    controls = [RequestControls(spec.score_thresh, spec.nms_thresh, spec.detections_per_img)]
    per_role: dict[str, list[float]] = {"preprocess": [], **{s.role: [] for s in steps}}
    counts: list[int] = []
    with tempfile.TemporaryDirectory() as tmp:
        sessions: dict[str, Any] = {}
        for rgb in (decode_image(b, pre.max_image_pixels) for b in blobs):
            item = preprocess(rgb, pre)
            per_role["preprocess"].append(_median_ms(functools.partial(preprocess, rgb, pre), repeat))
            info = torch.from_numpy(item.info()[None])
            tensors, core_inputs = run_chain(fam, model, spec, item.tensor[None], info, controls)
            for step in steps:
                args = [tensors[t.name] for t in step.inputs]
                if step.kind == "core":
                    if step.role not in sessions:
                        module = fam.step_module(model, spec, step.role)
                        path = export_step(module, step, core_inputs[step.role], Path(tmp) / f"{step.role}.onnx")
                        sessions[step.role] = cpu_session(path, 1, False)
                    feed = {t.name: np.ascontiguousarray(a.numpy()) for t, a in zip(step.inputs, args, strict=True)}
                    call: Callable[[], Any] = functools.partial(sessions[step.role].run, None, feed)
                else:
                    raw = {t.name: a for t, a in zip(step.inputs, args, strict=True) if t.name != "image_info"}
                    call = functools.partial(fam.run_step, spec, step.role, raw, info, controls)
                per_role[step.role].append(_median_ms(call, repeat))
            counts.append(int(tensors["num_detections"][0, 0]))
    return StepTiming(
        detector,
        tuple(int(v) for v in item.padded_hw),  # type: ignore[arg-type]
        {role: statistics.mean(v) for role, v in per_role.items()},
        statistics.mean(counts),
    )


def is_multistep(detector: str) -> bool:
    from detserve.families import family_for_detector

    return hasattr(family_for_detector(detector), "steps")


def step_table(detectors: Sequence[tuple[str, dict[str, Any]]], blobs: Sequence[bytes], echo: Callable[[str], None]) -> str:
    lines = [
        "| detector (multi-step) | input | ms per composing model, batch 1 | total ms | detections/image |",
        "|---|---|---|---|---|",
    ]
    for detector, kwargs in detectors:
        echo(f"timing {detector} (each composing model) ...")
        lines.append(time_steps(detector, kwargs, blobs).row())
    return "\n".join(lines)


def served_step_costs(url: str, model: str, blobs: Sequence[bytes], users: int, requests: int) -> dict[str, dict[str, float]]:
    """Each composing model's cost on the live server under ``users`` concurrent clients.

    ``requests`` single-image requests (the sample photographs in turn), at most ``users`` in flight;
    Triton's statistics difference per model gives compute ms per request, the batch size its
    batcher reached, and compute ms per image (a batch's time is counted once per request in it).
    """
    import tritonclient.grpc as grpcclient

    from clients.grpc_client import DetectorClient
    from detserve.ops.tritonstats import delta, snapshot

    stats = grpcclient.InferenceServerClient(url)
    try:
        with DetectorClient(url, model) as client:
            client.detect(blobs[0])  # warm every step
            before = snapshot(stats)
            images = [blobs[i % len(blobs)] for i in range(requests)]
            results = client.detect_many(images, max_in_flight=users)
            after = snapshot(stats)
    finally:
        stats.close()
    failed = [r for r in results if not hasattr(r, "scores")]
    if failed:
        raise RuntimeError(f"{len(failed)} of {requests} requests failed: {failed[0]}")
    out = {}
    for name, split in delta(before, after).items():
        if not name.startswith(f"{model}_") or not split.requests:
            continue
        out[name.removeprefix(f"{model}_")] = {
            "compute_ms_per_request": split.compute_ms,
            "avg_batch": split.avg_batch_size,
            "compute_ms_per_image": split.compute_ms / max(split.avg_batch_size, 1.0),
            "queue_ms": split.queue_ms,
        }
    return out
