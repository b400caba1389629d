"""The python step model: every composing model after the preprocessing, for every family.

The config says which kind of step (tritonconfig.step_config): ``onnx_file`` set -> a core on a
server without the ONNX Runtime backend: onnxruntime inside the stub runs the exported core on
every declared input (one, the pre-processed ``images``, or several: a two-stage family's FPN maps
and proposals). ``torch_file`` set -> the python-torch target's core: the saved torch artifact run
by torch (runtime/torchcore.py), on the CPU or, with ``device`` "cuda", on the GPU where its inputs
stay and its outputs are handed on through DLPack. Otherwise a torch step: the family named by the stored decode spec
(``postprocess_spec``) runs its step ``step`` (``Family.run_step``: a single-stage family's
``postprocess`` = decode + NMS + fixed-size padding; R-CNN's proposals, detections, ...) with the
request's controls (request parameters pass through the ensemble to every step).

Image by image (runtime/canvas.py): each image's inputs are cropped to its own canvas (a core's
``images``, by ``image_info`` where the config gives it) or to its own shape (an input's
``<name>__shape`` companion), and images of the same canvas and input shapes, from any requests,
run as one batch; each request gets its own rows back (a core's outputs zero-padded to the largest
with ``<name>__shape`` companions where the config declares them; a torch step's rows of different
lengths zero-padded by ``stack_rows``, another output saying the count). A batch that fails fails
its requests only; a bad control fails its own request before the batch runs.

Inputs on the CPU (the default: the python backend copies every input there) take the numpy path.
With ``FORCE_CPU_ONLY_INPUT_TENSORS=no`` (``ServingOptions.postprocess_on_gpu``, a TensorRT core,
a step declared ``gpu_inputs``) they arrive on the GPU: they are taken zero-copy through DLPack
and decoded and NMS'd there; the (small) padded detections come back to the CPU for the response.

Repositories built before this module existed name ``core_model``, ``postprocess_model`` or
``stage_model`` in their ``model.py``: those modules re-export this one, and a post-processing
config without a ``step`` parameter is the ``postprocess`` step.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from detserve.runtime.backend.common import (
    apply_torch_threads,
    config_parameter,
    error_response,
    release_free_heap,
    run_per_image,
    tune_stub_malloc,
)
from detserve.runtime.canvas import canvas_of, crop_to_canvases, is_shape_name, pack, shape_name, unpack
from detserve.runtime.outputs import stack_rows

IMAGES, IMAGE_INFO = "images", "image_info"  # tritonconfig.CORE_INPUT / IMAGE_INFO (no protobuf import in a stub)


def _parse_all(requests: list[Any], parse: Any, responses: list[Any]) -> dict[int, Any]:
    """Each request parsed on its own: one that cannot be read gets its error response, the rest run."""
    parsed: dict[int, Any] = {}
    for i, request in enumerate(requests):
        try:
            parsed[i] = parse(request)
        except Exception as e:
            responses[i] = error_response(pb_utils, e)
    return parsed


class _CoreRequest:
    """One request of a core: its inputs, one dict of arrays per image (each on its own canvas / in its own
    shape). ``array`` reads a Triton tensor (numpy for onnxruntime; for a torch core a tensor left where Triton
    put it, GPU inputs on the GPU); ``host`` brings the few small ints (image info, shapes) to the host."""

    def __init__(
        self, request: Any, feeds: list[str], names: list[str],
        array: Callable[[Any], Any] = lambda t: t.as_numpy(), host: Callable[[Any], Any] = lambda a: a,
    ) -> None:  # fmt: skip
        given = {n: pb_utils.get_input_tensor_by_name(request, n) for n in names}
        arrays = {n: array(t) for n, t in given.items() if t is not None}  # companions are optional
        small = {n: host(arrays[n]) for n in arrays if n == IMAGE_INFO or is_shape_name(n)}
        per_input = {}
        for n in feeds:
            if n == IMAGES and IMAGE_INFO in small:
                per_input[n] = crop_to_canvases(arrays[n], small[IMAGE_INFO])
            else:
                per_input[n] = unpack(arrays[n], small.get(shape_name(n)), n)
        self.n = int(arrays[feeds[0]].shape[0])
        self.images = [{n: per_input[n][j] for n in feeds} for j in range(self.n)]

    def key(self, j: int) -> tuple[Any, ...]:
        return tuple(tuple(a.shape) for a in self.images[j].values())


class OnnxCore:
    """onnxruntime on a core's declared inputs (see the module docstring); ``execute`` answers Triton."""

    def __init__(self, args: dict[str, Any]) -> None:
        from detserve.runtime.onnxrt import cpu_session

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

    def _run(self, members: list[tuple[_CoreRequest, int]]) -> list[dict[str, np.ndarray]]:
        feed = {n: np.stack([r.images[j][n] for r, j in members]) for n in self.feeds}
        outs = self.session.run(self.outputs, feed)
        return [{n: o[k] for n, o in zip(self.outputs, outs, strict=True)} for k in range(len(members))]

    def _respond(self, _: _CoreRequest, rows: list[dict[str, np.ndarray]]) -> Any:
        tensors = []
        for n in self.outputs:
            batch, shapes = pack([r[n] for r in rows])
            tensors.append(pb_utils.Tensor(n, batch.astype(self.dtypes[n], copy=False)))
            if n in self.companions:
                tensors.append(pb_utils.Tensor(shape_name(n), shapes))
        return pb_utils.InferenceResponse(output_tensors=tensors)

    def execute(self, requests: list[Any]) -> list[Any]:
        responses: list[Any] = [None] * len(requests)
        parsed = _parse_all(requests, lambda r: _CoreRequest(r, self.feeds, self.names), responses)
        return run_per_image(pb_utils, parsed, lambda r, j: r.key(j), self._run, self._respond, responses)


class TorchCore:
    """The python-torch target's core (runtime/torchcore.py): the saved torch artifact on ``device``
    (config parameter; "cuda": inputs and outputs stay on the GPU, handed on through DLPack)."""

    def __init__(self, args: dict[str, Any]) -> None:
        from detserve.runtime.torchcore import artifact_in, load_core

        apply_torch_threads(args)  # the ONNX core's intra_op_threads, for torch
        config = json.loads(args["model_config"])
        self.device = config_parameter(args, "device", "cpu")
        version_dir = Path(args["model_repository"]) / args["model_version"]
        self.module = load_core(artifact_in(version_dir, config_parameter(args, "torch_file")), self.device)
        self.names = [i["name"] for i in config["input"]]
        self.feeds = [n for n in self.names if n != IMAGE_INFO and not is_shape_name(n)]
        declared = [o["name"] for o in config["output"]]
        self.outputs = [n for n in declared if not is_shape_name(n)]
        self.companions = {n for n in self.outputs if shape_name(n) in declared}
        self.dtypes = {o["name"]: pb_utils.triton_string_to_numpy(o["data_type"]) for o in config["output"]}

    def _run(self, members: list[tuple[_CoreRequest, int]]) -> list[dict[str, Any]]:
        import torch

        from detserve.runtime.torchcore import run_core

        feed = [_stack([r.images[j][n] for r, j in members]).to(self.device) for n in self.feeds]
        outs = run_core(self.module, feed, self.device)
        rows = [{n: o[k] for n, o in zip(self.outputs, outs, strict=True)} for k in range(len(members))]
        if self.device == "cpu":  # the CPU path answers numpy, as the ONNX core does
            return [{n: t.numpy() for n, t in r.items()} for r in rows]
        torch.cuda.current_stream().synchronize()  # the next step reads these through DLPack
        return rows

    def _respond(self, _: _CoreRequest, rows: list[dict[str, Any]]) -> Any:
        import torch.utils.dlpack

        from detserve.runtime.torchcore import pack_tensors, torch_dtype

        tensors = []
        for n in self.outputs:
            if self.device == "cpu":
                batch, shapes = pack([r[n] for r in rows])
                tensors.append(pb_utils.Tensor(n, batch.astype(self.dtypes[n], copy=False)))
            else:
                gpu, shapes = pack_tensors([r[n] for r in rows])
                gpu = gpu.to(torch_dtype(self.dtypes[n])).contiguous()
                tensors.append(pb_utils.Tensor.from_dlpack(n, torch.utils.dlpack.to_dlpack(gpu)))
            if n in self.companions:
                tensors.append(pb_utils.Tensor(shape_name(n), shapes))
        return pb_utils.InferenceResponse(output_tensors=tensors)

    def execute(self, requests: list[Any]) -> list[Any]:
        responses: list[Any] = [None] * len(requests)
        parsed = _parse_all(requests, lambda r: _CoreRequest(r, self.feeds, self.names, _array, _host), responses)
        return run_per_image(pb_utils, parsed, lambda r, j: r.key(j), self._run, self._respond, responses)


def _host(value: Any) -> np.ndarray:
    """A small input (image_info, shape companions) as numpy, wherever it arrived."""
    return value if isinstance(value, np.ndarray) else value.cpu().numpy()


def _array(tensor: Any) -> Any:
    """A CPU input as numpy; a GPU input as a CUDA torch tensor sharing its memory (DLPack, no copy)."""
    if tensor.is_cpu():
        return tensor.as_numpy()
    import torch.utils.dlpack

    return torch.utils.dlpack.from_dlpack(tensor.to_dlpack())


def _stack(parts: list[Any]) -> Any:
    """One batch tensor: numpy parts stacked on the CPU; otherwise on the GPU the parts came from."""
    import torch

    if all(isinstance(p, np.ndarray) for p in parts):
        return torch.from_numpy(np.stack(parts))
    device = next(p.device for p in parts if isinstance(p, torch.Tensor))
    return torch.stack([torch.as_tensor(p, device=device) for p in parts])


class _TorchRequest:
    """One request of a torch step: its inputs per image (each in its own shape), info rows and controls."""

    def __init__(self, request: Any, names: list[str], spec: Any) -> None:
        from detserve.specs import RequestControls

        given = {n: pb_utils.get_input_tensor_by_name(request, n) for n in names}
        # companions (a few ints, optional) read on the CPU; the rest where they are
        arrays = {n: t.as_numpy() if is_shape_name(n) else _array(t) for n, t in given.items() if t is not None}
        info = arrays[IMAGE_INFO]
        self.info = info if isinstance(info, np.ndarray) else info.cpu().numpy()
        self.n = int(self.info.shape[0])
        feeds = [n for n in names if n != IMAGE_INFO and not is_shape_name(n)]
        per_input = {n: unpack(arrays[n], arrays.get(shape_name(n)), n) for n in feeds}
        self.images = [{n: per_input[n][j] for n in feeds} for j in range(self.n)]
        # parsed once here so that a bad control fails its own request before the batch runs
        self.controls = RequestControls.from_parameters(json.loads(request.parameters() or "{}"), spec)

    def key(self, j: int) -> tuple[Any, ...]:
        return (canvas_of(self.info[j]), *(tuple(a.shape) for a in self.images[j].values()))


class TorchStep:
    """A family's torch step (see the module docstring); ``execute`` answers Triton."""

    def __init__(self, args: dict[str, Any]) -> None:
        from detserve.families import decode_spec_from_json, family_of_spec

        apply_torch_threads(args)
        import torchvision.models.detection  # noqa: F401 - here, not in the first request (~1 s)

        config = json.loads(args["model_config"])
        self.inputs = [i["name"] for i in config["input"]]
        self.outputs = [o["name"] for o in config["output"]]
        self.dtypes = {o["name"]: pb_utils.triton_string_to_numpy(o["data_type"]) for o in config["output"]}
        self.spec = decode_spec_from_json(config_parameter(args, "postprocess_spec"))
        self.family = family_of_spec(self.spec)
        # repositories built before every step said its role: their only torch step was the post-processing
        self.role = config_parameter(args, "step", "postprocess")
        # "cuda" (ServingOptions.device): inputs that came on the CPU move to the GPU too
        self.device = config_parameter(args, "device", "cpu")

    def _run(self, members: list[tuple[_TorchRequest, int]]) -> list[dict[str, np.ndarray]]:
        import torch

        first = members[0][0].images[members[0][1]]
        raw = {n: _stack([r.images[j][n] for r, j in members]) for n in first}
        if self.device != "cpu":
            raw = {n: t.to(self.device) for n, t in raw.items()}
        info = torch.from_numpy(np.stack([r.info[j] for r, j in members]))
        controls = [r.controls for r, _ in members]
        return list(self.family.run_step(self.spec, self.role, raw, info, controls))

    def _respond(self, _: _TorchRequest, rows: list[dict[str, np.ndarray]]) -> Any:
        tensors = [pb_utils.Tensor(n, stack_rows([r[n] for r in rows]).astype(self.dtypes[n], copy=False)) for n in self.outputs]
        return pb_utils.InferenceResponse(output_tensors=tensors)

    def execute(self, requests: list[Any]) -> list[Any]:
        responses: list[Any] = [None] * len(requests)
        parsed = _parse_all(requests, lambda r: _TorchRequest(r, self.inputs, self.spec), responses)
        return run_per_image(pb_utils, parsed, lambda r, j: r.key(j), self._run, self._respond, responses)


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        tune_stub_malloc()
        params = json.loads(args["model_config"]).get("parameters", {})
        self.step: OnnxCore | TorchCore | TorchStep
        if "onnx_file" in params:
            self.step = OnnxCore(args)
        elif "torch_file" in params:
            self.step = TorchCore(args)
        else:
            self.step = TorchStep(args)
        release_free_heap()

    def execute(self, requests: list[Any]) -> list[Any]:
        return self.step.execute(requests)
