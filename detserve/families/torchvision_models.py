"""Build a torchvision detector by name, load an optional checkpoint, give test weights a score spread.

Nothing here downloads weights: every builder is called with ``weights=None,
weights_backbone=None``; trained weights come from a local checkpoint (a state dict loaded with
``weights_only=True``, so a checkpoint cannot run code).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from detserve.errors import CheckpointError, SpecError

if TYPE_CHECKING:
    import torch

# name -> (module attribute in torchvision.models.detection, family)
DETECTORS: dict[str, tuple[str, str]] = {
    "ssdlite320_mobilenet_v3_large": ("ssdlite320_mobilenet_v3_large", "ssd"),
    "ssd300_vgg16": ("ssd300_vgg16", "ssd"),
    "retinanet_resnet50_fpn": ("retinanet_resnet50_fpn", "retinanet"),
    "retinanet_resnet50_fpn_v2": ("retinanet_resnet50_fpn_v2", "retinanet"),
    "fcos_resnet50_fpn": ("fcos_resnet50_fpn", "fcos"),
}


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
    """Give an untrained detector scores spread over 0..1, deterministically.

    A randomly initialised detector gives near-uniform scores, which cannot test NMS, thresholds
    or parity. This re-initialises the last classification/regression convs with a fixed seed,
    then, measured on a fixed noise image, scales the class logits to ``logit_std`` and shifts
    them so that about ``fraction_above`` of (anchor, class) pairs score above 0.05; box
    regressions are kept moderate. Not a trained model: a test fixture with a score spread.
    """
    import math

    import torch

    gen = torch.Generator().manual_seed(seed)
    cls_layers, reg_layers = _final_cls_and_reg_layers(model)
    for conv in cls_layers + reg_layers:
        with torch.no_grad():
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen))
            if conv.bias is not None:
                conv.bias.zero_()
    captured: dict[int, list[torch.Tensor]] = {id(c): [] for c in cls_layers + reg_layers}
    hooks = [c.register_forward_hook(lambda m, i, o: captured[id(m)].append(o.flatten())) for c in cls_layers + reg_layers]
    try:
        with torch.no_grad():
            model.eval()(list(torch.rand((1, 3, 320, 320), generator=gen)))
    finally:
        for h in hooks:
            h.remove()
    cls_head: Any = model.head.classification_head  # type: ignore[union-attr]
    softmax = hasattr(cls_head, "module_list")
    with torch.no_grad():
        for conv in reg_layers:
            conv.weight.mul_(0.3 / (float(torch.cat(captured[id(conv)]).std()) or 1.0))
        scaled = []
        for conv in cls_layers:
            out = torch.cat(captured[id(conv)])
            factor = logit_std / (float(out.std()) or 1.0)
            conv.weight.mul_(factor)
            scaled.append(out * factor)
        # shift so that `fraction_above` of the logits pass logit(0.05); for SSD's softmax the
        # background logit stays 0, so a foreground score is close to sigmoid(its logit).
        shift = math.log(0.05 / 0.95) - float(torch.quantile(torch.cat(scaled)[:1_000_000], 1.0 - fraction_above))
        for conv in cls_layers:
            if softmax:
                ncol = int(cls_head.num_columns)
                bias = torch.full((conv.bias.numel() // ncol, ncol), shift)
                bias[:, 0] = 0.0
                conv.bias.copy_(bias.flatten())
            else:
                conv.bias.fill_(shift)
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
