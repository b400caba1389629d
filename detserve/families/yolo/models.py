"""The YOLO family's zoo half: everything here that imports ultralytics (AGPL-3.0).

Builds/loads models, the seeded fixture, the exported core (the network with its in-graph box
decode, as ultralytics exports it), the specs read off the live model and the reference
(ultralytics' ``DetectionPredictor`` on the same pixels). Every function that imports ultralytics
calls :func:`ultralytics_env` first, which keeps it offline, without runtime pip installs and with
its settings inside detserve's cache directory. Never imported by the serving runtime.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from detserve.errors import CheckpointError, DetserveError, SpecError
from detserve.families.yolo.spec import (
    CHECKPOINT_DETECTOR,
    DEFAULT_IMGSZ,
    DEFAULT_IOU,
    DETECTORS,
    PAD_VALUE,
    YoloDecodeSpec,
    num_anchors,
)
from detserve.specs import PreprocessSpec

if TYPE_CHECKING:
    import torch

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
    """Give an untrained YOLO class scores spread over 0..1, deterministically (a test fixture: families/spread.py).

    A random-init YOLO scores ~0 everywhere (``bias_init`` sets a prior of ~1e-4..1e-2 per class).
    The last class conv of every level (of both heads on end-to-end models) is re-drawn from ``seed``,
    scaled to ``logit_std`` on a fixed noise image and shifted (each conv on its own, from a random
    sample of 200 000 of its logits) so that about ``fraction_above`` of the (anchor, class) pairs
    score above 0.05; box convs get seeded weights scaled to std 1.5 that spread the DFL
    distributions, so boxes differ and NMS has work to do.
    """
    import torch

    from detserve.families.spread import spread_init

    head = _head(model)
    branches = [getattr(head, n, None) for n in ("cv3", "one2one_cv3", "cv2", "one2one_cv2")]
    cls_convs = [seq[-1] for branch in branches[:2] if branch is not None for seq in branch]
    box_convs = [seq[-1] for branch in branches[2:] if branch is not None for seq in branch]
    imgsz = getattr(model, "detserve_imgsz", DEFAULT_IMGSZ)

    def probe(gen: torch.Generator) -> Any:
        return model.eval()(torch.rand((1, 3, imgsz, imgsz), generator=gen))

    def random_sample(scores: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return scores[torch.randperm(scores.numel(), generator=gen)[:200_000]]

    spread_init(
        seed,
        probe,
        cls_convs,
        box_convs,
        logit_std=logit_std,
        box_std=1.5,
        fraction_above=fraction_above,
        per_layer_shift=True,
        sample=random_sample,
    )
    return model


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


def reference(model: Any, rgb: np.ndarray, score_threshold: float, iou_threshold: float | None, max_det: int) -> dict[str, Any]:
    """ultralytics' ``DetectionPredictor`` on the image (BGR, as ultralytics reads files), square ``imgsz`` canvas.

    ``iou_threshold`` None: ultralytics' default (0.7). ``rect=False``: ``YOLO.predict`` defaults to a minimal rectangle for PyTorch models, while a
    served (exported) model has one fixed square input, which is what ultralytics uses for it.
    """
    ultralytics_env()
    from ultralytics.models.yolo.detect import DetectionPredictor

    end2end = bool(getattr(model, "end2end", False))
    predictor = DetectionPredictor(
        overrides={
            "conf": score_threshold,
            "iou": DEFAULT_IOU if iou_threshold is None else iou_threshold,
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
