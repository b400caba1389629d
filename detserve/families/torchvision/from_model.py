"""Read a torchvision detector's own pre/post-processing settings into detserve specs.

The specs are derived from the live model (its transform, anchor generator, box coder,
thresholds and real feature-map sizes) instead of being declared by hand, so serving cannot drift
from what the eager model does. Feature-map sizes are measured by running the backbone, and the
rebuilt anchors are checked against the model's own generator before a spec is returned.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from detserve.errors import SpecError
from detserve.families.torchvision.spec import AnchorSpec, PostprocessSpec
from detserve.specs import PreprocessSpec

if TYPE_CHECKING:
    import torch

# A probe whose sides are multiples of 128 gives every FPN level (P3-P7) an exact stride; the
# check sizes are multiples of 32 but not of 64/128, so they test the ceil(H / stride) rounding.
STRIDE_PROBE_HW = (256, 384)
STRIDE_CHECK_HW = ((256, 192), (160, 320))


def _transform(model: torch.nn.Module) -> Any:
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    transform = getattr(model, "transform", None)
    if not isinstance(transform, GeneralizedRCNNTransform):
        raise SpecError(
            f"{type(model).__name__} has no torchvision GeneralizedRCNNTransform as .transform",
            hint="only torchvision SSD, RetinaNet and FCOS detectors are supported",
        )
    return transform


def preprocess_spec_from_model(model: torch.nn.Module) -> PreprocessSpec:
    """The model's own ``GeneralizedRCNNTransform`` as a :class:`PreprocessSpec`.

    Eval resizing uses ``min_size[-1]``; torchvision's ``fixed_size`` is (width, height) (it
    resizes to ``[fixed_size[1], fixed_size[0]]``) while the spec holds (height, width). Padding is
    0 after normalisation, as ``batch_images`` does.
    """
    t = _transform(model)
    fixed = None
    if t.fixed_size is not None:
        width, height = t.fixed_size
        fixed = (int(height), int(width))
    return PreprocessSpec(
        resize_mode="fixed" if fixed is not None else "torchvision",
        min_size=int(t.min_size[-1]),
        max_size=int(t.max_size),
        fixed_size=fixed,
        size_divisible=int(t.size_divisible),
        image_mean=tuple(float(v) for v in t.image_mean),  # type: ignore[arg-type]
        image_std=tuple(float(v) for v in t.image_std),  # type: ignore[arg-type]
        pad_value=0.0,
    )


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Probe in eval mode (BatchNorm must not update its statistics) and restore every module's mode."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def _feature_sizes(model: torch.nn.Module, hw: tuple[int, int]) -> list[tuple[int, int]]:
    """Real (height, width) of every feature map the backbone gives for a padded input of ``hw``."""
    import torch

    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.float32
    with _eval_mode(model), torch.no_grad():
        features = model.backbone(torch.zeros((1, 3, *hw), dtype=dtype, device=device))  # type: ignore[operator]
    maps = [features] if isinstance(features, torch.Tensor) else list(features.values())
    return [(int(f.shape[-2]), int(f.shape[-1])) for f in maps]


def _num(value: Any) -> int | float:
    """Keep integers integers (anchor sizes, steps) so JSON and the rebuilt generator see the same values."""
    return int(value) if isinstance(value, int) else float(value)


def _generator_fields(model: torch.nn.Module) -> dict[str, Any]:
    """The constructor arguments that rebuild ``model.anchor_generator`` identically."""
    from torchvision.models.detection.anchor_utils import AnchorGenerator, DefaultBoxGenerator

    gen = getattr(model, "anchor_generator", None)
    ratios = tuple(tuple(float(a) for a in r) for r in getattr(gen, "aspect_ratios", ()))
    if isinstance(gen, DefaultBoxGenerator):
        return {
            "kind": "default_boxes",
            "aspect_ratios": ratios,
            "scales": tuple(float(s) for s in gen.scales),  # explicit, so min/max_ratio play no part
            "steps": None if gen.steps is None else tuple(_num(s) for s in gen.steps),
            "clip": bool(gen.clip),
        }
    if isinstance(gen, AnchorGenerator):
        return {
            "kind": "grid",
            "sizes": tuple(tuple(_num(s) for s in size) for size in gen.sizes),
            "aspect_ratios": ratios,
        }
    raise SpecError(
        f"unsupported anchor generator {type(gen).__name__}",
        hint="only torchvision's AnchorGenerator and DefaultBoxGenerator can be rebuilt in serving",
    )


def _anchor_spec(model: torch.nn.Module, pre: PreprocessSpec) -> AnchorSpec:
    """AnchorSpec with measured feature-map sizes: fixed grids for fixed inputs, else checked strides."""
    fields = _generator_fields(model)
    if pre.fixed_input_hw is not None:
        hw = pre.fixed_input_hw
        return AnchorSpec(**fields, fixed_input_hw=hw, fixed_grid_sizes=tuple(_feature_sizes(model, hw)))
    strides = _strides(_feature_sizes(model, STRIDE_PROBE_HW), STRIDE_PROBE_HW)
    spec = AnchorSpec(**fields, strides=strides)
    for hw in STRIDE_CHECK_HW:
        real, predicted = _feature_sizes(model, hw), spec.grid_sizes(hw)
        if real != predicted:
            raise SpecError(
                f"feature maps for a {hw[0]}x{hw[1]} input are {real}, "
                f"but ceil(size / stride) with strides {strides} gives {predicted}",
                hint="this backbone's feature-map sizes cannot be predicted from strides; serve it at a fixed size",
            )
    return spec


def _strides(sizes: list[tuple[int, int]], hw: tuple[int, int]) -> tuple[int, ...]:
    """One stride per level from a probe whose sides every stride divides."""
    strides = []
    for h, w in sizes:
        if h < 1 or w < 1 or hw[0] % h or hw[1] % w or hw[0] // h != hw[1] // w:
            raise SpecError(
                f"cannot infer strides: a {hw[0]}x{hw[1]} input gives feature maps {sizes}",
                hint="the backbone must downsample height and width by the same power of two",
            )
        strides.append(hw[0] // h)
    return tuple(strides)


def _num_classes(model: torch.nn.Module) -> int:
    """Class columns of the classification head (SSD's count includes its background column 0)."""
    head = getattr(getattr(model, "head", None), "classification_head", None)
    value = getattr(head, "num_columns", None) or getattr(head, "num_classes", None)
    if not isinstance(value, int):
        raise SpecError(f"cannot find the number of classes on {type(model).__name__}.head.classification_head")
    return value


def _coder_fields(model: torch.nn.Module, family: str) -> dict[str, Any]:
    from torchvision.models.detection._utils import BoxCoder, BoxLinearCoder

    coder = getattr(model, "box_coder", None)
    if family == "fcos" and isinstance(coder, BoxLinearCoder):
        return {"normalize_by_size": bool(coder.normalize_by_size)}
    if family != "fcos" and isinstance(coder, BoxCoder):
        weights = tuple(float(w) for w in coder.weights)
        return {"box_coder_weights": weights, "bbox_xform_clip": float(coder.bbox_xform_clip)}
    raise SpecError(f"unexpected box coder {type(coder).__name__} for a {family} model")


def _check_family(model: torch.nn.Module, family: str) -> None:
    from torchvision.models.detection.fcos import FCOS
    from torchvision.models.detection.retinanet import RetinaNet
    from torchvision.models.detection.ssd import SSD

    classes = {"ssd": SSD, "retinanet": RetinaNet, "fcos": FCOS}
    if family not in classes:
        raise SpecError(f"unknown detector family {family!r}", hint=f"choose one of: {', '.join(classes)}")
    if not isinstance(model, classes[family]):
        raise SpecError(f"a {type(model).__name__} is not a torchvision {classes[family].__name__} ({family!r} family)")


def _check_anchors(model: torch.nn.Module, spec: PostprocessSpec, hw: tuple[int, int]) -> None:
    """The rebuilt generator must give the model's own anchors, bit for bit, before the spec is used."""
    import torch
    from torchvision.models.detection.image_list import ImageList

    from detserve.families.torchvision.decode import anchors_for

    ours, _ = anchors_for(spec, hw)
    feats = [torch.empty((1, 0, h, w)) for h, w in spec.anchors.grid_sizes(hw)]
    with torch.no_grad():
        theirs = model.anchor_generator(ImageList(torch.empty((1, 0, *hw)), [hw]), feats)[0]  # type: ignore[operator]
    if ours.shape != theirs.shape or not torch.equal(ours, theirs.to(ours)):
        raise SpecError(f"rebuilt anchors differ from {type(model).__name__}'s own at input {hw[0]}x{hw[1]}")


def postprocess_spec_from_model(model: torch.nn.Module, family: str) -> PostprocessSpec:
    """The model's own post-processing (thresholds, classes, box coder, anchors) as a spec.

    ``family`` is "ssd", "retinanet" or "fcos". Runs the backbone on a few zero inputs to measure
    feature-map sizes (fixed grids for SSD; FPN strides checked against two sizes).
    """
    _check_family(model, family)
    pre = preprocess_spec_from_model(model)
    spec = PostprocessSpec(
        family=family,  # type: ignore[arg-type]
        num_classes=_num_classes(model),
        anchors=_anchor_spec(model, pre),
        score_thresh=float(model.score_thresh),  # type: ignore[arg-type]
        nms_thresh=float(model.nms_thresh),  # type: ignore[arg-type]
        detections_per_img=int(model.detections_per_img),  # type: ignore[arg-type]
        topk_candidates=int(model.topk_candidates),  # type: ignore[arg-type]
        **_coder_fields(model, family),
    )
    _check_anchors(model, spec, pre.fixed_input_hw or STRIDE_CHECK_HW[0])
    return spec
