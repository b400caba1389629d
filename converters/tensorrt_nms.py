"""End-to-end variant (SSD family): the core network plus box decoding and NMS inside one engine.

The served design keeps NMS out of the engine (torch post-processing, exactly the eager model's).
This variant exists to measure that choice on the same GPU: it appends to the parsed core network

    softmax over classes -> drop background column 0              scores [B, M, C-1]
    decode with the fixed anchors as constants (BoxCoder.decode_single's float32 arithmetic),
    clip to the input size                                          boxes  [B, M, 4]
    INetworkDefinition.add_nms (TensorRT's built-in INMSLayer; not the deprecated
    EfficientNMS/BatchedNMS plugins), per class, the model's IoU/score thresholds
    -> selected (batch, class, box) triples, scattered back onto a [B, C-1, M] score grid (-1
       where not selected), top-k (k = detections_per_img) per image

and outputs fixed shapes per image, like the ensemble: ``num_detections`` [B, 1] int32,
``boxes`` [B, K, 4] float32 (x1, y1, x2, y2 in the *resized* input frame; :func:`to_original`
rescales), ``scores`` [B, K], ``labels`` [B, K] int32 (1..C-1, as torchvision); rows past
num_detections are zeros.

Not bit-exact with the eager model, by construction: the eager model takes the top
``topk_candidates`` per class before NMS, the NMS layer the top ``topk_box_limit`` (5000, its
maximum) (box, class) pairs per image; thresholds are fixed at build time (no per-request
controls); softmax/exp run in TensorRT's kernels. ``scripts/gpu_check.py`` (its end_to_end_nms step) reports how far
the two pipelines' detections agree. Only fixed-size cores (SSD) qualify: their anchors are
constants; RetinaNet/FCOS anchors depend on each input's padded size.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from detserve.errors import SpecError
from detserve.families.torchvision.spec import PostprocessSpec
from detserve.specs import PreprocessSpec

NMS_OUTPUTS = ("num_detections", "boxes", "scores", "labels")
TOPK_LIMIT = 3840  # ITopKLayer's largest k


@dataclass(frozen=True)
class SsdDecodeConstants:
    """The anchors and box-coder settings decoding needs, as float32 arrays broadcastable to [B, M, *]."""

    centers: np.ndarray  # [1, M, 2] (ctr_x, ctr_y)
    sizes: np.ndarray  # [1, M, 2] (width, height)
    weights: np.ndarray  # [1, 1, 4] (wx, wy, ww, wh)
    clip: np.ndarray  # [1, 1, 2] bbox_xform_clip
    image_wh: np.ndarray  # [1, 1, 4] (w, h, w, h) of the resized input, to clip boxes to

    @property
    def num_anchors(self) -> int:
        return int(self.centers.shape[1])


def check_nms_supported(pre: PreprocessSpec, post: PostprocessSpec) -> tuple[int, int]:
    """The fixed (height, width) of the input; only SSD-family cores have constant anchors."""
    if post.family != "ssd" or pre.fixed_input_hw is None or post.anchors.fixed_input_hw is None:
        raise SpecError(
            f"the end-to-end NMS engine needs a fixed-size SSD core, not a {post.family} core",
            hint="RetinaNet/FCOS anchors change with each input size; serve them with the torch post-processing",
        )
    if pre.fixed_size is None or tuple(pre.fixed_input_hw) != tuple(pre.fixed_size):
        raise SpecError(f"fixed_size {pre.fixed_size} is padded to {pre.fixed_input_hw}: boxes would need per-image clipping")
    return (int(pre.fixed_input_hw[0]), int(pre.fixed_input_hw[1]))


def ssd_decode_constants(pre: PreprocessSpec, post: PostprocessSpec) -> SsdDecodeConstants:
    """Anchor centres/sizes computed exactly as ``BoxCoder.decode_single`` computes them (float32)."""
    import torch

    from detserve.families.torchvision.decode import anchors_for

    h, w = check_nms_supported(pre, post)
    anchors, _ = anchors_for(post, (h, w))
    a = anchors.to(torch.float32)
    widths = a[:, 2] - a[:, 0]
    heights = a[:, 3] - a[:, 1]
    ctr_x = a[:, 0] + 0.5 * widths
    ctr_y = a[:, 1] + 0.5 * heights
    return SsdDecodeConstants(
        centers=torch.stack((ctr_x, ctr_y), dim=1)[None].numpy().astype(np.float32),
        sizes=torch.stack((widths, heights), dim=1)[None].numpy().astype(np.float32),
        weights=np.array(post.box_coder_weights, dtype=np.float32).reshape(1, 1, 4),
        clip=np.full((1, 1, 2), post.bbox_xform_clip, dtype=np.float32),
        image_wh=np.array([w, h, w, h], dtype=np.float32).reshape(1, 1, 4),
    )


class _Layers:
    """Thin helpers over ``INetworkDefinition`` that return tensors and keep every weight array
    alive: TensorRT reads numpy weights only when the engine is built."""

    def __init__(self, trt: Any, network: Any) -> None:
        self.trt = trt
        self.net = network
        self.keep: list[np.ndarray] = []

    def const(self, array: np.ndarray) -> Any:
        arr = np.ascontiguousarray(array)
        self.keep.append(arr)
        return self.net.add_constant(tuple(arr.shape), arr.reshape(-1)).get_output(0)

    def scalar(self, value: float | int, dtype: Any) -> Any:
        """A 0-D constant (the NMS layer's max-boxes/threshold inputs)."""
        arr = np.array([value], dtype=dtype)
        self.keep.append(arr)
        return self.net.add_constant((), arr).get_output(0)

    def op(self, a: Any, b: Any, name: str) -> Any:
        return self.net.add_elementwise(a, b, getattr(self.trt.ElementWiseOperation, name)).get_output(0)

    def take(self, x: Any, indices: list[int], axis: int) -> Any:
        return self.net.add_gather(x, self.const(np.array(indices, dtype=np.int32)), axis).get_output(0)

    def reshape(self, x: Any, dims: tuple[int, ...]) -> Any:
        """0 copies the input's dimension (the dynamic batch)."""
        layer = self.net.add_shuffle(x)
        layer.reshape_dims = dims
        return layer.get_output(0)

    def transpose(self, x: Any, perm: tuple[int, ...]) -> Any:
        layer = self.net.add_shuffle(x)
        layer.first_transpose = perm
        return layer.get_output(0)

    def gather_nd(self, data: Any, indices: Any, elementwise_dims: int = 0) -> Any:
        layer = self.net.add_gather_v2(data, indices, self.trt.GatherMode.ND)
        layer.num_elementwise_dims = elementwise_dims
        return layer.get_output(0)

    def cast(self, x: Any, dtype: Any) -> Any:
        return self.net.add_cast(x, dtype).get_output(0)


def _class_scores(ly: _Layers, logits: Any, num_columns: int) -> Any:
    """softmax over the class axis, background column 0 dropped: [B, M, C-1]."""
    softmax = ly.net.add_softmax(logits)
    softmax.axes = 1 << 2
    return ly.take(softmax.get_output(0), list(range(1, num_columns)), axis=2)


def _decode(ly: _Layers, regression: Any, k: SsdDecodeConstants) -> Any:
    """BoxCoder.decode_single on [B, M, 4] codes, then clip to the input: [B, M, 4] (x1, y1, x2, y2)."""
    d = ly.op(regression, ly.const(k.weights), "DIV")
    dxy = ly.take(d, [0, 1], axis=2)
    dwh = ly.op(ly.take(d, [2, 3], axis=2), ly.const(k.clip), "MIN")
    sizes = ly.const(k.sizes)
    ctr = ly.op(ly.op(dxy, sizes, "PROD"), ly.const(k.centers), "SUM")
    exp = ly.net.add_unary(dwh, ly.trt.UnaryOperation.EXP).get_output(0)
    half = ly.op(ly.op(exp, sizes, "PROD"), ly.const(np.full((1, 1, 1), 0.5, np.float32)), "PROD")
    concat = ly.net.add_concatenation([ly.op(ctr, half, "SUB"), ly.op(ctr, half, "SUM")])
    concat.axis = 2
    boxes = ly.op(concat.get_output(0), ly.const(np.zeros((1, 1, 1), np.float32)), "MAX")
    return ly.op(boxes, ly.const(k.image_wh), "MIN")


def _nms(ly: _Layers, boxes: Any, scores: Any, post: PostprocessSpec) -> Any:
    """INMSLayer, per image and class: selected (batch, class, box) indices [N, 3] int32."""
    layer = ly.net.add_nms(boxes, scores, ly.scalar(post.detections_per_img, np.int32))
    layer.bounding_box_format = ly.trt.BoundingBoxFormat.CORNER_PAIRS
    layer.set_input(3, ly.scalar(post.nms_thresh, np.float32))
    layer.set_input(4, ly.scalar(post.score_thresh, np.float32))
    return layer.get_output(0)


def _top_detections(ly: _Layers, scores: Any, selected: Any, m: int, c: int, k: int) -> tuple[Any, Any]:
    """Kept scores on a [B, C-1, M] grid (-1 elsewhere), flattened, top-k per image: values, indices [B, k]."""
    grid = ly.transpose(scores, (0, 2, 1))  # [B, C-1, M], the (batch, class, box) order of `selected`
    kept = ly.gather_nd(grid, selected)  # [N]
    empty = ly.op(ly.op(grid, grid, "SUB"), ly.const(np.full((1, 1, 1), -1.0, np.float32)), "SUM")
    dense = ly.net.add_scatter(empty, selected, kept, ly.trt.ScatterMode.ND).get_output(0)
    top = ly.net.add_topk(ly.reshape(dense, (0, c * m)), ly.trt.TopKOperation.MAX, k, 1 << 1)
    return top.get_output(0), top.get_output(1)


def _outputs(ly: _Layers, boxes: Any, values: Any, index: Any, m: int, k: int) -> dict[str, Any]:
    """Fixed-shape per-image outputs; rows that hold no detection (score -1) become zeros."""
    cls = ly.op(index, ly.const(np.full((1, 1), m, np.int32)), "FLOOR_DIV")
    box = ly.op(index, ly.op(cls, ly.const(np.full((1, 1), m, np.int32)), "PROD"), "SUB")
    valid = ly.op(values, ly.const(np.full((1, 1), -0.5, np.float32)), "GREATER")
    valid_f = ly.cast(valid, ly.trt.float32)
    count = ly.net.add_reduce(valid_f, ly.trt.ReduceOperation.SUM, 1 << 1, True).get_output(0)
    labels = ly.op(ly.op(cls, ly.const(np.ones((1, 1), np.int32)), "SUM"), ly.cast(valid, ly.trt.int32), "PROD")
    picked = ly.gather_nd(boxes, ly.reshape(box, (0, k, 1)), elementwise_dims=1)  # [B, k, 4]
    return {
        "num_detections": ly.cast(count, ly.trt.int32),
        "boxes": ly.op(picked, ly.reshape(valid_f, (0, k, 1)), "PROD"),
        "scores": ly.op(values, ly.const(np.zeros((1, 1), np.float32)), "MAX"),
        "labels": labels,
    }


def _core_outputs(network: Any) -> dict[str, Any]:
    outputs = {network.get_output(i).name: network.get_output(i) for i in range(network.num_outputs)}
    missing = [n for n in ("cls_logits", "bbox_regression") if n not in outputs]
    if missing:
        raise SpecError(f"the core network has no output {', '.join(missing)} (outputs: {', '.join(outputs)})")
    return outputs


def append_nms(trt: Any, network: Any, pre: PreprocessSpec, post: PostprocessSpec) -> list[np.ndarray]:
    """Replace the core's raw outputs by decoded, NMS'd detections. Returns the weights to keep alive."""
    consts = ssd_decode_constants(pre, post)
    m, c = consts.num_anchors, post.num_classes - 1
    k = min(post.detections_per_img, c * m, TOPK_LIMIT)
    raw = _core_outputs(network)
    ly = _Layers(trt, network)
    scores = _class_scores(ly, raw["cls_logits"], post.num_classes)
    boxes = _decode(ly, raw["bbox_regression"], consts)
    values, index = _top_detections(ly, scores, _nms(ly, boxes, scores, post), m, c, k)
    for tensor in raw.values():
        network.unmark_output(tensor)
    for name, tensor in _outputs(ly, boxes, values, index, m, k).items():
        tensor.name = name
        network.mark_output(tensor)
    return ly.keep


def nms_settings(post: PostprocessSpec) -> dict[str, Any]:
    """What the engine fixed at build time (recorded in its metadata)."""
    return {
        "iou_threshold": post.nms_thresh,
        "score_threshold": post.score_thresh,
        "max_detections": min(post.detections_per_img, TOPK_LIMIT),
        "max_output_boxes_per_class": post.detections_per_img,
        "topk_box_limit": "TensorRT default (5000; 2000 on SM 5.3/6.2)",
        "layer": "INetworkDefinition.add_nms (INMSLayer)",
    }


def build_nms_engine(
    onnx_path: Path,
    plan_path: Path,
    pre: PreprocessSpec,
    post: PostprocessSpec,
    max_batch_size: int,
    precision: str = "fp32",
    timing_cache: Path | None = None,
) -> Any:
    """Build the end-to-end engine (fp32 or fp16) next to the split pipeline's; returns its PlanMetadata."""
    from converters.tensorrt_build import BuildOptions, build_engine

    check_nms_supported(pre, post)
    if precision not in ("fp32", "fp16"):
        raise SpecError(f"the end-to-end NMS engine is built in fp32 or fp16, not {precision}")
    opts = BuildOptions(
        precision=precision,
        timing_cache=timing_cache,
        variant="end_to_end_nms",
        extend_network=lambda trt, net: append_nms(trt, net, pre, post),
        extra={"nms": nms_settings(post)},
    )
    return build_engine(onnx_path, plan_path, pre, max_batch_size, opts)


def to_original(boxes: Any, resized_hw: tuple[int, int], original_hw: tuple[int, int]) -> Any:
    """Engine boxes (resized frame) -> original pixels, with the served post-processing's arithmetic."""
    import torch

    from detserve.families.torchvision.decode import rescale_boxes

    n = boxes.shape[0]
    resized = torch.tensor([resized_hw], device=boxes.device).expand(n, 2)
    original = torch.tensor([original_hw], device=boxes.device).expand(n, 2)
    return rescale_boxes(boxes, resized, original)
