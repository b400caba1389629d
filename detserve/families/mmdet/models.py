"""The mmdet family's zoo half: everything here imports mmdet/mmcv/mmengine (only inside functions).

Builds CenterNet / CornerNet from mmdet's own config files (the ones its wheel ships for the named
test models, or the user's ``--config``), with seeded spread weights or a ``.pth`` loaded
``weights_only``; reads the preprocessing and decode specs off the model's config; gives the
exported core (backbone + neck + head; CornerNet's corner pools replaced by the exportable rewrite
of :mod:`detserve.families.mmdet.pool`) and the reference (mmdet's ``inference_detector``: its test
pipeline, data preprocessor and ``predict``). :func:`detserve.families.mmdet.zoo.mmcv_ready` runs
before the first mmcv import. Never imported by the serving runtime.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from detserve.errors import CheckpointError, SpecError
from detserve.families.mmdet.spec import NO_NMS_IOU, MmdetDecodeSpec
from detserve.specs import PreprocessSpec

if TYPE_CHECKING:
    import torch

CHECKPOINT_DETECTOR = "mmdet"  # a user's --config (+ --checkpoint)
_CENTERNET = "centernet/centernet_r18_8xb16-crop512-140e_coco.py"
_CORNERNET = "cornernet/cornernet_hourglass104_8xb6-210e-mstest_coco.py"
# a CornerNet small enough for the fast suite: one hourglass stack of depth 2, 32 channels
_TINY_CORNERNET: dict[str, Any] = {
    "backbone": {
        "downsample_times": 2,
        "num_stacks": 1,
        "stage_channels": [32, 32, 48],
        "stage_blocks": [1, 1, 1],
        "feat_channel": 32,
    },
    "bbox_head": {"in_channels": 32, "num_feat_levels": 1},
}
DETECTORS: dict[str, tuple[str, dict[str, Any]]] = {
    "centernet_r18": (_CENTERNET, {}),
    "cornernet_hg104": (_CORNERNET, {}),
    "cornernet_tiny": (_CORNERNET, _TINY_CORNERNET),
}
_KWARGS = ("config", "max_side")
DEFAULT_MAX_SIDE = 2048
FRACTION_ABOVE = {"centernet": 1e-4, "cornernet": 0.15}  # of the (class, position) logits above a 0.05 score on the probe
LOGIT_STD = 1.0


def _mmdet() -> None:
    from detserve.families.mmdet.zoo import mmcv_ready

    mmcv_ready()
    from mmdet.utils import register_all_modules

    register_all_modules(init_default_scope=True)


def _config(detector: str, model_kwargs: dict[str, Any]) -> Any:
    from mmengine.config import Config

    path = model_kwargs.get("config")
    if path is not None:
        if not Path(path).is_file():
            raise SpecError(f"mmdet config {path} does not exist")
        return Config.fromfile(str(path))
    if detector not in DETECTORS:
        raise SpecError(
            f"unknown mmdet detector {detector!r}",
            hint=f"choose one of: {', '.join(DETECTORS)}, or '{CHECKPOINT_DETECTOR}' with --config CONFIG.py",
        )
    import mmdet

    name, overrides = DETECTORS[detector]
    cfg = Config.fromfile(str(Path(mmdet.__file__).parent / ".mim" / "configs" / name))
    cfg.merge_from_dict({f"model.{k}": v for k, v in overrides.items()})
    return cfg


def build(detector: str, num_classes: int, checkpoint: Any, model_kwargs: dict[str, Any], seed: int | None) -> Any:
    """The mmdet detector in eval mode (init_detector: ``model.cfg`` kept for its test pipeline), nothing downloaded."""
    unknown = sorted(set(model_kwargs) - set(_KWARGS))
    if unknown:
        raise SpecError(f"unknown mmdet model option(s): {', '.join(unknown)}", hint=f"valid options: {', '.join(_KWARGS)}")
    _mmdet()
    import torch
    from mmdet.apis import init_detector

    cfg = _config(detector, model_kwargs)
    if num_classes:
        cfg.model.bbox_head.num_classes = num_classes
    if cfg.model.get("neck") and cfg.model.neck.get("use_dcn"):
        raise SpecError("CenterNet with DCN needs mmcv's compiled deformable convolution", hint="use_dcn=False configs only")
    if "init_cfg" in cfg.model.backbone:
        cfg.model.backbone.init_cfg = None  # else init_weights would download ImageNet weights
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0 if seed is None else seed)
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "checkpoint is None, use COCO classes"
            model = init_detector(cfg, checkpoint=None, device="cpu", palette="none")
    _head_kind(model)
    model.detserve_max_side = int(model_kwargs.get("max_side", DEFAULT_MAX_SIDE))
    if checkpoint is not None:
        if seed is not None:
            raise SpecError("a spread-init seed replaces the head's weights; it cannot be combined with a checkpoint")
        _load(model, Path(checkpoint))
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if seed is not None:
        spread_head_init(model, seed)
    return model


def _load(model: Any, path: Path) -> None:
    import torch

    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(
            f"cannot read {path} with weights_only=True: {type(e).__name__}: {e}",
            hint="save the state dict alone: torch.save(torch.load(f, weights_only=False)['state_dict'], 'weights.pth') "
            "on a trusted file",
        ) from e
    state = data.get("state_dict", data) if isinstance(data, dict) else None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds no state dict")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path} does not fit the config's model: {e}") from e
    classes = (data.get("meta") or {}).get("dataset_meta", {}).get("classes") if isinstance(data, dict) else None
    if classes:
        model.dataset_meta = {"classes": tuple(str(c) for c in classes)}


def _head_kind(model: Any) -> str:
    from mmdet.models.dense_heads import CenterNetHead, CornerHead

    head = type(model.bbox_head)
    if head is CenterNetHead:
        return "centernet"
    if head is CornerHead:
        return "cornernet"
    raise SpecError(f"{head.__name__}: the mmdet family serves CenterNetHead and CornerHead models")


def spread_head_init(model: Any, seed: int) -> Any:
    """Seeded heads whose scores spread over 0..1 (a test fixture: families/spread.py); sizes that make boxes."""
    import torch

    from detserve.families.spread import spread_init

    head = model.bbox_head
    if _head_kind(model) == "centernet":
        cls, box = [head.heatmap_head[-1]], [head.wh_head[-1], head.offset_head[-1]]
    else:
        cls = [head.tl_heat[-1][-1].conv, head.br_heat[-1][-1].conv]
        box = [m[-1][-1].conv for m in (head.tl_emb, head.br_emb, head.tl_off, head.br_off)]
    core_net = _Core(model, _head_kind(model), 8)
    dp = model.data_preprocessor
    side = 255 if _head_kind(model) == "cornernet" else 256

    def probe(gen: torch.Generator) -> Any:
        # a photograph, not noise: the untrained backbone's statistics differ by far between the two, and the
        # fixture must spread the scores of the photos it is tested on (samples.py: no download)
        from detserve.samples import sample_array

        photo = torch.from_numpy(sample_array("astronaut")).permute(2, 0, 1)[None].float()
        photo = torch.nn.functional.interpolate(photo, size=(side, side), mode="bilinear", align_corners=False)
        photo = photo if dp._channel_conversion else photo.flip(1)
        return core_net((photo - dp.mean) / dp.std)

    def shared_classes(gen: torch.Generator) -> None:
        # CornerNet pairs corners of one class: with independent class weights a few classes dominate each
        # corner layer, different ones (the top-k top-left and bottom-right corners shared no class: 0 pairs).
        # Each class = one shared direction + 0.3 x its own, so every class peaks where the corner layer does
        if _head_kind(model) == "cornernet":
            for layer in cls:
                shared = layer.weight[:1].abs()  # positive: a corner layer peaks where its pooled features are strong
                layer.weight.copy_(shared + 0.3 * (layer.weight - shared))

    spread_init(
        seed,
        probe,
        cls,
        box,
        logit_std=LOGIT_STD,
        box_std=0.5,
        fraction_above=FRACTION_ABOVE[_head_kind(model)],
        before_probe=shared_classes,
    )
    with torch.no_grad():
        if _head_kind(model) == "centernet":
            head.wh_head[-1].bias.fill_(6.0)  # boxes ~24 px, in feature cells; positive widths
        else:
            # embeddings close: most same-class corner pairs group (distance <= 0.5), a few do not. With these and
            # 15 % of the probe's corner logits above 0.05, 25 of 78 detections on the sample photos score >= 0.05 (62 of 164
            # at half size; 3e-3 and 0.3 gave 1 of 50): pairs that group are few, so their corners must score high
            for m in (head.tl_emb[-1][-1].conv, head.br_emb[-1][-1].conv):
                m.weight.mul_(0.1)
    return model


def _test_pipeline(model: Any) -> tuple[Any, dict[str, Any]]:
    """The config's ``RandomCenterCropPad`` (test mode) and ``LoadImageFromFile``; anything else is refused."""
    steps = model.cfg.test_dataloader.dataset.pipeline
    types = [str(s["type"]).split(".")[-1] for s in steps]
    pads = [s for s, t in zip(steps, types, strict=True) if t == "RandomCenterCropPad"]
    known = {"LoadImageFromFile", "RandomCenterCropPad", "LoadAnnotations", "PackDetInputs"}
    if len(pads) != 1 or not set(types) <= known or not steps[0].get("to_float32"):
        raise SpecError(
            f"test pipeline {types}: detserve repeats LoadImageFromFile(to_float32) + RandomCenterCropPad(test_mode) only"
        )
    pad = pads[0]
    if not pad.get("test_mode") or pad["test_pad_mode"][0] != "logical_or":
        raise SpecError("RandomCenterCropPad must be test_mode with test_pad_mode ('logical_or', 2^n - 1)")
    return pad, steps[0]


def _three(values: Any) -> tuple[float, float, float]:
    a, b, c = (float(v) for v in values)
    return (a, b, c)


def preprocess_spec(model: Any) -> PreprocessSpec:
    """mmdet's test pipeline + data preprocessor: BGR float image pasted centred on a (h | m) + add canvas filled
    with RandomCenterCropPad's mean, then (x - mean) / std in the network's channel order."""
    pad, _ = _test_pipeline(model)
    dp = model.data_preprocessor
    if int(dp.pad_size_divisor) != 1 or getattr(dp, "_enable_normalize", True) is False:
        raise SpecError("the data preprocessor must normalise and pad nothing (pad_size_divisor 1)")
    fill_bgr = list(pad["mean"])[::-1] if pad["to_rgb"] else list(pad["mean"])  # what RandomCenterCropPad fills
    rgb = bool(dp._channel_conversion)
    mask = int(pad["test_pad_mode"][1])
    return PreprocessSpec(
        resize_mode="mmdet_center",
        min_size=512,
        max_size=model.detserve_max_side,
        size_divisible=mask + 1,
        image_mean=_three(dp.mean.view(-1).tolist()),
        image_std=_three(dp.std.view(-1).tolist()),
        pixel_max=1.0,
        color_order="RGB" if rgb else "BGR",
        pad_value=0.0,
        center_pad_fill=_three(fill_bgr[::-1] if rgb else fill_bgr),
        center_pad_add=int(pad.get("test_pad_add_pix", 0)),
    )


def decode_spec(model: Any, pre: PreprocessSpec) -> MmdetDecodeSpec:
    head, cfg = _head_kind(model), model.bbox_head.test_cfg
    classes = tuple((getattr(model, "dataset_meta", None) or {}).get("classes", ()))
    n = int(model.bbox_head.num_classes)
    names = tuple(str(c) for c in classes) if len(classes) == n else tuple(str(i) for i in range(n))
    common: dict[str, Any] = {"head": head, "num_classes": n, "class_names": names, "kernel": int(cfg.local_maximum_kernel)}
    if head == "centernet":
        k = int(cfg.topk)
        return MmdetDecodeSpec(**common, topk=k, nms_thresh=NO_NMS_IOU, detections_per_img=k, max_per_img=k)
    nms = cfg.nms
    if nms.get("type") != "soft_nms" or int(nms.get("offset", 0)) != 0 or "split_thr" in nms or "max_num" in nms:
        raise SpecError(f"CornerNet nms {dict(nms)}: detserve repeats soft_nms (offset 0, default split) only")
    return MmdetDecodeSpec(
        **common,
        topk=int(cfg.corner_topk),
        distance_threshold=float(cfg.distance_threshold),
        soft_nms_method=str(nms.get("method", "linear")),
        soft_nms_sigma=float(nms.get("sigma", 0.5)),
        soft_nms_min_score=float(nms.get("min_score", 1e-3)),
        max_per_img=int(cfg.max_per_img),
        nms_thresh=float(nms.get("iou_threshold", 0.3)),
        detections_per_img=int(cfg.max_per_img),
    )


class _Core:
    """images -> the head's raw maps (CornerNet: the last stack's, as ``predict`` uses); a callable, not a Module,
    so that the spread-init probe can run it on the live model."""

    def __init__(self, model: Any, head: str, steps: int) -> None:
        self.model, self.head, self.steps = model, head, steps

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        feats = self.model.extract_feat(images)
        bbox_head = self.model.bbox_head
        if self.head == "centernet":
            heat, wh, off = bbox_head.forward_single(feats[0])
            return heat, wh, off
        tl_heat, br_heat, tl_emb, br_emb, tl_off, br_off = bbox_head.forward_single(feats[-1], len(feats) - 1)
        return tl_heat, br_heat, tl_emb, br_emb, tl_off, br_off


def core(model: Any, spec: MmdetDecodeSpec) -> torch.nn.Module:
    """A copy of backbone + neck + head (last level), CornerNet's ``CornerPool``s swapped for the exportable ones."""
    _mmdet()
    import torch
    from mmcv.ops import CornerPool

    from detserve.families.mmdet.pool import ExportableCornerPool, steps_for

    net = copy.deepcopy(model).float().eval()
    steps = steps_for(int(getattr(model, "detserve_max_side", DEFAULT_MAX_SIDE)))
    for parent in list(net.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, CornerPool):
                setattr(parent, name, ExportableCornerPool(child.mode, steps))

    class MmdetCore(torch.nn.Module):
        """images [N, 3, H, W] (normalised, on their centred canvas) -> the declared raw maps at H/4 x W/4."""

        def __init__(self, net: torch.nn.Module) -> None:
            super().__init__()
            self.net = net
            self.run = _Core(net, spec.head, steps)

        def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
            return self.run(images)

    return MmdetCore(net).eval()


def reference(model: Any, rgb: np.ndarray, score_threshold: float, iou_threshold: float | None, max_det: int) -> dict[str, Any]:
    """mmdet's ``inference_detector`` on the image as BGR (as mmdet reads files), then the request's threshold
    (strictly above) and max_det; ``iou_threshold`` replaces CornerNet's soft-NMS IoU (None: the config's)."""
    _mmdet()
    from mmdet.apis import inference_detector

    cfg = model.bbox_head.test_cfg
    saved = copy.deepcopy(cfg.get("nms"))
    try:
        if iou_threshold is not None and saved is not None:
            cfg.nms.iou_threshold = iou_threshold
        result = inference_detector(model, np.ascontiguousarray(rgb[..., ::-1]))
    finally:
        if saved is not None:
            cfg.nms = saved
    pred = result.pred_instances
    keep = (pred.scores > score_threshold).nonzero().view(-1)[:max_det]
    return {
        "boxes": pred.bboxes[keep].numpy().astype(np.float32),
        "scores": pred.scores[keep].numpy().astype(np.float32),
        "labels": pred.labels[keep].numpy().astype(np.int64),
    }
