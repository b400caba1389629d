"""Core step on a server without the ONNX Runtime backend: onnxruntime inside a python-backend model.

Any core: one input (the pre-processed ``images``) or several (a two-stage family's FPN maps and
proposals). Image by image (runtime/canvas.py): each image is cropped to its own canvas
(``image_info``, where the config gives it) or to its own shape (an input's ``<name>__shape``
companion), images of the same input shapes, from any requests, run as one onnxruntime call, and
each request gets its images' outputs back, zero-padded to the largest with ``<name>__shape``
companions where the config declares them. A batch that fails fails its requests only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from detserve.runtime.backend.common import config_parameter, error_response, run_per_image, tune_stub_malloc
from detserve.runtime.canvas import crop_to_canvases, is_shape_name, pack, shape_name, unpack
from detserve.runtime.onnxrt import cpu_session

IMAGES, IMAGE_INFO = "images", "image_info"  # tritonconfig.CORE_INPUT / IMAGE_INFO (no protobuf import in a stub)


class _Request:
    """One request's inputs, one dict of arrays per image (each on its own canvas / in its own shape)."""

    def __init__(self, request: Any, feeds: list[str], names: list[str]) -> None:
        given = {n: pb_utils.get_input_tensor_by_name(request, n) for n in names}
        arrays = {n: t.as_numpy() for n, t in given.items() if t is not None}  # companions are optional
        per_input = {}
        for n in feeds:
            if n == IMAGES and IMAGE_INFO in arrays:
                per_input[n] = crop_to_canvases(arrays[n], arrays[IMAGE_INFO])
            else:
                per_input[n] = unpack(arrays[n], arrays.get(shape_name(n)), n)
        self.n = int(arrays[feeds[0]].shape[0])
        self.images = [{n: per_input[n][j] for n in feeds} for j in range(self.n)]

    def key(self, j: int) -> tuple[Any, ...]:
        return tuple(a.shape for a in self.images[j].values())


class OnnxCore:
    """onnxruntime on a core's declared inputs (see the module docstring); ``execute`` answers Triton."""

    def __init__(self, args: dict[str, Any]) -> None:
        config = json.loads(args["model_config"])
        path = Path(args["model_repository"]) / args["model_version"] / config_parameter(args, "onnx_file")
        self.session = cpu_session(
            path, int(config_parameter(args, "intra_op_threads")), config_parameter(args, "allow_spinning", "0") == "1"
        )
        self.names = [i["name"] for i in config["input"]]
        self.feeds = [n for n in self.names if n != IMAGE_INFO and not is_shape_name(n)]
        declared = [o["name"] for o in config["output"]]
        self.outputs = [n for n in declared if not is_shape_name(n)]
        self.companions = {n for n in self.outputs if shape_name(n) in declared}
        self.dtypes = {o["name"]: pb_utils.triton_string_to_numpy(o["data_type"]) for o in config["output"]}

    def _run(self, members: list[tuple[_Request, int]]) -> list[dict[str, np.ndarray]]:
        feed = {n: np.stack([r.images[j][n] for r, j in members]) for n in self.feeds}
        outs = self.session.run(self.outputs, feed)
        return [{n: o[k] for n, o in zip(self.outputs, outs, strict=True)} for k in range(len(members))]

    def _respond(self, _: _Request, rows: list[dict[str, np.ndarray]]) -> Any:
        tensors = []
        for n in self.outputs:
            batch, shapes = pack([r[n] for r in rows])
            tensors.append(pb_utils.Tensor(n, batch.astype(self.dtypes[n], copy=False)))
            if n in self.companions:
                tensors.append(pb_utils.Tensor(shape_name(n), shapes))
        return pb_utils.InferenceResponse(output_tensors=tensors)

    def execute(self, requests: list[Any]) -> list[Any]:
        responses: list[Any] = [None] * len(requests)
        parsed: dict[int, _Request] = {}
        for i, request in enumerate(requests):
            try:
                parsed[i] = _Request(request, self.feeds, self.names)
            except Exception as e:
                responses[i] = error_response(pb_utils, e)
        return run_per_image(pb_utils, parsed, lambda r, j: r.key(j), self._run, self._respond, responses)


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        tune_stub_malloc()
        self.core = OnnxCore(args)

    def execute(self, requests: list[Any]) -> list[Any]:
        return self.core.execute(requests)
