"""A numpy stand-in for the few TensorRT network-building calls converters.tensorrt_nms makes.

It evaluates a layer graph with the semantics TensorRT documents for each layer (elementwise
broadcasting over equal ranks, gather DEFAULT/ND with element-wise dims, scatter ND, shuffle,
softmax/top-k/reduce over axis bitmasks, INMSLayer per batch item and class, sorted by batch then
score), so the graph wiring — index columns, shapes, dtypes, the padding of empty rows — is tested
on a CPU. What it cannot test is TensorRT itself (kernels, build-time checks): the gpu tests do.
Rank and dtype mismatches that TensorRT would refuse are refused here too.
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import Any, ClassVar

import numpy as np


def _enum(*names: str) -> SimpleNamespace:
    return SimpleNamespace(**{n: n for n in names})


ElementWiseOperation = _enum("SUM", "SUB", "PROD", "DIV", "MIN", "MAX", "FLOOR_DIV", "GREATER")
UnaryOperation = _enum("EXP")
GatherMode = _enum("DEFAULT", "ND")
ScatterMode = _enum("ND")
TopKOperation = _enum("MAX")
ReduceOperation = _enum("SUM")
BoundingBoxFormat = _enum("CORNER_PAIRS")
float32 = np.dtype(np.float32)
int32 = np.dtype(np.int32)
__version__ = "fake"


def _axis(bitmask: int) -> int:
    assert bitmask and bitmask & (bitmask - 1) == 0, f"exactly one axis expected, got bitmask {bitmask}"
    return bitmask.bit_length() - 1


class Tensor:
    def __init__(self, compute: Callable[[], np.ndarray], name: str = "") -> None:
        self._compute = compute
        self._value: np.ndarray | None = None
        self.name = name

    @property
    def value(self) -> np.ndarray:
        if self._value is None:
            self._value = np.asarray(self._compute())
        return self._value

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.value.shape)


class Layer:
    def __init__(self, *computes: Callable[[], np.ndarray]) -> None:
        self._outputs = [Tensor(c) for c in computes]

    def get_output(self, i: int) -> Tensor:
        return self._outputs[i]


def _elementwise(a: np.ndarray, b: np.ndarray, op: str) -> np.ndarray:
    assert a.ndim == b.ndim, f"elementwise needs equal ranks, got {a.shape} and {b.shape}"
    assert a.dtype == b.dtype, f"elementwise needs equal types, got {a.dtype} and {b.dtype}"
    fns = {
        "SUM": np.add,
        "SUB": np.subtract,
        "PROD": np.multiply,
        "DIV": np.divide,
        "MIN": np.minimum,
        "MAX": np.maximum,
        "FLOOR_DIV": np.floor_divide,
        "GREATER": np.greater,
    }
    out = fns[op](a, b)
    return out if op == "GREATER" else out.astype(a.dtype)


def _gather_nd(data: np.ndarray, indices: np.ndarray, batch_dims: int) -> np.ndarray:
    assert indices.dtype == np.int32
    depth = indices.shape[-1]
    lead = indices.shape[:-1]
    out = np.empty((*lead, *data.shape[batch_dims + depth :]), dtype=data.dtype)
    for pos in np.ndindex(*lead):
        out[pos] = data[(*pos[:batch_dims], *indices[pos])]
    return out


def _nms(layer: NMSLayer) -> tuple[np.ndarray, np.ndarray]:
    import torch
    from torchvision.ops import nms

    boxes, scores = layer.inputs[0].value, layer.inputs[1].value
    assert boxes.ndim == 3 and scores.ndim == 3 and boxes.shape[:2] == scores.shape[:2] and boxes.dtype == scores.dtype
    max_per_class = int(layer.inputs[2].value)
    iou = float(layer.inputs[3].value) if len(layer.inputs) > 3 else 0.0
    thresh = float(layer.inputs[4].value) if len(layer.inputs) > 4 else 0.0
    rows = []
    for b in range(scores.shape[0]):
        box_i, cls_i = np.nonzero(scores[b] > thresh)
        s = scores[b, box_i, cls_i]
        order = np.argsort(-s, kind="stable")[: layer.topk_box_limit]
        box_i, cls_i, s = box_i[order], cls_i[order], s[order]
        picked = []
        for c in np.unique(cls_i):
            sel = np.nonzero(cls_i == c)[0]
            keep = nms(torch.from_numpy(boxes[b, box_i[sel]]), torch.from_numpy(s[sel]), iou).numpy()[:max_per_class]
            picked.extend(sel[keep].tolist())
        picked.sort(key=lambda j: (-s[j], j))
        rows.extend([b, cls_i[j], box_i[j]] for j in picked)
    selected = np.array(rows, dtype=np.int32).reshape(-1, 3)
    return selected, np.array(len(rows), dtype=np.int32)


class NMSLayer:
    def __init__(self, boxes: Tensor, scores: Tensor, max_out: Tensor) -> None:
        self.inputs = [boxes, scores, max_out]
        self.bounding_box_format = "CORNER_PAIRS"
        self.topk_box_limit = 5000
        result: dict[str, tuple[np.ndarray, np.ndarray]] = {}

        def run() -> tuple[np.ndarray, np.ndarray]:
            if "r" not in result:
                result["r"] = _nms(self)
            return result["r"]

        self._outputs = [Tensor(lambda: run()[0]), Tensor(lambda: run()[1])]

    def set_input(self, index: int, tensor: Tensor) -> None:
        assert index == len(self.inputs), "optional inputs are set in order here"
        assert tensor.value.shape == () and tensor.value.dtype == np.float32
        self.inputs.append(tensor)

    def get_output(self, i: int) -> Tensor:
        return self._outputs[i]


class Network:
    """Starts with ``outputs`` (name -> array) marked as outputs, like a parsed core network."""

    def __init__(self, outputs: dict[str, np.ndarray]) -> None:
        self.outputs = [Tensor(lambda v=v: v, name=k) for k, v in outputs.items()]

    @property
    def num_outputs(self) -> int:
        return len(self.outputs)

    def get_output(self, i: int) -> Tensor:
        return self.outputs[i]

    def mark_output(self, tensor: Tensor) -> None:
        self.outputs.append(tensor)

    def unmark_output(self, tensor: Tensor) -> None:
        self.outputs.remove(tensor)

    def result(self) -> dict[str, np.ndarray]:
        return {t.name: t.value for t in self.outputs}

    def add_constant(self, shape: tuple[int, ...], weights: np.ndarray) -> Layer:
        assert weights.ndim == 1 and weights.size == int(np.prod(shape)), (shape, weights.shape)
        return Layer(lambda: weights.reshape(shape))

    def add_elementwise(self, a: Tensor, b: Tensor, op: str) -> Layer:
        return Layer(lambda: _elementwise(a.value, b.value, op))

    def add_unary(self, x: Tensor, op: str) -> Layer:
        assert op == "EXP"
        return Layer(lambda: np.exp(x.value))

    def add_softmax(self, x: Tensor) -> Any:
        layer = Layer()

        def compute() -> np.ndarray:
            v = x.value
            e = np.exp(v - v.max(axis=_axis(layer.axes), keepdims=True))
            return (e / e.sum(axis=_axis(layer.axes), keepdims=True)).astype(v.dtype)

        layer.axes = 0
        layer._outputs = [Tensor(compute)]
        return layer

    def add_gather(self, x: Tensor, indices: Tensor, axis: int) -> Layer:
        return Layer(lambda: np.take(x.value, indices.value, axis=axis))

    def add_gather_v2(self, x: Tensor, indices: Tensor, mode: str) -> Any:
        assert mode == "ND"
        layer = Layer()
        layer.num_elementwise_dims = 0
        layer._outputs = [Tensor(lambda: _gather_nd(x.value, indices.value, layer.num_elementwise_dims))]
        return layer

    def add_scatter(self, data: Tensor, indices: Tensor, updates: Tensor, mode: str) -> Layer:
        assert mode == "ND"

        def compute() -> np.ndarray:
            out = data.value.copy()
            idx = indices.value
            assert idx.dtype == np.int32 and updates.value.shape == idx.shape[:-1]
            out[tuple(idx.T)] = updates.value
            return out

        return Layer(compute)

    def add_shuffle(self, x: Tensor) -> Any:
        layer = Layer()
        layer.first_transpose = None
        layer.reshape_dims = None

        def compute() -> np.ndarray:
            v = x.value
            if layer.first_transpose is not None:
                v = v.transpose(layer.first_transpose)
            if layer.reshape_dims is not None:
                dims = [v.shape[i] if d == 0 else d for i, d in enumerate(layer.reshape_dims)]
                v = v.reshape(dims)
            return v

        layer._outputs = [Tensor(compute)]
        return layer

    def add_concatenation(self, tensors: list[Tensor]) -> Any:
        layer = Layer()
        layer.axis = 0
        layer._outputs = [Tensor(lambda: np.concatenate([t.value for t in tensors], axis=layer.axis))]
        return layer

    def add_nms(self, boxes: Tensor, scores: Tensor, max_out: Tensor) -> NMSLayer:
        assert max_out.value.shape == () and max_out.value.dtype == np.int32
        return NMSLayer(boxes, scores, max_out)

    def add_topk(self, x: Tensor, op: str, k: int, axes: int) -> Layer:
        assert op == "MAX" and k <= 3840
        order: dict[str, np.ndarray] = {}

        def idx() -> np.ndarray:
            if "i" not in order:
                order["i"] = np.argsort(-x.value, axis=_axis(axes), kind="stable").take(range(k), axis=_axis(axes))
            return order["i"]

        return Layer(lambda: np.take_along_axis(x.value, idx(), axis=_axis(axes)), lambda: idx().astype(np.int32))

    def add_cast(self, x: Tensor, dtype: np.dtype) -> Layer:
        return Layer(lambda: x.value.astype(dtype))

    def add_reduce(self, x: Tensor, op: str, axes: int, keep_dims: bool) -> Layer:
        assert op == "SUM"
        return Layer(lambda: x.value.sum(axis=_axis(axes), keepdims=keep_dims).astype(x.value.dtype))


# --------------------------------------------------------------------------------------------
# stand-in for an engine whose GridSample is miscompiled (NVIDIA/TensorRT #4813)
# --------------------------------------------------------------------------------------------


def miscompiled_grid_sample(onnx_path: Any, out_path: Any) -> Any:
    """The same graph with every ``GridSample`` computing the wrong sampling convention
    (``align_corners`` flipped): what a silently wrong engine returns -- it builds and runs, its
    outputs have the right shapes and plausible values, only the deformable attention samples the
    wrong places. Run by ONNX Runtime as the "engine" of a verification, it must be refused."""
    import onnx

    model = onnx.load(str(onnx_path))
    changed = 0
    for node in model.graph.node:
        if node.op_type != "GridSample":
            continue
        attrs = {a.name: a for a in node.attribute}
        if "align_corners" in attrs:
            attrs["align_corners"].i = 1 - attrs["align_corners"].i
        else:
            node.attribute.append(onnx.helper.make_attribute("align_corners", 1))
        changed += 1
    assert changed, "the graph has no GridSample to miscompile"
    onnx.save(model, str(out_path))
    return out_path


# --------------------------------------------------------------------------------------------
# stand-in for the engine build (converters.tensorrt_build.build_engine): parser, profiles, builder
# --------------------------------------------------------------------------------------------
# What it checks is what TensorRT refuses at build time for a multi-input core: an input without a
# profile, a profile of another rank, a fixed dim given another size, min > opt > max, and (like
# TensorRT 10's parser, which imports RoiAlign as the ROIAlign_TRT plugin) a RoiAlign parsed before
# the standard plugins were registered. The "plan" it writes is the ONNX itself: the tests run it with
# ONNX Runtime in place of the engine. Kernels, tactics and the plugin's numerics are the GPU check's.

BuilderFlag = _enum("FP16", "INT8", "TF32")
MemoryPoolType = _enum("WORKSPACE")
ErrorCode = _enum("UNSUPPORTED_NODE")
registered_plugins: list[str] = []  # namespaces given to init_libnvinfer_plugins, in order


class IInt8EntropyCalibrator2:
    pass


class Logger:
    WARNING = "WARNING"

    def __init__(self, level: str) -> None:
        self.level = level


def init_libnvinfer_plugins(logger: Logger, namespace: str) -> bool:
    registered_plugins.append(namespace)
    return True


class _ParserError:
    def __init__(self, node: int, op: str, desc: str) -> None:
        self._node, self._op, self._desc = node, op, desc

    def code(self) -> str:
        return "ErrorCode.UNSUPPORTED_NODE"

    def desc(self) -> str:
        return self._desc

    def node(self) -> int:
        return self._node

    def node_operator(self) -> str:
        return self._op


class ParsedNetwork:
    """The network an OnnxParser fills: input name -> dims (-1 where dynamic), and the ONNX bytes."""

    def __init__(self) -> None:
        self.inputs: dict[str, tuple[int, ...]] = {}
        self.onnx_bytes = b""


class OnnxParser:
    def __init__(self, network: ParsedNetwork, logger: Logger) -> None:
        self.network = network
        self.errors: list[_ParserError] = []

    @property
    def num_errors(self) -> int:
        return len(self.errors)

    def get_error(self, i: int) -> _ParserError:
        return self.errors[i]

    def parse_from_file(self, path: str) -> bool:
        import onnx

        model = onnx.load(path)
        for i, node in enumerate(model.graph.node):
            if node.op_type == "RoiAlign" and not registered_plugins:
                desc = "Plugin not found, are the plugin name, version, and namespace correct? (ROIAlign_TRT)"
                self.errors.append(_ParserError(i, "RoiAlign", desc))
        initializers = {t.name for t in model.graph.initializer}
        for x in model.graph.input:
            if x.name not in initializers:
                self.network.inputs[x.name] = tuple(d.dim_value if d.dim_value > 0 else -1 for d in x.type.tensor_type.shape.dim)
        self.network.onnx_bytes = model.SerializeToString()
        return not self.errors


class OptimizationProfile:
    def __init__(self) -> None:
        self.shapes: dict[str, tuple[tuple[int, ...], ...]] = {}

    def set_shape(self, name: str, lo: tuple[int, ...], opt: tuple[int, ...], hi: tuple[int, ...]) -> None:
        self.shapes[name] = (tuple(lo), tuple(opt), tuple(hi))


class _TimingCache:
    def __init__(self, data: bytes) -> None:
        self.data = data or b"fake timing cache"

    def serialize(self) -> bytes:
        return self.data


class BuilderConfig:
    def __init__(self) -> None:
        self.profiles: list[OptimizationProfile] = []
        self.flags: set[str] = {"TF32"}
        self.cache: _TimingCache | None = None

    def add_optimization_profile(self, profile: OptimizationProfile) -> int:
        self.profiles.append(profile)
        return len(self.profiles) - 1

    def set_memory_pool_limit(self, pool: str, size: int) -> None:
        pass

    def set_flag(self, flag: str) -> None:
        self.flags.add(flag)

    def clear_flag(self, flag: str) -> None:
        self.flags.discard(flag)

    def create_timing_cache(self, data: bytes) -> _TimingCache:
        return _TimingCache(data)

    def set_timing_cache(self, cache: _TimingCache, ignore_mismatch: bool) -> bool:
        self.cache = cache
        return True

    def get_timing_cache(self) -> _TimingCache:
        assert self.cache is not None
        return self.cache


class Builder:
    """``build_serialized_network`` refuses (returns None, as TensorRT does) what TensorRT would."""

    last_config: ClassVar[BuilderConfig | None] = None  # the latest build's config and refusals, for the tests
    refusals: ClassVar[list[str]] = []

    def __init__(self, logger: Logger) -> None:
        self.logger = logger

    def create_network(self, flags: int) -> ParsedNetwork:
        return ParsedNetwork()

    def create_optimization_profile(self) -> OptimizationProfile:
        return OptimizationProfile()

    def create_builder_config(self) -> BuilderConfig:
        return BuilderConfig()

    def build_serialized_network(self, network: ParsedNetwork, config: BuilderConfig) -> bytes | None:
        Builder.last_config = config
        problems = [p for profile in config.profiles for p in _profile_problems(network.inputs, profile)]
        if not config.profiles:
            problems.append("no optimization profile")
        Builder.refusals = problems
        return None if problems else network.onnx_bytes


def _profile_problems(inputs: dict[str, tuple[int, ...]], profile: OptimizationProfile) -> list[str]:
    problems = [f"{n}: not a network input" for n in profile.shapes if n not in inputs]
    for name, dims in inputs.items():
        if name not in profile.shapes:
            problems.append(f"{name}: no profile for a dynamic input" if -1 in dims else "")
            continue
        lo, opt, hi = profile.shapes[name]
        if not len(lo) == len(opt) == len(hi) == len(dims):
            problems.append(f"{name}: profile rank {len(lo)} for an input of rank {len(dims)}")
            continue
        for i, d in enumerate(dims):
            if d > 0 and not lo[i] == opt[i] == hi[i] == d:
                problems.append(f"{name}: dim {i} is fixed at {d}, the profile gives {lo[i]}/{opt[i]}/{hi[i]}")
            if not 0 <= lo[i] <= opt[i] <= hi[i]:
                problems.append(f"{name}: dim {i} needs min <= opt <= max, got {lo[i]}/{opt[i]}/{hi[i]}")
    return [p for p in problems if p]


def miscompiled_roi_align(onnx_path: Any, out_path: Any) -> Any:
    """The same graph with every ``RoiAlign`` sampling with the other pixel convention
    (``output_half_pixel`` <-> ``half_pixel``: torchvision's aligned=False vs True): what an engine whose
    RoiAlign import disagreed with the exported attribute would return -- right shapes, plausible
    values, every RoI shifted by half a feature cell."""
    import onnx

    model = onnx.load(str(onnx_path))
    changed = 0
    for node in model.graph.node:
        if node.op_type != "RoiAlign":
            continue
        attrs = {a.name: a for a in node.attribute}
        mode = attrs["coordinate_transformation_mode"].s if "coordinate_transformation_mode" in attrs else b"half_pixel"
        flipped = b"half_pixel" if mode == b"output_half_pixel" else b"output_half_pixel"
        if "coordinate_transformation_mode" in attrs:
            attrs["coordinate_transformation_mode"].s = flipped
        else:
            node.attribute.append(onnx.helper.make_attribute("coordinate_transformation_mode", flipped))
        changed += 1
    assert changed, "the graph has no RoiAlign to miscompile"
    onnx.save(model, str(out_path))
    return out_path
