"""The fused CPU layout: the whole served chain in one python model.

An option for CPU-only deployments (docs/performance.md): the ensemble's python stubs become one,
so the preprocessed tensor and every step's outputs never leave the process — no copy into and
out of Triton's shared memory between steps, no ensemble bookkeeping, one ``execute`` per batch
instead of one per step. It serves the same contract as the ensemble (``IMAGE`` or ``FRAMES`` in;
``num_detections``, ``boxes``, ``scores``, ``labels`` out, and ``masks`` where the ensemble has
them) under the ensemble's name, with the same per-request controls, errors and abandoned-request
checks; the steps' code is the ensemble's own: the pre-processing, then the family's declared
steps in order (runtime/chain.py: every core in its own onnxruntime session on its own ONNX file,
every torch step through the family's ``run_step`` with its served thread count) — for a
single-stage family core + post-processing, for R-CNN core, proposals, ROI core, ... .

All requests handed to one ``execute`` are decoded one by one (a bad image fails alone); their
images, each on its own canvas (runtime/canvas.py), are grouped by canvas whatever request they
came in, run through the chain as one batch per canvas, then put back into one response per
request, in order.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from detserve.families import decode_spec_from_json, family_of_spec
from detserve.pipeline import CORE
from detserve.runtime.backend.common import (
    apply_torch_threads,
    check_wanted,
    config_parameter,
    detections_response,
    error_response,
    preprocess_spec,
    release_free_heap,
    request_parameters,
    run_per_image,
    tune_stub_malloc,
)
from detserve.runtime.backend.preprocess_model import preprocess_request, request_inputs
from detserve.runtime.canvas import canvas_of, crop_to_canvases
from detserve.runtime.chain import StepChain
from detserve.runtime.onnxrt import cpu_session
from detserve.specs import PreprocessSpec, RequestControls


class _Request:
    """One request, preprocessed: its images on their canvas, image_info and controls."""

    def __init__(self, request: Any, pre: PreprocessSpec, post: Any) -> None:
        params = request_parameters(request)
        check_wanted(request, params)
        self.controls = RequestControls.from_parameters(params, post)
        images, self.info = preprocess_request(*request_inputs(request), pre, per_image=True)
        self.images = crop_to_canvases(images, self.info)
        self.n = int(self.info.shape[0])


def _chain_settings(args: dict[str, Any]) -> dict[str, Any]:
    """The ``chain`` parameter (converters/fused.py: per core step its ONNX file and session
    settings, per torch step its thread count); a repository fused before the parameter existed
    had one core, ``model.onnx``, with the settings in plain parameters."""
    raw = config_parameter(args, "chain", "")
    if raw:
        return dict(json.loads(raw))
    core = {
        "onnx_file": config_parameter(args, "onnx_file"),
        "intra_op_threads": int(config_parameter(args, "intra_op_threads")),
        "allow_spinning": config_parameter(args, "allow_spinning", "0") == "1",
    }
    return {"cores": {CORE: core}, "torch_threads": {}}


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        tune_stub_malloc()
        apply_torch_threads(args)
        self.pre = preprocess_spec(args)  # the build's, with the server's pixel budget if it sets one
        self.post = decode_spec_from_json(config_parameter(args, "postprocess_spec"))
        settings = _chain_settings(args)
        # the pre-processing runs with the process's count (config parameter torch_threads), each torch
        # step with its own served model's: a resize's last bit follows the count (runtime/chain.py)
        threads = {role: int(n) for role, n in settings["torch_threads"].items() if int(n) > 0}
        version_dir = Path(args["model_repository"]) / args["model_version"]
        sessions = {
            role: cpu_session(version_dir / c["onnx_file"], int(c["intra_op_threads"]), bool(c["allow_spinning"]))
            for role, c in settings["cores"].items()
        }
        import torchvision.models.detection  # noqa: F401 - here, not in the first request (~1 s), as the step model

        steps = family_of_spec(self.post).steps(self.post)  # what the ensemble's steps ran, in order
        self.chain = StepChain(self.post, steps, sessions, threads)
        self.outputs = [o["name"] for o in json.loads(args["model_config"])["output"]]
        release_free_heap()  # the ONNX files' parse buffers (backend/common.py)

    def _run_group(self, members: list[tuple[_Request, int]]) -> list[dict[str, np.ndarray]]:
        images = np.stack([r.images[j] for r, j in members])
        info = np.stack([r.info[j] for r, j in members])
        return self.chain.run(images, info, [r.controls for r, _ in members]).rows

    def execute(self, requests: list[Any]) -> list[Any]:
        responses: list[Any] = [None] * len(requests)
        parsed: dict[int, _Request] = {}
        for i, request in enumerate(requests):
            try:
                parsed[i] = _Request(request, self.pre, self.post)
            except Exception as e:  # this request's fault (or abandoned): it fails alone
                responses[i] = error_response(pb_utils, e)
        return run_per_image(
            pb_utils,
            parsed,
            lambda r, j: canvas_of(r.info[j]),
            self._run_group,
            lambda _, per_image: detections_response(pb_utils, per_image, self.outputs),
            responses,
        )
