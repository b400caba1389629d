"""A step of a multi-step (two-stage) pipeline: a family's torch step, or a multi-input ONNX core.

The config says which: ``onnx_file`` set -> onnxruntime runs the exported core on every declared
input (a core with several inputs: FPN maps + proposals); otherwise the family named by the stored
decode spec (``postprocess_spec``) runs its torch step ``step`` (``Family.run_step``) with the
request's controls (request parameters pass through the ensemble to every step).

Requests whose inputs have the same shapes (Triton's dynamic batcher groups only those) and, for
torch steps, the same padded image size run as one batch; each request gets its own rows back, and
a failing request (bad controls) fails alone. A step may return rows of different lengths for
the images of one request (``stack_rows`` pads them with zeros).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from detserve.runtime.backend.common import (
    apply_torch_threads,
    config_parameter,
    error_response,
    run_grouped,
    tune_stub_malloc,
)
from detserve.runtime.outputs import stack_rows


class _Request:
    def __init__(self, request: Any, names: list[str], spec: Any | None) -> None:
        self.arrays = {n: pb_utils.get_input_tensor_by_name(request, n).as_numpy() for n in names}
        self.n = int(next(iter(self.arrays.values())).shape[0])
        # torch steps: the request's controls, parsed once here so a bad one fails its own request
        # before the batch runs (onnx steps take none)
        self.controls = None
        if spec is not None:
            from detserve.specs import RequestControls

            self.controls = RequestControls.from_parameters(json.loads(request.parameters() or "{}"), spec)

    def key(self) -> tuple[Any, ...]:
        return tuple((n, a.shape[1:]) for n, a in self.arrays.items())


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        tune_stub_malloc()
        self.spec: Any = None
        config = json.loads(args["model_config"])
        self.inputs = [i["name"] for i in config["input"]]
        self.outputs = [o["name"] for o in config["output"]]
        self.dtypes = {o["name"]: pb_utils.triton_string_to_numpy(o["data_type"]) for o in config["output"]}
        onnx_file = config.get("parameters", {}).get("onnx_file", {}).get("string_value")
        if onnx_file:
            from detserve.runtime.onnxrt import cpu_session

            path = Path(args["model_repository"]) / args["model_version"] / onnx_file
            self.session = cpu_session(
                path, int(config_parameter(args, "intra_op_threads")), config_parameter(args, "allow_spinning", "0") == "1"
            )
            self.run = self._run_onnx
        else:
            from detserve.families import decode_spec_from_json, family_of_spec

            apply_torch_threads(args)
            import torchvision.models.detection  # noqa: F401 - here, not in the first request (~1 s)

            self.spec = decode_spec_from_json(config_parameter(args, "postprocess_spec"))
            self.family = family_of_spec(self.spec)
            self.role = config_parameter(args, "step")
            self.run = self._run_torch

    def _run_onnx(self, items: list[_Request]) -> list[list[dict[str, np.ndarray]]]:
        feed = {n: np.concatenate([it.arrays[n] for it in items]) for n in self.inputs}
        outs = self.session.run(self.outputs, feed)
        return _split(items, dict(zip(self.outputs, outs, strict=True)))

    def _run_torch(self, items: list[_Request]) -> list[list[dict[str, np.ndarray]]]:
        import torch

        raw = {n: torch.from_numpy(np.concatenate([it.arrays[n] for it in items])) for n in self.inputs if n != "image_info"}
        info = torch.from_numpy(np.concatenate([it.arrays["image_info"] for it in items]))
        per_image = [it.controls for it in items for _ in range(it.n)]
        rows = self.family.run_step(self.spec, self.role, raw, info, per_image)  # type: ignore[attr-defined]
        out, start = [], 0
        for it in items:
            out.append(rows[start : start + it.n])
            start += it.n
        return out

    def _response(self, rows: list[dict[str, np.ndarray]]) -> Any:
        tensors = [pb_utils.Tensor(n, stack_rows([r[n] for r in rows]).astype(self.dtypes[n], copy=False)) for n in self.outputs]
        return pb_utils.InferenceResponse(output_tensors=tensors)

    def execute(self, requests: list[Any]) -> list[Any]:
        responses: list[Any] = [None] * len(requests)
        parsed: dict[int, _Request] = {}
        for i, request in enumerate(requests):
            try:
                parsed[i] = _Request(request, self.inputs, self.spec)
            except Exception as e:
                responses[i] = error_response(pb_utils, e)
        return run_grouped(pb_utils, parsed, lambda p: p.key(), self.run, self._response, responses)


def _split(items: list[_Request], outs: dict[str, np.ndarray]) -> list[list[dict[str, np.ndarray]]]:
    result, start = [], 0
    for it in items:
        result.append([{n: o[start + j] for n, o in outs.items()} for j in range(it.n)])
        start += it.n
    return result
