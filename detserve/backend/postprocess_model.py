"""Post-processing step: raw core outputs -> detections in original pixels, per-request controls.

All requests handed to one ``execute`` that share a padded size are decoded and NMS'd together
(one vectorised pass), then split back into one response per request, in order.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from detserve.backend.common import apply_torch_threads, config_parameter, error_response, group_by
from detserve.postprocess import pad_detections, postprocess_batch
from detserve.specs import PostprocessSpec, RequestControls
from detserve.tritonconfig import IMAGE_INFO, OUTPUTS


class _Parsed:
    """One request's inputs, read once."""

    def __init__(self, request: Any, spec: PostprocessSpec) -> None:
        params = json.loads(request.parameters() or "{}")
        self.controls = RequestControls.from_parameters(params, spec)
        self.raw = {n: pb_utils.get_input_tensor_by_name(request, n).as_numpy() for n in spec.output_names}
        self.info = pb_utils.get_input_tensor_by_name(request, IMAGE_INFO).as_numpy()
        self.n = int(self.info.shape[0])

    @property
    def padded_hw(self) -> tuple[int, int]:
        return (int(self.info[0, 4]), int(self.info[0, 5]))


def _run_group(spec: PostprocessSpec, items: list[_Parsed]) -> list[list[dict[str, np.ndarray]]]:
    """Decode + NMS every image of these requests in one pass; padded outputs per image."""
    raw = {n: torch.from_numpy(np.concatenate([it.raw[n] for it in items])) for n in spec.output_names}
    info = torch.from_numpy(np.concatenate([it.info for it in items]))
    controls = [it.controls for it in items for _ in range(it.n)]
    dets = postprocess_batch(spec, raw, items[0].padded_hw, info[:, 2:4], info[:, 0:2], controls)
    out, start = [], 0
    for it in items:
        out.append([pad_detections(d, it.controls.max_det) for d in dets[start : start + it.n]])
        start += it.n
    return out


def _response(per_image: list[dict[str, np.ndarray]]) -> Any:
    tensors = [pb_utils.Tensor(name, np.stack([d[name] for d in per_image])) for name in OUTPUTS]
    return pb_utils.InferenceResponse(output_tensors=tensors)


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        apply_torch_threads(args)
        self.spec = PostprocessSpec.from_json(config_parameter(args, "postprocess_spec"))

    def execute(self, requests: list[Any]) -> list[Any]:
        responses: list[Any] = [None] * len(requests)
        parsed: dict[int, _Parsed] = {}
        for i, request in enumerate(requests):
            try:
                parsed[i] = _Parsed(request, self.spec)
            except Exception as e:
                responses[i] = error_response(pb_utils, e)
        keys = list(parsed)
        for _, idxs in group_by([parsed[k].padded_hw for k in keys]).items():
            members = [keys[j] for j in idxs]
            try:
                results = _run_group(self.spec, [parsed[k] for k in members])
            except Exception as e:
                for k in members:
                    responses[k] = error_response(pb_utils, e)
                continue
            for k, per_image in zip(members, results, strict=True):
                responses[k] = _response(per_image)
        return responses
