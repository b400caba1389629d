"""Post-processing step: raw core outputs -> detections in original pixels, per-request controls.

The decode is the family's (``Family.decode``, chosen by the stored spec's ``family``); the raw
inputs are the core's declared outputs (``Family.outputs``).

Image by image (runtime/canvas.py): each image's raw outputs are cropped to its own shapes (the
core's ``<name>__shape`` companions, where it gives them), and all images handed to one
``execute`` that share a canvas and shapes, from any requests, are decoded and NMS'd together (one
vectorised pass), then put back into one response per request, in order.

Inputs on the CPU (the default: the python backend copies every input there) take the numpy
path. With ``FORCE_CPU_ONLY_INPUT_TENSORS=no`` (``ServingOptions.postprocess_on_gpu``, a TensorRT
core) the raw outputs arrive on the GPU: they are taken zero-copy through DLPack and decoded and
NMS'd there; the (small) padded detections come back to the CPU for the response.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from detserve.families import decode_spec_from_json, family_of_spec, output_names
from detserve.runtime.backend.common import (
    apply_torch_threads,
    config_parameter,
    detections_response,
    error_response,
    run_per_image,
    tune_stub_malloc,
)
from detserve.runtime.canvas import canvas_of, shape_name, unpack
from detserve.runtime.outputs import pad_detections
from detserve.specs import RequestControls
from detserve.tritonconfig import IMAGE_INFO, OUTPUTS


class _Parsed:
    """One request's inputs, read once: its controls, and per image its raw outputs (each in its own shape)."""

    def __init__(self, request: Any, spec: Any, names: tuple[str, ...], companions: tuple[str, ...]) -> None:
        params = json.loads(request.parameters() or "{}")
        self.controls = RequestControls.from_parameters(params, spec)
        info = _array(pb_utils.get_input_tensor_by_name(request, IMAGE_INFO))
        self.info = info if isinstance(info, np.ndarray) else info.cpu().numpy()  # a few ints, read on the CPU
        self.n = int(self.info.shape[0])
        given = {n: pb_utils.get_input_tensor_by_name(request, shape_name(n)) for n in companions}
        shapes = {n: t.as_numpy() for n, t in given.items() if t is not None}  # optional
        per_input = {n: unpack(_array(pb_utils.get_input_tensor_by_name(request, n)), shapes.get(n), n) for n in names}
        self.images = [{n: per_input[n][j] for n in names} for j in range(self.n)]

    def key(self, j: int) -> tuple[Any, ...]:
        return (canvas_of(self.info[j]), *(tuple(a.shape) for a in self.images[j].values()))


def _array(tensor: Any) -> np.ndarray | torch.Tensor:
    """A CPU input as numpy (as before); a GPU input as a CUDA torch tensor sharing its memory."""
    if tensor.is_cpu():
        return tensor.as_numpy()
    return torch.utils.dlpack.from_dlpack(tensor.to_dlpack())


def _stack(parts: list[np.ndarray | torch.Tensor]) -> torch.Tensor:
    """One batch tensor: numpy parts as before; otherwise on the GPU the parts came from."""
    if all(isinstance(p, np.ndarray) for p in parts):
        return torch.from_numpy(np.stack(parts))
    device = next(p.device for p in parts if isinstance(p, torch.Tensor))
    return torch.stack([torch.as_tensor(p, device=device) for p in parts])


def _run_group(spec: Any, members: list[tuple[_Parsed, int]]) -> list[dict[str, np.ndarray]]:
    """Decode + NMS these images (one canvas) in one pass, where the inputs are; padded outputs per image."""
    first = members[0][0].images[members[0][1]]
    raw = {n: _stack([p.images[j][n] for p, j in members]) for n in first}
    info = torch.from_numpy(np.stack([p.info[j] for p, j in members]))
    controls = [p.controls for p, _ in members]
    canvas = canvas_of(info[0])
    dets = family_of_spec(spec).decode(spec, raw, canvas, info[:, 2:4], info[:, 0:2], controls)
    return [pad_detections(d, c.max_det) for d, c in zip(dets, controls, strict=True)]


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        tune_stub_malloc()
        apply_torch_threads(args)
        self.spec = decode_spec_from_json(config_parameter(args, "postprocess_spec"))
        self.names = output_names(self.spec)
        inputs = {i["name"] for i in json.loads(args["model_config"])["input"]}
        self.companions = tuple(n for n in self.names if shape_name(n) in inputs)

    def execute(self, requests: list[Any]) -> list[Any]:
        responses: list[Any] = [None] * len(requests)
        parsed: dict[int, _Parsed] = {}
        for i, request in enumerate(requests):
            try:
                parsed[i] = _Parsed(request, self.spec, self.names, self.companions)
            except Exception as e:
                responses[i] = error_response(pb_utils, e)
        return run_per_image(
            pb_utils,
            parsed,
            lambda p, j: p.key(j),
            lambda members: _run_group(self.spec, members),
            lambda _, per_image: detections_response(pb_utils, per_image, OUTPUTS),
            responses,
        )
