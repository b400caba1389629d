"""Core step on a server without the ONNX Runtime backend: onnxruntime inside a python-backend model.

Requests of the same input shape (Triton's dynamic batcher only groups those) run as one
onnxruntime call; each request gets its own slice back.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from detserve.runtime.backend.common import config_parameter, error_response, group_by, tune_stub_malloc
from detserve.runtime.onnxrt import cpu_session


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        tune_stub_malloc()
        config = json.loads(args["model_config"])
        path = Path(args["model_repository"]) / args["model_version"] / config_parameter(args, "onnx_file")
        self.session = cpu_session(
            path, int(config_parameter(args, "intra_op_threads")), config_parameter(args, "allow_spinning", "0") == "1"
        )
        self.output_names = [o["name"] for o in config["output"]]

    def execute(self, requests: list[Any]) -> list[Any]:
        arrays = [pb_utils.get_input_tensor_by_name(r, "images").as_numpy() for r in requests]
        responses: list[Any] = [None] * len(requests)
        for _, idxs in group_by([a.shape[1:] for a in arrays]).items():
            try:
                batch = np.concatenate([arrays[i] for i in idxs]) if len(idxs) > 1 else arrays[idxs[0]]
                outputs = self.session.run(self.output_names, {"images": batch})
            except Exception as e:
                for i in idxs:
                    responses[i] = error_response(pb_utils, e)
                continue
            start = 0
            for i in idxs:
                n = arrays[i].shape[0]
                tensors = [
                    pb_utils.Tensor(name, out[start : start + n]) for name, out in zip(self.output_names, outputs, strict=True)
                ]
                responses[i] = pb_utils.InferenceResponse(output_tensors=tensors)
                start += n
        return responses
