"""The fused CPU layout: pre-processing, the ONNX Runtime core and post-processing in one python model.

An option for CPU-only deployments (docs/performance.md): the ensemble's three python stubs become
one, so the preprocessed tensor and the core's raw outputs never leave the process — no copy into
and out of Triton's shared memory between steps, no ensemble bookkeeping, one ``execute`` per batch
instead of three. It serves the same contract as the ensemble (``IMAGE`` in; ``num_detections``,
``boxes``, ``scores``, ``labels`` out) under the ensemble's name, with the same per-request
controls, errors and abandoned-request checks; the three stages' code is the ensemble's own.

All requests handed to one ``execute`` are decoded one by one (a bad image fails alone); their
images, each on its own canvas (runtime/canvas.py), are grouped by canvas whatever request they
came in, run through onnxruntime as one batch per canvas and decoded + NMS'd together, then put
back into one response per request, in order.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from detserve.families import decode_spec_from_json, family_of_spec, output_names
from detserve.pipeline import CORE_INPUT, IMAGE, OUTPUTS
from detserve.runtime.backend.common import (
    apply_torch_threads,
    check_wanted,
    config_parameter,
    detections_response,
    error_response,
    preprocess_spec,
    request_parameters,
    run_per_image,
    tune_stub_malloc,
)
from detserve.runtime.backend.preprocess_model import preprocess_images
from detserve.runtime.canvas import canvas_of, crop_to_canvases
from detserve.runtime.onnxrt import cpu_session
from detserve.specs import PreprocessSpec, RequestControls


class _Request:
    """One request, preprocessed: its images on their canvas, image_info and controls."""

    def __init__(self, request: Any, pre: PreprocessSpec, post: Any) -> None:
        params = request_parameters(request)
        check_wanted(request, params)
        self.controls = RequestControls.from_parameters(params, post)
        blobs = [bytes(b) for b in pb_utils.get_input_tensor_by_name(request, IMAGE).as_numpy().reshape(-1)]
        images, self.info = preprocess_images(blobs, pre, per_image=True)
        self.images = crop_to_canvases(images, self.info)
        self.n = int(self.info.shape[0])


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        tune_stub_malloc()
        apply_torch_threads(args)
        self.pre = preprocess_spec(args)  # the build's, with the server's pixel budget if it sets one
        self.post = decode_spec_from_json(config_parameter(args, "postprocess_spec"))
        self.family = family_of_spec(self.post)
        self.names = list(output_names(self.post))
        path = Path(args["model_repository"]) / args["model_version"] / config_parameter(args, "onnx_file")
        self.session = cpu_session(
            path, int(config_parameter(args, "intra_op_threads")), config_parameter(args, "allow_spinning", "0") == "1"
        )

    def _run_group(self, members: list[tuple[_Request, int]]) -> list[dict[str, np.ndarray]]:
        raw = self.session.run(self.names, {CORE_INPUT: np.stack([r.images[j] for r, j in members])})
        outputs = {name: torch.from_numpy(arr) for name, arr in zip(self.names, raw, strict=True)}
        info = torch.from_numpy(np.stack([r.info[j] for r, j in members]))
        controls = [r.controls for r, _ in members]
        # the ensemble's own post-processing step (a single-stage family's decode + fixed-size padding)
        return list(self.family.run_step(self.post, "postprocess", outputs, info, controls))

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
            lambda _, per_image: detections_response(pb_utils, per_image, OUTPUTS),
            responses,
        )
