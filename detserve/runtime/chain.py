"""A family's declared chain of steps, run as plain function calls in one process.

After the pre-processing, every step the family declares (``Family.steps``) runs in order on the
images of one canvas: a core through its own onnxruntime session, a torch step through the
family's ``run_step`` with the torch thread count its served model sets. What one step outputs
feeds the later steps by tensor name, cast to the dtype the step declares, as the python step
model casts what it sends. Two users: the fused CPU layout (runtime/backend/fused_model.py, one
stub serving the whole chain) and loadtest's in-process pipeline (the same chain with no server).

One call = images of ONE canvas (runtime/canvas.py): every image answers what it answers alone,
as in the ensemble, whose steps also group images by canvas. Rows of a torch step with per-image
lengths (R-CNN's detections before the mask core) are zero-padded to the longest within the call,
another output saying the count, as the python step model pads them within a request.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from detserve.families.base import StepDecl, stack_rows
from detserve.specs import RequestControls

IMAGES, IMAGE_INFO = "images", "image_info"  # what the pre-processing gives every chain

# Triton data type names a step declares -> the numpy dtype the served step sends
NUMPY_DTYPES = {"FP32": np.float32, "FP16": np.float16, "INT32": np.int32, "INT64": np.int64, "UINT8": np.uint8, "BOOL": np.bool_}


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """torch's intra-op thread count set to ``n`` for the block (None: left as it is), then restored.

    A resize's or a reduction's last bit follows the thread count: a step run with its served
    model's count gives that model's answer bit for bit."""
    import torch

    before = torch.get_num_threads()
    if n is not None and n != before:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


@dataclass(frozen=True)
class ChainOutput:
    """Every tensor of the chain (by name, batched over the call's images), and the last step's
    rows per image (each image's own contract: ``max_det`` rows of its request's controls)."""

    tensors: dict[str, np.ndarray]
    rows: list[dict[str, np.ndarray]]


@dataclass(frozen=True)
class StepChain:
    """``steps`` of a family whose decode spec is ``decode_spec``; ``sessions``: an onnxruntime
    session per core step (by role); ``threads``: torch threads per torch step (a role not named
    runs with the process's own setting)."""

    decode_spec: Any
    steps: Sequence[StepDecl]
    sessions: Mapping[str, Any]
    threads: Mapping[str, int]

    def __post_init__(self) -> None:
        from detserve.errors import SpecError

        cores = {s.role for s in self.steps if s.kind == "core"}
        if cores != set(self.sessions):
            raise SpecError(f"the chain's core steps {sorted(cores)} need one session each; given {sorted(self.sessions)}")

    def run(
        self,
        images: np.ndarray,
        info: np.ndarray,
        controls: Sequence[RequestControls],
        cpu_s: dict[str, float] | None = None,
    ) -> ChainOutput:
        """Run every step on ``images`` [n, 3, H, W] (one canvas) with ``info`` [n, 6] and one
        controls per image; ``cpu_s`` (by role) accumulates each step's CPU seconds where given."""
        from detserve.families import family_of_spec

        family = family_of_spec(self.decode_spec)
        tensors: dict[str, np.ndarray] = {IMAGES: images, IMAGE_INFO: info}
        rows: list[dict[str, np.ndarray]] | None = None
        for step in self.steps:
            t0 = time.process_time()
            if step.kind == "core":  # batched outputs as onnxruntime gives them: no copy per image
                feed = {t.name: np.ascontiguousarray(tensors[t.name]) for t in step.inputs}
                outs = self.sessions[step.role].run([t.name for t in step.outputs], feed)
                tensors.update({t.name: o for t, o in zip(step.outputs, outs, strict=True)})
                rows = None
            else:
                rows = self._torch(family, step, tensors, controls)
                tensors.update({t.name: stack_rows([r[t.name] for r in rows]) for t in step.outputs})
            if cpu_s is not None:
                cpu_s[step.role] = cpu_s.get(step.role, 0.0) + time.process_time() - t0
        if rows is None:  # a chain ending in a core (none does today): its rows are the batch's
            names = [t.name for t in self.steps[-1].outputs]
            rows = [{n: tensors[n][k] for n in names} for k in range(int(info.shape[0]))]
        return ChainOutput(tensors, rows)

    def _torch(
        self, family: Any, step: StepDecl, tensors: dict[str, np.ndarray], controls: Sequence[RequestControls]
    ) -> list[dict[str, np.ndarray]]:
        import torch

        raw = {t.name: torch.from_numpy(tensors[t.name]) for t in step.inputs if t.name != IMAGE_INFO}
        info = torch.from_numpy(tensors[IMAGE_INFO])
        with torch_threads(self.threads.get(step.role)):
            out = family.run_step(self.decode_spec, step.role, raw, info, controls)
        dtypes = {t.name: NUMPY_DTYPES[t.dtype] for t in step.outputs}
        return [{n: np.asarray(r[n]).astype(d, copy=False) for n, d in dtypes.items()} for r in out]
