"""Post-processing step: raw core outputs -> detections in original pixels, per-request controls.

The decode is the family's (``Family.decode``, chosen by the stored spec's ``family``); the raw
inputs are the core's declared outputs (``Family.outputs``).

All requests handed to one ``execute`` that share a padded size are decoded and NMS'd together
(one vectorised pass), then split back into one response per request, in order.

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
    run_grouped,
    tune_stub_malloc,
)
from detserve.runtime.outputs import pad_detections
from detserve.specs import RequestControls
from detserve.tritonconfig import IMAGE_INFO, OUTPUTS


class _Parsed:
    """One request's inputs, read once."""

    def __init__(self, request: Any, spec: Any, names: tuple[str, ...]) -> None:
        params = json.loads(request.parameters() or "{}")
        self.controls = RequestControls.from_parameters(params, spec)
        self.raw = {n: _array(pb_utils.get_input_tensor_by_name(request, n)) for n in names}
        info = _array(pb_utils.get_input_tensor_by_name(request, IMAGE_INFO))
        self.info = info if isinstance(info, np.ndarray) else info.cpu().numpy()  # a few ints, read on the CPU
        self.n = int(self.info.shape[0])

    @property
    def padded_hw(self) -> tuple[int, int]:
        return (int(self.info[0, 4]), int(self.info[0, 5]))


def _array(tensor: Any) -> np.ndarray | torch.Tensor:
    """A CPU input as numpy (as before); a GPU input as a CUDA torch tensor sharing its memory."""
    if tensor.is_cpu():
        return tensor.as_numpy()
    return torch.utils.dlpack.from_dlpack(tensor.to_dlpack())


def _concat(parts: list[np.ndarray | torch.Tensor]) -> torch.Tensor:
    """One batch tensor: numpy parts as before; otherwise on the GPU the parts came from."""
    if all(isinstance(p, np.ndarray) for p in parts):
        return torch.from_numpy(np.concatenate(parts))
    device = next(p.device for p in parts if isinstance(p, torch.Tensor))
    return torch.cat([torch.as_tensor(p, device=device) for p in parts])


def _run_group(spec: Any, items: list[_Parsed]) -> list[list[dict[str, np.ndarray]]]:
    """Decode + NMS every image of these requests in one pass (where the inputs are); padded outputs per image."""
    raw = {n: _concat([it.raw[n] for it in items]) for n in items[0].raw}
    info = torch.from_numpy(np.concatenate([it.info for it in items]))
    controls = [it.controls for it in items for _ in range(it.n)]
    dets = family_of_spec(spec).decode(spec, raw, items[0].padded_hw, info[:, 2:4], info[:, 0:2], controls)
    out, start = [], 0
    for it in items:
        out.append([pad_detections(d, it.controls.max_det) for d in dets[start : start + it.n]])
        start += it.n
    return out


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        tune_stub_malloc()
        apply_torch_threads(args)
        self.spec = decode_spec_from_json(config_parameter(args, "postprocess_spec"))
        self.names = output_names(self.spec)

    def execute(self, requests: list[Any]) -> list[Any]:
        responses: list[Any] = [None] * len(requests)
        parsed: dict[int, _Parsed] = {}
        for i, request in enumerate(requests):
            try:
                parsed[i] = _Parsed(request, self.spec, self.names)
            except Exception as e:
                responses[i] = error_response(pb_utils, e)
        return run_grouped(
            pb_utils,
            parsed,
            lambda p: p.padded_hw,
            lambda group: _run_group(self.spec, group),
            lambda per_image: detections_response(pb_utils, per_image, OUTPUTS),
            responses,
        )
