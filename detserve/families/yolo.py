"""The YOLO family: ultralytics YOLOv8 / YOLO11 (and YOLOv10 / YOLO26) detection models on the seam.

- Preprocessing: ultralytics' own ``LetterBox`` on a fixed square canvas (``resize_mode="ultralytics"``
  in :mod:`detserve.runtime.preprocess`: OpenCV resize of the uint8 pixels, centred pad 114, 0..1, RGB).
- Core: the network with its in-graph box decode, as ultralytics exports it: ``predictions``
  [N, 4 + nc, anchors] (xywh in input pixels + class probabilities, no NMS); an end-to-end head
  (``model_kwargs={"end2end": True}`` on YOLOv10/YOLO26) gives ``detections`` [N, k, 6] instead
  (x1y1x2y2, score, class: the head's own top-k, no NMS needed).
- Decode (:func:`decode`, torch/torchvision only): ultralytics' ``non_max_suppression`` then
  ``scale_boxes``, vectorised over the batch with per-request controls.
- Reference: ultralytics' ``DetectionPredictor`` on the same pixels.

ultralytics is AGPL-3.0: it builds/loads models, exports the core and is the parity reference. The
serving runtime (the spec type and :func:`decode`) never imports it; every function here that
does calls :func:`ultralytics_env` first, which keeps it offline, without runtime pip installs and
with its settings inside detserve's cache directory.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from detserve.errors import CheckpointError, DetserveError, SpecError
from detserve.families.base import SingleStage, TensorDecl
from detserve.specs import PreprocessSpec, RequestControls, Spec, check

if TYPE_CHECKING:
    import torch

# name -> the package's model yaml (the scale letter selects depth/width from the yaml's "scales")
DETECTORS: dict[str, str] = {
    **{f"yolov8{s}": f"yolov8{s}.yaml" for s in "nsmlx"},
    **{f"yolo11{s}": f"yolo11{s}.yaml" for s in "nsmlx"},
    **{f"yolov10{s}": f"yolov10{s}.yaml" for s in "nsmblx"},
    **{f"yolo26{s}": f"yolo26{s}.yaml" for s in "nsmlx"},
}
DEFAULT_IMGSZ = 640
CHECKPOINT_DETECTOR = "yolo"  # the detector name for a user's checkpoint (its own architecture)
PAD_VALUE = 114  # ultralytics' LetterBox fill, in uint8 pixels
# ultralytics' predict defaults: Model.predict sets conf 0.25; cfg/default.yaml iou 0.7, max_det 300;
# utils/nms.py non_max_suppression max_nms 30000 (candidate cap) and max_wh 7680 (class offset)
DEFAULT_CONF, DEFAULT_IOU, DEFAULT_MAX_DET, MAX_NMS, MAX_WH = 0.25, 0.7, 300, 30000, 7680
_KWARGS = ("imgsz", "end2end")


def ultralytics_env() -> Path:
    """Configure ultralytics before it is imported: offline, no runtime installs, settings in detserve's cache.

    ultralytics reads these switches once, at import; an ultralytics imported earlier without them
    may already have probed the network or written ``~/.config/Ultralytics``, so that is refused.
    """
    from detserve.cachedir import cache_directory

    config_dir = cache_directory() / "ultralytics"
    config_dir.mkdir(mode=0o700, exist_ok=True)
    os.environ["YOLO_OFFLINE"] = "1"  # no DNS probe, no analytics events, no downloads
    os.environ["YOLO_AUTOINSTALL"] = "False"  # never pip-install a missing requirement
    os.environ["YOLO_CONFIG_DIR"] = str(config_dir)  # settings.json lands here, not in ~/.config
    os.environ.setdefault("YOLO_VERBOSE", "False")  # no banners from library calls
    utils = sys.modules.get("ultralytics.utils")
    if utils is not None and (utils.AUTOINSTALL or utils.ONLINE or Path(utils.USER_CONFIG_DIR).parent != config_dir):
        raise DetserveError(
            "ultralytics was imported before detserve configured it (online checks, auto-install, settings in ~/.config)",
            hint="import ultralytics only through detserve, or set YOLO_OFFLINE=1 YOLO_AUTOINSTALL=False "
            f"YOLO_CONFIG_DIR={config_dir} before importing it",
        )
    if utils is None:
        _import_isolated()
    return config_dir


def _import_isolated() -> None:
    """Import ultralytics once and undo what its import changes in this process.

    Its import monkey-patches ``PIL.Image.open`` (an undecodable file then tries to import, even
    pip-check, ``pi-heif`` instead of raising Pillow's error: detserve's decoder relies on that
    error), ``torch.save``, numpy's print options, OpenCV's thread count and a few environment
    variables. detserve gives ultralytics arrays, never files, so none of that is needed: each is
    put back as it was.
    """
    import cv2
    import numpy as np
    import torch
    from PIL import Image

    saved = (Image.open, torch.save, np.get_printoptions(), cv2.getNumThreads(), dict(os.environ))
    import ultralytics.utils.patches  # noqa: F401 - the module whose import patches PIL and torch

    Image.open, torch.save = saved[0], saved[1]  # type: ignore[assignment]
    np.set_printoptions(**saved[2])
    cv2.setNumThreads(saved[3])
    for key in set(os.environ) - set(saved[4]) - {"YOLO_OFFLINE", "YOLO_AUTOINSTALL", "YOLO_CONFIG_DIR", "YOLO_VERBOSE"}:
        del os.environ[key]


@dataclass(frozen=True)
class YoloDecodeSpec(Spec):
    """How a YOLO core's output becomes detections, exactly as ultralytics' predictor does it.

    ``score_thresh``/``nms_thresh``/``detections_per_img`` are the per-request defaults (named as in
    the torchvision spec so :meth:`RequestControls.from_parameters` reads either). ``num_predictions``
    is the core's last/middle dim: anchors (NMS head) or the end-to-end head's top-k slots.
    """

    num_classes: int
    class_names: tuple[str, ...]
    imgsz: int
    strides: tuple[int, ...]
    num_predictions: int
    score_thresh: float = DEFAULT_CONF
    nms_thresh: float = DEFAULT_IOU
    detections_per_img: int = DEFAULT_MAX_DET
    max_nms: int = MAX_NMS
    max_wh: int = MAX_WH
    agnostic: bool = False
    end2end: bool = False
    family: str = "yolo"

    def __post_init__(self) -> None:
        check(self.family == "yolo", f"family must be 'yolo', got {self.family!r}")
        check(self.num_classes >= 1, f"num_classes must be >= 1, got {self.num_classes}")
        check(len(self.class_names) == self.num_classes, f"need {self.num_classes} class_names, got {len(self.class_names)}")
        check(len(self.strides) > 0 and min(self.strides) > 0, f"strides must be positive, got {self.strides}")
        check(
            self.imgsz > 0 and self.imgsz % max(self.strides) == 0,
            f"imgsz must be a positive multiple of the largest stride {max(self.strides)}, got {self.imgsz}",
        )
        anchors = num_anchors(self.imgsz, self.strides)
        expected = min(self.num_predictions, anchors) if self.end2end else anchors
        check(
            self.num_predictions == expected,
            f"num_predictions must be {expected} (anchors: {anchors}), got {self.num_predictions}",
        )
        check(0.0 <= self.score_thresh <= 1.0, f"score_thresh must be in [0, 1], got {self.score_thresh}")
        check(0.0 < self.nms_thresh <= 1.0, f"nms_thresh must be in (0, 1], got {self.nms_thresh}")
        check(self.detections_per_img >= 1, f"detections_per_img must be >= 1, got {self.detections_per_img}")
        check(self.max_nms >= 1, f"max_nms must be >= 1, got {self.max_nms}")
        check(self.max_wh > 0, f"max_wh must be > 0, got {self.max_wh}")
        check(not self.agnostic, "class-agnostic NMS is not supported (ultralytics' predict default is class-aware)")

    @property
    def output_name(self) -> str:
        return "detections" if self.end2end else "predictions"


def num_anchors(imgsz: int, strides: Sequence[int]) -> int:
    return sum((imgsz // s) ** 2 for s in strides)


# --------------------------------------------------------------------------- runtime: decode


def _scale_boxes(
    boxes: torch.Tensor, img: torch.Tensor, padded_hw: Sequence[int], resized_hw: torch.Tensor, original_hw: torch.Tensor
) -> torch.Tensor:
    """ultralytics' ``scale_boxes`` (undo the centred letterbox, clip), one row per detection of image ``img``.

    The gain is new/old side as a double cast to float32 and the pad ``round(d / 2 - 0.1)`` as
    ultralytics computes them per image; then the same float32 ops on the boxes.
    """
    import torch

    rh, rw = resized_hw[:, 0].tolist(), resized_hw[:, 1].tolist()
    oh, ow = original_hw[:, 0].tolist(), original_hw[:, 1].tolist()
    per_image = [
        (
            round((padded_hw[1] - w) / 2 - 0.1),
            round((padded_hw[0] - h) / 2 - 0.1),
            w / w0,
            h / h0,
        )
        for h, w, h0, w0 in zip(rh, rw, oh, ow, strict=True)
    ]
    pad_x, pad_y, gain_x, gain_y = (torch.tensor(v, dtype=torch.float32)[img] for v in zip(*per_image, strict=True))
    out = boxes.clone()
    out[:, 0::2] -= pad_x[:, None]
    out[:, 1::2] -= pad_y[:, None]
    out[:, 0::2] /= gain_x[:, None]
    out[:, 1::2] /= gain_y[:, None]
    lo = torch.zeros_like(out)
    hi = original_hw.to(torch.float32)[img][:, [1, 0, 1, 0]]
    return torch.minimum(torch.maximum(out, lo), hi)


def _nms_candidates(
    spec: YoloDecodeSpec, pred: torch.Tensor, controls: Sequence[RequestControls]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Conf filter of the whole batch at once: (image index, xyxy box, score, class) of every candidate."""
    import torch

    x = pred.float().transpose(1, 2)  # [N, A, 4 + nc], as ultralytics transposes
    conf, cls = x[..., 4 : 4 + spec.num_classes].max(-1)  # best class; first index on ties, like ultralytics
    thresh = torch.tensor([c.score_threshold for c in controls], dtype=torch.float32)
    img, anchor = (conf > thresh[:, None]).nonzero(as_tuple=True)  # strictly above, as ultralytics
    xywh = x[img, anchor, :4]
    half = xywh[:, 2:] / 2  # ultralytics' xywh2xyxy, same float32 ops
    boxes = torch.cat((xywh[:, :2] - half, xywh[:, :2] + half), 1)
    return img, boxes, conf[img, anchor], cls[img, anchor]


def decode(
    spec: YoloDecodeSpec,
    outputs: dict[str, torch.Tensor],
    padded_hw: Sequence[int],
    resized_hw: torch.Tensor,
    original_hw: torch.Tensor,
    controls: Sequence[RequestControls],
) -> list[dict[str, torch.Tensor]]:
    """Detections per image as ultralytics' predictor returns them (boxes in original pixels, by score)."""
    import torch

    resized_hw, original_hw = torch.as_tensor(resized_hw).reshape(-1, 2), torch.as_tensor(original_hw).reshape(-1, 2)
    n = int(resized_hw.shape[0])
    if len(controls) != n:
        raise ValueError(f"{len(controls)} controls for {n} images")
    if spec.end2end:
        img, boxes, scores, labels = _end2end_keep(outputs["detections"], controls)
    else:
        img, boxes, scores, labels = _nms_keep(spec, outputs["predictions"], controls)
    boxes = _scale_boxes(boxes, img, padded_hw, resized_hw, original_hw)
    counts = torch.bincount(img, minlength=n).tolist()
    return [
        {"boxes": b, "scores": s, "labels": c}
        for b, s, c in zip(boxes.split(counts), scores.split(counts), labels.split(counts), strict=True)
    ]


def _nms_keep(
    spec: YoloDecodeSpec, pred: torch.Tensor, controls: Sequence[RequestControls]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Candidate cap, class-aware NMS and max_det per image, on the batch's candidates.

    NMS runs once per image on exactly the float32 boxes ultralytics builds (box + class * max_wh).
    A single batched call would need an image offset on top, and at ~6e5 px a float32 ulp is
    already 0.06 px: any extra offset changes the IoUs, so an image's detections would depend on
    its position in the batch. Everything else here is batched.
    """
    import torch
    import torchvision

    img, boxes, scores, labels = _nms_candidates(spec, pred, controls)
    starts = torch.cumsum(torch.bincount(img, minlength=len(controls)), 0).tolist()
    kept: list[torch.Tensor] = []
    for i, (lo, hi) in enumerate(zip([0, *starts[:-1]], starts, strict=True)):
        idx = torch.arange(lo, hi)
        if hi - lo > spec.max_nms:  # ultralytics keeps the max_nms best candidates, sorted
            idx = idx[scores[idx].argsort(descending=True)[: spec.max_nms]]
        offset = labels[idx, None].float() * spec.max_wh
        keep = torchvision.ops.nms(boxes[idx] + offset, scores[idx], controls[i].iou_threshold)
        kept.append(idx[keep[: controls[i].max_det]])
    sel = torch.cat(kept) if kept else torch.zeros(0, dtype=torch.long)
    return img[sel], boxes[sel], scores[sel], labels[sel]


def _end2end_keep(
    det: torch.Tensor, controls: Sequence[RequestControls]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """ultralytics' end-to-end branch: score strictly above the threshold, the first max_det in the head's order."""
    import torch

    det = det.float()
    thresh = torch.tensor([c.score_threshold for c in controls], dtype=torch.float32)
    max_det = torch.tensor([c.max_det for c in controls])
    mask = det[..., 4] > thresh[:, None]
    mask &= torch.cumsum(mask, 1) <= max_det[:, None]
    img, slot = mask.nonzero(as_tuple=True)
    rows = det[img, slot]
    return img, rows[:, :4], rows[:, 4], rows[:, 5].long()


# --------------------------------------------------------------------------- build (ultralytics)


def _check_kwargs(model_kwargs: dict[str, Any]) -> tuple[int | None, bool | None]:
    unknown = sorted(set(model_kwargs) - set(_KWARGS))
    if unknown:
        raise SpecError(f"unknown YOLO model option(s): {', '.join(unknown)}", hint=f"valid options: {', '.join(_KWARGS)}")
    imgsz, end2end = model_kwargs.get("imgsz"), model_kwargs.get("end2end")
    if imgsz is not None and (isinstance(imgsz, bool) or not isinstance(imgsz, int) or imgsz <= 0):
        raise SpecError(f"imgsz must be a positive integer, got {imgsz!r}")
    if end2end is not None and not isinstance(end2end, bool):
        raise SpecError(f"end2end must be true or false, got {end2end!r}")
    return imgsz, end2end


def _head(model: Any) -> Any:
    from ultralytics.nn.modules.head import Detect, v10Detect

    head = model.model[-1]
    if type(head) not in (Detect, v10Detect):  # Segment/Pose/OBB subclass Detect: other outputs, other decode
        raise CheckpointError(
            f"{type(head).__name__} head: only YOLO detection models are supported",
            hint="use a detection checkpoint (task 'detect'), not a segment/pose/obb/classify one",
        )
    return head


def build(detector: str, num_classes: int, checkpoint: Any, model_kwargs: dict[str, Any], seed: int | None) -> Any:
    """A ``DetectionModel`` in eval mode: from the package's yaml (seeded, nothing downloaded) or a ``best.pt``.

    A checkpoint (with ``detector`` "yolo" or any name: the file decides) brings its own architecture,
    class count and names (``num_classes`` 0 = take it from the file, else it must agree).
    ultralytics checkpoints pickle the whole model, so loading one runs ``torch.load(weights_only=False)``:
    it can execute code; load only checkpoints you trust.
    """
    ultralytics_env()
    import torch

    imgsz, end2end = _check_kwargs(model_kwargs)
    if checkpoint is not None:
        if seed is not None:
            raise SpecError("a spread-init seed replaces the head's weights; it cannot be combined with a checkpoint")
        model = _load_checkpoint(Path(checkpoint), num_classes)
        imgsz = imgsz or int(getattr(model, "args", {}).get("imgsz", DEFAULT_IMGSZ) or DEFAULT_IMGSZ)
    else:
        if detector not in DETECTORS:
            hint = f"choose one of: {', '.join(DETECTORS)}, or '{CHECKPOINT_DETECTOR}' with a checkpoint"
            raise SpecError(f"unknown YOLO detector {detector!r} (or no checkpoint given)", hint=hint)
        from ultralytics.nn.tasks import DetectionModel

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0 if seed is None else seed)
            model = DetectionModel(DETECTORS[detector], nc=num_classes, verbose=False)
        model.names = {i: str(i) for i in range(num_classes)}
    head = _head(model)
    if end2end is not None:
        if end2end and getattr(head, "one2one_cv2", None) is None:
            raise SpecError(f"{detector} has no end-to-end (one-to-one) head", hint="end2end applies to YOLOv10 / YOLO26 models")
        model.end2end = end2end
    imgsz = imgsz or DEFAULT_IMGSZ
    stride = int(max(model.stride.tolist()))
    if imgsz % stride:
        raise SpecError(
            f"imgsz {imgsz} is not a multiple of the model's largest stride {stride}",
            hint=f"use e.g. {math.ceil(imgsz / stride) * stride}",
        )
    model.detserve_imgsz = imgsz  # read back by preprocess_spec/decode_spec
    model.float().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if seed is not None:
        spread_head_init(model, seed)
    return model


def _load_checkpoint(path: Path, num_classes: int) -> Any:
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    from ultralytics.nn.tasks import DetectionModel, load_checkpoint

    try:
        model, _ = load_checkpoint(str(path), device="cpu", fuse=False)
    except Exception as e:
        raise CheckpointError(f"cannot read {path} as an ultralytics checkpoint: {type(e).__name__}: {e}") from e
    if not isinstance(model, DetectionModel):
        raise CheckpointError(f"{path} holds a {type(model).__name__}, not an ultralytics DetectionModel")
    nc = int(_head(model).nc)
    if num_classes and num_classes != nc:
        raise CheckpointError(
            f"{path} has {nc} classes, {num_classes} were asked for", hint=f"pass --num-classes {nc} (or omit it)"
        )
    names = getattr(model, "names", None) or {}
    model.names = {i: str(names.get(i, i)) if isinstance(names, dict) else str(names[i]) for i in range(nc)}
    return model


def spread_head_init(model: Any, seed: int, logit_std: float = 3.0, fraction_above: float = 0.002) -> Any:
    """Give an untrained YOLO class scores spread over 0..1, deterministically (a test fixture).

    A random-init YOLO scores ~0 everywhere (``bias_init`` sets a prior of ~1e-4..1e-2 per class).
    The last class conv of every level (of both heads on end-to-end models) is re-drawn with a
    fixed seed, scaled to ``logit_std`` on a fixed noise image and shifted so that about
    ``fraction_above`` of the (anchor, class) pairs score above 0.05; box convs get seeded weights
    that spread the DFL distributions, so boxes differ and NMS has work to do.
    """
    import torch

    head = _head(model)
    gen = torch.Generator().manual_seed(seed)
    cls_convs = [
        seq[-1] for name in ("cv3", "one2one_cv3") if getattr(head, name, None) is not None for seq in getattr(head, name)
    ]
    box_convs = [
        seq[-1] for name in ("cv2", "one2one_cv2") if getattr(head, name, None) is not None for seq in getattr(head, name)
    ]
    captured: dict[int, list[torch.Tensor]] = {id(c): [] for c in cls_convs + box_convs}
    with torch.no_grad():
        for conv in cls_convs + box_convs:
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen))
            conv.bias.zero_()
        hooks = [c.register_forward_hook(lambda m, i, o: captured[id(m)].append(o.flatten())) for c in cls_convs + box_convs]
        try:
            imgsz = getattr(model, "detserve_imgsz", DEFAULT_IMGSZ)
            model.eval()(torch.rand((1, 3, imgsz, imgsz), generator=gen))
        finally:
            for h in hooks:
                h.remove()
        for conv in box_convs:
            conv.weight.mul_(1.5 / (float(torch.cat(captured[id(conv)]).std()) or 1.0))
        for conv in cls_convs:
            out = torch.cat(captured[id(conv)])
            factor = logit_std / (float(out.std()) or 1.0)
            conv.weight.mul_(factor)
            scaled = out * factor
            target = math.log(0.05 / 0.95)  # logit of 0.05
            shift = target - float(
                torch.quantile(scaled[torch.randperm(scaled.numel(), generator=gen)[:200_000]], 1 - fraction_above)
            )
            conv.bias.fill_(shift)
    return model


# --------------------------------------------------------------------------- specs, core, reference


def _imgsz(model: Any) -> int:
    return int(getattr(model, "detserve_imgsz", DEFAULT_IMGSZ))


def preprocess_spec(model: Any) -> PreprocessSpec:
    """ultralytics' predict-time letterbox for a fixed square ``imgsz``: RGB, 0..1, no mean/std."""
    imgsz = _imgsz(model)
    return PreprocessSpec(
        resize_mode="ultralytics",
        fixed_size=(imgsz, imgsz),
        size_divisible=int(max(model.stride.tolist())),
        image_mean=(0.0, 0.0, 0.0),
        image_std=(1.0, 1.0, 1.0),
        pad_value=PAD_VALUE / 255.0,
    )


def decode_spec(model: Any, pre: PreprocessSpec) -> YoloDecodeSpec:
    head = _head(model)
    imgsz = _imgsz(model)
    if pre.fixed_size != (imgsz, imgsz):
        raise SpecError(f"the preprocessing canvas {pre.fixed_size} is not the model's {imgsz}x{imgsz}")
    strides = tuple(int(s) for s in model.stride.tolist())
    anchors = num_anchors(imgsz, strides)
    end2end = bool(getattr(model, "end2end", False))
    return YoloDecodeSpec(
        num_classes=int(head.nc),
        class_names=tuple(str(model.names[i]) for i in range(int(head.nc))),
        imgsz=imgsz,
        strides=strides,
        num_predictions=min(int(head.max_det), anchors) if end2end else anchors,
        end2end=end2end,
    )


def core(model: Any, spec: YoloDecodeSpec) -> torch.nn.Module:
    """A fused copy of the network in ultralytics' export mode (what its ONNX exporter traces).

    Fusing Conv+BN is what ultralytics' predictor does too (``AutoBackend(fuse=True)``), so the core
    computes the same floats as the reference; the head returns its decoded tensor alone.
    """
    ultralytics_env()
    import copy

    import torch
    from ultralytics.nn.modules import C2f

    net = copy.deepcopy(model).float().eval()
    net.end2end = spec.end2end  # before fusing: fuse keeps only the selected branch
    net = net.fuse(verbose=False)
    for m in net.modules():
        if isinstance(m, C2f):
            m.forward = m.forward_split  # type: ignore[method-assign]  # split, not chunk: a cleaner ONNX graph (as the exporter does)
    head = _head(net)
    head.export, head.format, head.dynamic, head.shape = True, "onnx", False, None
    head.max_det = spec.num_predictions if spec.end2end else head.max_det

    class YoloCore(torch.nn.Module):
        """images [N, 3, S, S] in 0..1 -> ``predictions`` [N, 4 + nc, anchors] or ``detections`` [N, k, 6]."""

        def __init__(self, net: torch.nn.Module) -> None:
            super().__init__()
            self.net = net

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            return self.net(images)  # type: ignore[no-any-return]

    return YoloCore(net).eval()


def outputs(spec: YoloDecodeSpec) -> list[TensorDecl]:
    """The core's one output. Tolerances measured with ONNX Runtime fp32 (tests/unit/test_yolo.py):
    box coordinates are pixels up to ``imgsz`` (abs error ~1e-4 at 640), probabilities ~1e-6."""
    if spec.end2end:
        return [TensorDecl("detections", (spec.num_predictions, 6), atol=2e-3, rtol=1e-4)]
    return [TensorDecl("predictions", (4 + spec.num_classes, spec.num_predictions), atol=2e-3, rtol=1e-4)]


def reference(model: Any, rgb: np.ndarray, score_threshold: float, iou_threshold: float, max_det: int) -> dict[str, Any]:
    """ultralytics' ``DetectionPredictor`` on the image (BGR, as ultralytics reads files), square ``imgsz`` canvas.

    ``rect=False``: ``YOLO.predict`` defaults to a minimal rectangle for PyTorch models, while a
    served (exported) model has one fixed square input, which is what ultralytics uses for it.
    """
    ultralytics_env()
    from ultralytics.models.yolo.detect import DetectionPredictor

    end2end = bool(getattr(model, "end2end", False))
    predictor = DetectionPredictor(
        overrides={
            "conf": score_threshold,
            "iou": iou_threshold,
            "max_det": max_det,
            "imgsz": _imgsz(model),
            "rect": False,
            "batch": 1,
            "device": "cpu",
            "save": False,
            "verbose": False,
            "nms": False if end2end else None,
        }
    )
    result = predictor(source=np.ascontiguousarray(rgb[..., ::-1]), model=model)[0]
    boxes = result.boxes
    return {
        "boxes": boxes.xyxy.numpy().astype(np.float32),
        "scores": boxes.conf.numpy().astype(np.float32),
        "labels": boxes.cls.numpy().astype(np.int64),
    }


class YoloFamily(SingleStage):
    """ultralytics YOLO detection models (see the module docstring)."""

    name = "yolo"
    labels_are_indices = True  # ultralytics class ids 0..nc-1, in the dataset's category order

    def detectors(self) -> list[str]:
        return list(DETECTORS)

    def accepts(self, detector: str) -> bool:
        """A model name, or ``yolo``: the architecture of the checkpoint given with it."""
        return detector in DETECTORS or detector == CHECKPOINT_DETECTOR

    def build(self, detector: str, num_classes: int, checkpoint: Any, model_kwargs: dict[str, Any], seed: int | None) -> Any:
        return build(detector, num_classes, checkpoint, model_kwargs, seed)

    def preprocess_spec(self, model: Any) -> PreprocessSpec:
        return preprocess_spec(model)

    def decode_spec(self, model: Any, pre: PreprocessSpec) -> YoloDecodeSpec:
        return decode_spec(model, pre)

    def decode_spec_type(self) -> type[YoloDecodeSpec]:
        return YoloDecodeSpec

    def core(self, model: Any, spec: YoloDecodeSpec) -> torch.nn.Module:
        return core(model, spec)

    def core_selects(self, spec: Any) -> bool:
        # end-to-end heads (YOLOv10, YOLO26) pick their detections by a top-k inside the graph: near-ties
        # reorder the rows across runtimes; otherwise every output column is a fixed grid position
        return bool(spec.end2end)

    def outputs(self, spec: YoloDecodeSpec) -> list[TensorDecl]:
        return outputs(spec)

    def decode(
        self,
        spec: YoloDecodeSpec,
        outputs: dict[str, torch.Tensor],
        padded_hw: Sequence[int],
        resized_hw: torch.Tensor,
        original_hw: torch.Tensor,
        controls: Sequence[RequestControls],
    ) -> list[dict[str, torch.Tensor]]:
        return decode(spec, outputs, padded_hw, resized_hw, original_hw, controls)

    def default_num_classes(self, checkpoint: Any) -> int:
        """80 (COCO) for a model built by name; 0 = the checkpoint's own count."""
        return 0 if checkpoint is not None else 80

    def reference(
        self, model: Any, rgb: np.ndarray, score_threshold: float, iou_threshold: float | None, max_det: int
    ) -> dict[str, Any]:
        return reference(model, rgb, score_threshold, DEFAULT_IOU if iou_threshold is None else iou_threshold, max_det)


FAMILY = YoloFamily()
