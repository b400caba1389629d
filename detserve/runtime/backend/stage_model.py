"""A step of a multi-step (two-stage) pipeline: a family's torch step, or a multi-input ONNX core.

The config says which: ``onnx_file`` set -> onnxruntime runs the exported core on every declared
input (a core with several inputs: FPN maps + proposals); otherwise the family named by the stored
decode spec (``postprocess_spec``) runs its torch step ``step`` (``Family.run_step``) with the
request's controls (request parameters pass through the ensemble to every step).

Image by image (runtime/canvas.py): each image's inputs are cropped to its own shapes (an input's
``<name>__shape`` companion), and images of the same padded size and input shapes, from any
requests, run as one batch; each request gets its own rows back, and a failing request (bad
controls) fails alone. A step may return rows of different lengths for the images of one request
(``stack_rows`` pads them with zeros; another output says the count).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from detserve.runtime.backend.common import (
    apply_torch_threads,
    config_parameter,
    error_response,
    run_per_image,
    tune_stub_malloc,
)
from detserve.runtime.canvas import canvas_of, is_shape_name, shape_name, unpack
from detserve.runtime.outputs import stack_rows


class _Request:
    """One request of a torch step: its inputs per image (each in its own shape), info rows and controls."""

    def __init__(self, request: Any, names: list[str], spec: Any) -> None:
        from detserve.specs import RequestControls

        given = {n: pb_utils.get_input_tensor_by_name(request, n) for n in names}
        arrays = {n: t.as_numpy() for n, t in given.items() if t is not None}  # companions are optional
        self.info = arrays["image_info"]
        self.n = int(self.info.shape[0])
        feeds = [n for n in names if n != "image_info" and not is_shape_name(n)]
        per_input = {n: unpack(arrays[n], arrays.get(shape_name(n)), n) for n in feeds}
        self.images = [{n: per_input[n][j] for n in feeds} for j in range(self.n)]
        # parsed once here so that a bad control fails its own request before the batch runs
        self.controls = RequestControls.from_parameters(json.loads(request.parameters() or "{}"), spec)

    def key(self, j: int) -> tuple[Any, ...]:
        return (canvas_of(self.info[j]), *(a.shape for a in self.images[j].values()))


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        tune_stub_malloc()
        config = json.loads(args["model_config"])
        if config.get("parameters", {}).get("onnx_file", {}).get("string_value"):
            from detserve.runtime.backend.core_model import OnnxCore

            self.core: Any = OnnxCore(args)
            return
        from detserve.families import decode_spec_from_json, family_of_spec

        self.core = None
        apply_torch_threads(args)
        import torchvision.models.detection  # noqa: F401 - here, not in the first request (~1 s)

        self.inputs = [i["name"] for i in config["input"]]
        self.outputs = [o["name"] for o in config["output"]]
        self.dtypes = {o["name"]: pb_utils.triton_string_to_numpy(o["data_type"]) for o in config["output"]}
        self.spec = decode_spec_from_json(config_parameter(args, "postprocess_spec"))
        self.family = family_of_spec(self.spec)
        self.role = config_parameter(args, "step")

    def _run(self, members: list[tuple[_Request, int]]) -> list[dict[str, np.ndarray]]:
        import torch

        first = members[0][0].images[members[0][1]]
        raw = {n: torch.from_numpy(np.stack([r.images[j][n] for r, j in members])) for n in first}
        info = torch.from_numpy(np.stack([r.info[j] for r, j in members]))
        controls = [r.controls for r, _ in members]
        return list(self.family.run_step(self.spec, self.role, raw, info, controls))  # type: ignore[attr-defined]

    def _respond(self, _: _Request, rows: list[dict[str, np.ndarray]]) -> Any:
        tensors = [pb_utils.Tensor(n, stack_rows([r[n] for r in rows]).astype(self.dtypes[n], copy=False)) for n in self.outputs]
        return pb_utils.InferenceResponse(output_tensors=tensors)

    def execute(self, requests: list[Any]) -> list[Any]:
        if self.core is not None:
            return list(self.core.execute(requests))
        responses: list[Any] = [None] * len(requests)
        parsed: dict[int, _Request] = {}
        for i, request in enumerate(requests):
            try:
                parsed[i] = _Request(request, self.inputs, self.spec)
            except Exception as e:
                responses[i] = error_response(pb_utils, e)
        return run_per_image(pb_utils, parsed, lambda r, j: r.key(j), self._run, self._respond, responses)
