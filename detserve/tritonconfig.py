"""Triton ``config.pbtxt`` files generated from specs (protobuf messages, never string pasting).

Tensor names are the ensemble's wire contract (docs/contract.md): clients send ``IMAGE`` (encoded
bytes) and read ``num_detections``, ``boxes``, ``scores``, ``labels`` whatever the detector family. The core's
raw tensors come from the family's declarations (detserve/families/base.py: name, dtype, dims).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from detserve.errors import SpecError
from detserve.pipeline import (  # the tensor names live in the foundation; re-exported here
    CORE_INPUT,
    EXTRA_OUTPUTS,
    FRAMES,
    IMAGE,
    IMAGE_INFO,
    OUTPUTS,
    PREPROCESS,
    model_name,
)
from detserve.runtime.canvas import CANVAS_PARAMETER, PER_IMAGE, shape_name
from detserve.specs import PreprocessSpec

if TYPE_CHECKING:
    from detserve.families.base import StepDecl

Target = Literal["python-onnxruntime", "onnxruntime", "tensorrt", "python-torch"]
TARGETS: tuple[str, ...] = ("python-onnxruntime", "onnxruntime", "tensorrt", "python-torch")
# cores run inside detserve's python step model (not Triton's own backends): they crop per-image canvases
STUB_TARGETS = ("python-onnxruntime", "python-torch")
# the python-torch core's artifact (converters/torch_export.py); the step model loads the model.ts beside
# it where torch.export fell back (runtime/torchcore.artifact_in: the config is shared by every version)
TORCH_FILE = "model.pt2"
DEVICES = ("cpu", "gpu")


@dataclass(frozen=True)
class ServingOptions:
    """Scheduling knobs of the generated configs.

    Defaults measured with ``detserve tune`` on the 2-core CPU machine (docs/performance.md):
    against torch on all cores in every stub, one torch thread per stub gave 1.5x the throughput;
    one onnxruntime thread +10%; the batching delay (0 / 2 / 10 ms) made no difference beyond noise.
    One post-processing instance: a second one (+33% when the untrained heads' per-class NMS was the
    costliest step) did no more work per CPU-second with trained or seeded heads (quiet A/B, 3 pairs
    each: 0.99 and 1.00) and cost a torch process, ~370 MB USS, per model; ``detserve tune`` offers
    "postprocess x2 instances" where a model's NMS needs it.
    """

    max_batch_size: int = 8
    max_queue_delay_us: int = 2000
    # Overload: each composing model queues at most this many requests; past it a request is
    # rejected at once (UNAVAILABLE, "Exceeds maximum queue size") instead of waiting without
    # bound, so admitted requests keep a bounded latency. 0 = unbounded.
    max_queue_size: int = 64
    # A request still queued after this long is rejected (clients may ask for less: Triton's
    # per-request timeout override). 0 = no timeout.
    queue_timeout_ms: int = 30_000
    preprocess_instances: int = 1
    core_instances: int = 1
    postprocess_instances: int = 1
    ort_intra_op_threads: int = 1  # 0: onnxruntime decides (all cores)
    # onnxruntime's threads spin after each call; on a small CPU that steals time from the
    # torch pre/post-processing stubs running beside it
    ort_allow_spinning: bool = False
    # intra-op threads of torch in the pre/post-processing stubs (0: torch decides = all cores).
    # Each stub is its own process: several stubs x all cores oversubscribes a small CPU, so
    # post-processing gets one. Pre-processing keeps two: torch's CPU kernels (normalise/resize)
    # give last-bit different floats on one thread than on two or more, and the served tensor
    # must equal the (multi-threaded) reference bit for bit.
    preprocess_torch_threads: int = 2
    postprocess_torch_threads: int = 1
    # Post-processing instances on the GPU (KIND_GPU), GPU inputs left where they are
    # (FORCE_CPU_ONLY_INPUT_TENSORS=no): with a TensorRT core the raw outputs reach the torch
    # post-processing without a device-to-host copy and decode/NMS run on the GPU. Off by default;
    # only meaningful with the tensorrt target (the build refuses it otherwise).
    postprocess_on_gpu: bool = False
    # "gpu" (python-torch target only, checked by the build): pre-processing, the torch core and the
    # single-stage post-processing get KIND_GPU instances and parameter device "cuda"; each step
    # hands its tensors on through DLPack, no host copy between steps (steps that read counts on the
    # CPU, R-CNN's, stay there and get their inputs copied by Triton).
    device: str = "cpu"
    # The ensemble's second way in, FRAMES (raw uint8 RGB, for video). Off: IMAGE is the only input, which
    # Triton's HTTP raw-body shortcut (Inference-Header-Content-Length: 0, the body is the file) needs --
    # Triton deduces the input only for a model with one (docs/contract.md).
    frames_input: bool = True

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise SpecError(f"device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.max_batch_size < 1:
            raise SpecError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.max_queue_size < 0 or self.queue_timeout_ms < 0:
            raise SpecError("max_queue_size and queue_timeout_ms must be >= 0 (0: unbounded)")
        if self.max_queue_delay_us < 0:
            raise SpecError(f"max_queue_delay_us must be >= 0, got {self.max_queue_delay_us}")
        if min(self.preprocess_torch_threads, self.postprocess_torch_threads, self.ort_intra_op_threads) < 0:
            raise SpecError("thread counts must be >= 0 (0: the library decides)")
        for role in ("preprocess", "core", "postprocess"):
            if getattr(self, f"{role}_instances") < 1:
                raise SpecError(f"{role}_instances must be >= 1, got {getattr(self, f'{role}_instances')}")


def _tensor(container: Any, name: str, dtype: int, dims: list[int]) -> None:
    container.add(name=name, data_type=dtype, dims=dims)


def _batched(config: mc.ModelConfig, opts: ServingOptions, instances: int, gpu: bool = False) -> None:
    config.max_batch_size = opts.max_batch_size
    config.dynamic_batching.max_queue_delay_microseconds = opts.max_queue_delay_us
    policy = config.dynamic_batching.default_queue_policy
    policy.timeout_action = mc.ModelQueuePolicy.REJECT
    policy.max_queue_size = opts.max_queue_size
    policy.default_timeout_microseconds = opts.queue_timeout_ms * 1000
    policy.allow_timeout_override = True
    kind = mc.ModelInstanceGroup.KIND_GPU if gpu else mc.ModelInstanceGroup.KIND_CPU
    config.instance_group.add(kind=kind, count=instances)


def _core_dims(pre: PreprocessSpec) -> list[int]:
    fixed = pre.fixed_input_hw
    return [3, *(fixed if fixed else (-1, -1))]


def _dtype(name: str) -> int:
    value = getattr(mc, f"TYPE_{name}", None)
    if value is None:
        raise SpecError(f"unknown Triton data type {name!r} in a declared output")
    return int(value)


def _public_inputs(container: Any, frames: bool = True) -> None:
    """The ways in: ``IMAGE`` (encoded files) or ``FRAMES`` (raw uint8 RGB pixels, [H, W, 3] per image),
    each optional since a request carries one of them; the pre-processing refuses neither or both."""
    container.add(name=IMAGE, data_type=mc.TYPE_STRING, dims=[1], optional=True)
    if frames:
        container.add(name=FRAMES, data_type=mc.TYPE_UINT8, dims=[-1, -1, 3], optional=True)


def preprocess_config(name: str, pre: PreprocessSpec, opts: ServingOptions) -> mc.ModelConfig:
    config = mc.ModelConfig(name=model_name(name, PREPROCESS), backend="python")
    _batched(config, opts, opts.preprocess_instances, gpu=opts.device == "gpu")
    if opts.device == "gpu":  # runtime/backend/preprocess_model.py decodes/resizes there
        config.parameters["device"].string_value = "cuda"
    _public_inputs(config.input, opts.frames_input)
    _tensor(config.output, CORE_INPUT, mc.TYPE_FP32, _core_dims(pre))
    _tensor(config.output, IMAGE_INFO, mc.TYPE_INT32, [6])
    config.parameters["preprocess_spec"].string_value = pre.to_json()
    config.parameters["torch_threads"].string_value = str(opts.preprocess_torch_threads)
    return config


def step_config(
    name: str,
    step: StepDecl,
    target: str,
    decode_spec: Any,
    opts: ServingOptions,
    last: bool,
    pre: PreprocessSpec | None = None,
) -> mc.ModelConfig:
    """The config of one of a family's steps (``Family.steps``): its declared inputs and outputs.

    A core step is exported ONNX on ``target`` (python-onnxruntime: the python step model runs it
    in onnxruntime; onnxruntime / tensorrt: Triton's own backends); its ``images`` input is
    [3, H, W] with the size ``pre`` fixes, if it fixes one. A python step runs the family's torch
    step (``parameters: step``) with the decode spec. The last step's instances are the
    post-processing ones; the steps between get one each. A step that may take GPU inputs
    (``StepDecl.gpu_inputs``: a single-stage post-processing) runs on the GPU with
    ``ServingOptions.postprocess_on_gpu``. On python-torch the core is a torch artifact
    (``torch_file``) run by the python step model with the ONNX core's thread count; with
    ``ServingOptions.device`` "gpu" (python-torch only) the core and the GPU-capable steps run on the
    GPU (KIND_GPU, ``device: cuda``, inputs left on the GPU).
    """
    if target not in TARGETS:
        raise SpecError(f"unknown target {target!r}", hint=f"choose one of: {', '.join(TARGETS)}")
    config = mc.ModelConfig(name=model_name(name, step.role))
    if step.kind == "core" and target == "onnxruntime":
        config.platform, config.default_model_filename = "onnxruntime_onnx", "model.onnx"
    elif step.kind == "core" and target == "tensorrt":
        # the engine converters.tensorrt_build built for the GPU it runs on
        config.platform, config.default_model_filename = "tensorrt_plan", "model.plan"
    else:
        config.backend = "python"
    on_gpu = opts.device == "gpu"
    if on_gpu and target != "python-torch":
        raise SpecError(f"device gpu needs the python-torch target, not {target}")
    if step.kind == "core":
        if target == "python-onnxruntime":
            config.parameters["onnx_file"].string_value = "model.onnx"
            config.parameters["intra_op_threads"].string_value = str(opts.ort_intra_op_threads)
            config.parameters["allow_spinning"].string_value = "1" if opts.ort_allow_spinning else "0"
        elif target == "python-torch":  # the ONNX core's thread setting, for torch (runtime/torchcore.py)
            config.parameters["torch_file"].string_value = TORCH_FILE
            config.parameters["torch_threads"].string_value = str(opts.ort_intra_op_threads)
        _batched(config, opts, opts.core_instances, gpu=target == "tensorrt" or on_gpu)
        if on_gpu:
            _on_device(config)
    else:
        gpu = (opts.postprocess_on_gpu or on_gpu) and step.gpu_inputs
        _batched(config, opts, opts.postprocess_instances if last else 1, gpu=gpu)
        if gpu and on_gpu:
            _on_device(config)
        elif gpu:  # the python backend copies every input to the CPU unless told not to
            config.parameters["FORCE_CPU_ONLY_INPUT_TENSORS"].string_value = "no"
        config.parameters["postprocess_spec"].string_value = decode_spec.to_json()
        config.parameters["step"].string_value = step.role
        config.parameters["torch_threads"].string_value = str(opts.postprocess_torch_threads)
    for t in step.inputs:
        dims = _core_dims(pre) if t.name == CORE_INPUT and pre is not None else list(t.dims)
        _tensor(config.input, t.name, _dtype(t.dtype), dims)
    for t in step.outputs:
        _tensor(config.output, t.name, _dtype(t.dtype), list(t.dims))
    return config


def _on_device(config: mc.ModelConfig) -> None:
    """A python step that runs on the GPU: inputs left where the previous step put them (the python
    backend copies every input to the CPU unless told not to), and ``device`` for the step model."""
    config.parameters["FORCE_CPU_ONLY_INPUT_TENSORS"].string_value = "no"
    config.parameters["device"].string_value = "cuda"


def own_canvases(steps: Sequence[mc.ModelConfig], target: str) -> None:
    """Every image of a request on its own canvas (runtime/canvas.py), where the cores can crop.

    On python-onnxruntime (cores run by detserve's own stub) the pre-processing step pads each
    image to its own canvas; a core that reads ``images`` also reads ``image_info`` to crop them;
    every core output with a dimension that follows the image (-1) travels with a
    ``<name>__shape`` companion, which every later step that reads the output reads too. Native
    cores (onnxruntime, TensorRT backends) run a request's tensor whole: their pre-processing
    keeps one canvas per request and refuses images that would need two.
    """
    if target not in STUB_TARGETS:
        return
    steps[0].parameters[CANVAS_PARAMETER].string_value = PER_IMAGE
    sized: dict[str, int] = {}  # a core output with an image-sized dim -> its rank
    for config in steps[1:]:
        names = [t.name for t in config.input]
        for name in names:
            if name in sized:  # optional: a step called directly (a debugging client) crops nothing
                config.input.add(name=shape_name(name), data_type=mc.TYPE_INT32, dims=[sized[name]], optional=True)
        if "onnx_file" not in config.parameters and "torch_file" not in config.parameters:
            continue
        if CORE_INPUT in names and IMAGE_INFO not in names:
            config.input.add(name=IMAGE_INFO, data_type=mc.TYPE_INT32, dims=[6], optional=True)
        for t in list(config.output):
            if -1 in t.dims:
                _tensor(config.output, shape_name(t.name), mc.TYPE_INT32, [len(t.dims)])
                sized[t.name] = len(t.dims)


def _add_detection_outputs(config: mc.ModelConfig) -> None:
    _tensor(config.output, "num_detections", mc.TYPE_INT32, [1])
    _tensor(config.output, "boxes", mc.TYPE_FP32, [-1, 4])
    _tensor(config.output, "scores", mc.TYPE_FP32, [-1])
    _tensor(config.output, "labels", mc.TYPE_INT32, [-1])


def ensemble_config(name: str, steps: Sequence[mc.ModelConfig], opts: ServingOptions, version: int = -1) -> mc.ModelConfig:
    """The steps in order, wired by tensor name; every step pins a version (-1 = latest, never unset).

    The ensemble's ``IMAGE`` (and ``FRAMES``, where the first step declares it) feeds whichever step takes it; a tensor one step outputs and a later
    step inputs travels as ``_<name>``; the last step's detection outputs are the ensemble's. Any
    number of steps (python / core / python / core / python for two-stage families).
    """
    config = mc.ModelConfig(name=name, platform="ensemble", max_batch_size=opts.max_batch_size)
    # the first step's public inputs, as it declares them: FRAMES only where its pre-processing reads it
    ways_in = [t for t in steps[0].input if t.name in (IMAGE, FRAMES)] if steps else []
    for tensor in ways_in or [mc.ModelInput(name=IMAGE, data_type=mc.TYPE_STRING, dims=[1])]:
        config.input.add().CopyFrom(tensor)
    _add_detection_outputs(config)
    produced: set[str] = {t.name for t in config.input}
    for i, step_config in enumerate(steps):
        step = config.ensemble_scheduling.step.add(model_name=step_config.name, model_version=version)
        for tensor in step_config.input:
            if tensor.name not in produced:
                raise SpecError(f"step {step_config.name} needs {tensor.name!r}, which no earlier step gives")
            step.input_map[tensor.name] = tensor.name if tensor.name in (IMAGE, FRAMES) else f"_{tensor.name}"
        last = i == len(steps) - 1
        for tensor in step_config.output:
            public = last and (tensor.name in OUTPUTS or tensor.name in EXTRA_OUTPUTS)
            step.output_map[tensor.name] = tensor.name if public else f"_{tensor.name}"
            produced.add(tensor.name)
            if last and tensor.name in EXTRA_OUTPUTS:  # e.g. instance masks, beside the detections
                config.output.add().CopyFrom(tensor)
    if set(OUTPUTS) - {t.name for t in steps[-1].output}:
        raise SpecError(f"the last step {steps[-1].name} must give {', '.join(OUTPUTS)}")
    return config


def render(config: mc.ModelConfig) -> str:
    return str(text_format.MessageToString(config))


def parse(text: str) -> mc.ModelConfig:
    try:
        return text_format.Parse(text, mc.ModelConfig())
    except text_format.ParseError as e:
        raise SpecError(f"invalid config.pbtxt: {e}") from e


def read_config(model_dir: Path) -> mc.ModelConfig:
    path = model_dir / "config.pbtxt"
    if not path.is_file():
        raise SpecError(f"no config.pbtxt in {model_dir}")
    return parse(path.read_text())
