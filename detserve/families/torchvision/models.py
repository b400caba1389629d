"""The torchvision family's zoo half: build a detector by name, load an optional checkpoint, give test
weights a score spread; its exported core and the eager reference.

Nothing here downloads weights: every builder is called with ``weights=None,
weights_backbone=None``; trained weights come from a local checkpoint (a state dict loaded with
``weights_only=True``, so a checkpoint cannot run code).
"""

from __future__ import annotations

import inspect
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from detserve.errors import CheckpointError, SpecError

if TYPE_CHECKING:
    import numpy as np
    import torch

    from detserve.families.torchvision.spec import PostprocessSpec
    from detserve.specs import PreprocessSpec

# name -> (module attribute in torchvision.models.detection, family)
DETECTORS: dict[str, tuple[str, str]] = {
    "ssdlite320_mobilenet_v3_large": ("ssdlite320_mobilenet_v3_large", "ssd"),
    "ssd300_vgg16": ("ssd300_vgg16", "ssd"),
    "retinanet_resnet50_fpn": ("retinanet_resnet50_fpn", "retinanet"),
    "retinanet_resnet50_fpn_v2": ("retinanet_resnet50_fpn_v2", "retinanet"),
    "fcos_resnet50_fpn": ("fcos_resnet50_fpn", "fcos"),
}


def build(detector: str, num_classes: int, checkpoint: Any, model_kwargs: dict[str, Any], seed: int | None) -> torch.nn.Module:
    """The family's ``build``: the seeded fixture (``seed``, no checkpoint) or the detector with an optional checkpoint."""
    if seed is not None:
        if checkpoint is not None:
            raise SpecError("a spread-init seed replaces the heads' weights; it cannot be combined with a checkpoint")
        return spread_init_detector(detector, num_classes, seed, **model_kwargs)
    return build_detector(detector, num_classes, checkpoint, **model_kwargs)


def preprocess_spec(model: Any) -> PreprocessSpec:
    from detserve.families.torchvision.from_model import preprocess_spec_from_model

    return preprocess_spec_from_model(model)


def family_of(name: str) -> str:
    return _lookup(name)[1]


def _lookup(name: str) -> tuple[str, str]:
    if name not in DETECTORS:
        raise SpecError(f"unknown detector {name!r}", hint=f"choose one of: {', '.join(sorted(DETECTORS))}")
    return DETECTORS[name]


def _builder(name: str) -> Callable[..., torch.nn.Module]:
    from torchvision.models import detection

    return getattr(detection, _lookup(name)[0])  # type: ignore[no-any-return]


def build_detector(
    name: str,
    num_classes: int = 91,
    checkpoint: str | Path | None = None,
    **model_kwargs: Any,
) -> torch.nn.Module:
    """The eager torchvision detector, in eval mode, with an optional checkpoint loaded."""
    builder = _builder(name)
    if num_classes < 2:
        raise SpecError(f"num_classes must be >= 2 (torchvision counts the background), got {num_classes}")
    for reserved in ("weights", "weights_backbone", "num_classes"):
        if reserved in model_kwargs:
            raise SpecError(
                f"model keyword {reserved!r} is set by detserve itself", hint="pass --num-classes / --checkpoint instead"
            )
    # torchvision forwards unknown keywords down to GeneralizedRCNNTransform(**kwargs), which
    # ignores them: a typo (min_sise=320) would be silently lost. Check them here instead.
    valid = _model_keywords(name)
    unknown = sorted(set(model_kwargs) - set(valid))
    if unknown:
        raise SpecError(f"bad keyword for {name}: {', '.join(unknown)}", hint=f"model keywords: {', '.join(valid)}")
    try:
        model = builder(weights=None, weights_backbone=None, num_classes=num_classes, **model_kwargs)
    except (TypeError, ValueError) as e:
        raise SpecError(f"bad keyword value for {name}: {e}", hint=f"model keywords: {', '.join(valid)}") from e
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
    return model.eval()


def _model_keywords(name: str) -> list[str]:
    from torchvision.models.detection.fcos import FCOS
    from torchvision.models.detection.retinanet import RetinaNet
    from torchvision.models.detection.ssd import SSD

    cls = {"ssd": SSD, "retinanet": RetinaNet, "fcos": FCOS}[family_of(name)]
    skip = {"self", "backbone", "num_classes", "anchor_generator", "head", "kwargs", "size", "weights", "weights_backbone"}
    params = set(inspect.signature(cls.__init__).parameters) | set(inspect.signature(_builder(name)).parameters)
    params |= {"min_size", "max_size", "image_mean", "image_std", "fixed_size", "size_divisible"}
    return sorted(params - skip)


def load_checkpoint(model: torch.nn.Module, path: str | Path) -> None:
    """Load a state dict (or {'model': state_dict}) safely; name what is wrong when it does not fit."""
    import torch

    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint not found: {p}")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for corrupt/unsafe files
        raise CheckpointError(
            f"cannot read checkpoint {p}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
            hint="a checkpoint must be a torch.save()d state dict (loaded with weights_only=True)",
        ) from e
    state = obj.get("model", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"checkpoint {p} holds no state dict of tensors", hint="save model.state_dict()")
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    bad_shape = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or bad_shape:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if bad_shape:
            k = bad_shape[0]
            parts.append(f"{len(bad_shape)} of another shape (e.g. {k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)})")
        raise CheckpointError(
            f"checkpoint {p} does not fit this detector: " + "; ".join(parts),
            hint="check the detector name, --num-classes and the model keywords used in training",
        )
    model.load_state_dict(state)


def _final_cls_and_reg_layers(model: torch.nn.Module) -> tuple[list[Any], list[Any]]:
    """The last conv of each classification / regression branch (SSD has one per level)."""
    import torch

    head: Any = model.head
    cls_layers: list[torch.nn.Conv2d] = []
    reg_layers: list[torch.nn.Conv2d] = []
    for branch, out in ((head.classification_head, cls_layers), (head.regression_head, reg_layers)):
        if hasattr(branch, "module_list"):  # SSD: one predictor per feature map
            for m in branch.module_list:
                convs = [c for c in m.modules() if isinstance(c, torch.nn.Conv2d)]
                out.append(convs[-1])
        else:
            name = "cls_logits" if hasattr(branch, "cls_logits") else "bbox_reg"
            out.append(getattr(branch, name))
    return cls_layers, reg_layers


def spread_head_init(
    model: torch.nn.Module, seed: int = 0, logit_std: float = 3.0, fraction_above: float = 0.002
) -> torch.nn.Module:
    """Give an untrained detector scores spread over 0..1, deterministically (families/spread.py).

    The last classification/regression convs are re-drawn from ``seed`` and measured on a fixed
    320x320 noise image: box regressions scaled to std 0.3, class logits to ``logit_std`` and shifted together
    so that about ``fraction_above`` of (anchor, class) pairs score above 0.05. For SSD's softmax the
    background logit stays 0, so a foreground score is close to sigmoid(its logit).
    """
    import torch

    from detserve.families.spread import spread_init

    cls_layers, reg_layers = _final_cls_and_reg_layers(model)
    cls_head: Any = model.head.classification_head  # type: ignore[union-attr]

    def probe(gen: torch.Generator) -> Any:
        return model.eval()(list(torch.rand((1, 3, 320, 320), generator=gen)))

    def background_zero(conv: Any, shift: float) -> None:
        ncol = int(cls_head.num_columns)
        bias = torch.full((conv.bias.numel() // ncol, ncol), shift)
        bias[:, 0] = 0.0
        conv.bias.copy_(bias.flatten())

    softmax = hasattr(cls_head, "module_list")
    kwargs: dict[str, Any] = {"set_bias": background_zero} if softmax else {}
    spread_init(seed, probe, cls_layers, reg_layers, logit_std=logit_std, box_std=0.3, fraction_above=fraction_above, **kwargs)
    return model


def spread_init_detector(name: str, num_classes: int, seed: int, **model_kwargs: Any) -> torch.nn.Module:
    """The test-fixture detector for ``seed``: backbone from ``torch.manual_seed(seed)``, heads spread.

    Every user of a seeded fixture (repository builds, the Flask baseline, tests) gets identical
    weights; the global RNG is left as it was.
    """
    import torch

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = build_detector(name, num_classes, None, **model_kwargs)
        return spread_head_init(model, seed=seed).eval()


def core(model: Any, spec: PostprocessSpec) -> torch.nn.Module:
    """backbone + head: normalised padded images -> the head's raw outputs, in declared order."""
    import torch

    from detserve.families.torchvision.spec import output_names

    class TorchvisionCore(torch.nn.Module):
        def __init__(self, model: torch.nn.Module, output_names: tuple[str, ...]) -> None:
            super().__init__()
            self.backbone: Any = model.backbone
            self.head: Any = model.head
            self.output_names = output_names

        def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
            features = self.backbone(images)
            if isinstance(features, torch.Tensor):  # SSD backbones may return one map
                features = OrderedDict([("0", features)])
            head_outputs = self.head(list(features.values()))
            return tuple(head_outputs[name] for name in self.output_names)

    return TorchvisionCore(model, output_names(spec.family)).eval()


def reference(model: Any, rgb: np.ndarray, score_threshold: float, iou_threshold: float | None, max_det: int) -> dict[str, Any]:
    """``model([image])`` with per-call thresholds, exactly as torchvision runs it."""
    import torch

    saved = (model.score_thresh, model.nms_thresh, model.detections_per_img)
    iou = saved[1] if iou_threshold is None else iou_threshold
    model.score_thresh, model.nms_thresh, model.detections_per_img = score_threshold, iou, max_det
    try:
        with torch.no_grad():
            out = model([torch.from_numpy(rgb).permute(2, 0, 1).float().div(255.0)])[0]
    finally:
        model.score_thresh, model.nms_thresh, model.detections_per_img = saved
    return {k: out[k].numpy() for k in ("boxes", "scores", "labels")}
