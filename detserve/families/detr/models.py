"""Build, export and reference side of the DETR family: everything here imports transformers.

Never imported by the serving runtime (the decode spec and the decode live in
:mod:`detserve.families.detr.spec` and :mod:`detserve.families.detr.decode`). Every function that imports transformers calls :func:`hf_env`
first: Hugging Face Hub offline and without telemetry, so neither a build nor a reference run
probes the network; folders load with ``local_files_only``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from detserve.errors import CheckpointError, SpecError
from detserve.families.detr.configs import CHECKPOINT_DETECTOR, DETECTORS
from detserve.families.detr.spec import DEFAULT_MAX_DET, DetrDecodeSpec
from detserve.specs import PreprocessSpec

if TYPE_CHECKING:
    import torch

_SIGMOID_TYPES = ("rt_detr", "rt_detr_v2", "d_fine")


def hf_env() -> None:
    """Keep the Hugging Face Hub offline and quiet before transformers is imported.

    ``HF_HUB_OFFLINE`` and ``HF_HUB_DISABLE_TELEMETRY`` are read when huggingface_hub is imported;
    detserve never downloads (configs are built in code, folders load with ``local_files_only``),
    so a user who imported transformers before with other settings is still never online here.
    """
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"


def _classes(model_type: str) -> tuple[Any, Any, Any, Any]:
    """(config class, model class, image processor class, backbone config class) of a model type."""
    hf_env()
    import transformers as tf

    table = {
        "rt_detr": (tf.RTDetrConfig, tf.RTDetrForObjectDetection, tf.RTDetrImageProcessor, tf.RTDetrResNetConfig),
        "rt_detr_v2": (tf.RTDetrV2Config, tf.RTDetrV2ForObjectDetection, tf.RTDetrImageProcessor, tf.RTDetrResNetConfig),
        "d_fine": (tf.DFineConfig, tf.DFineForObjectDetection, tf.RTDetrImageProcessor, tf.HGNetV2Config),
        "detr": (tf.DetrConfig, tf.DetrForObjectDetection, tf.DetrImageProcessor, tf.ResNetConfig),
    }
    if model_type not in table:
        raise CheckpointError(
            f"model type {model_type!r} is not a supported DETR-family detector",
            hint=f"supported model types: {', '.join(table)}",
        )
    return table[model_type]


def build(detector: str, num_classes: int, checkpoint: Any, model_kwargs: dict[str, Any], seed: int | None) -> Any:
    """The eager ``...ForObjectDetection`` in eval mode, with its image processor attached.

    By name: a transformers config built in code (``detr.configs.DETECTORS``), weights seeded,
    nothing downloaded. With a checkpoint: a ``save_pretrained`` folder holding ``config.json``,
    the weights and ``preprocessor_config.json`` (the image processor decides the preprocessing), or,
    with a named detector, a weights file (``.safetensors``, or a ``torch.save``d state dict read with
    ``weights_only=True``) for that configuration and ``num_classes``.
    """
    import torch

    if model_kwargs:
        raise SpecError(f"unknown DETR-family model option(s): {', '.join(sorted(model_kwargs))}", hint="this family takes none")
    if checkpoint is not None and seed is not None:
        raise SpecError("a spread-init seed replaces the class heads' weights; it cannot be combined with a checkpoint")
    if checkpoint is not None and (detector == CHECKPOINT_DETECTOR or Path(checkpoint).is_dir()):
        model, processor, model_type = _load_folder(Path(checkpoint), num_classes)
    else:
        if detector not in DETECTORS:
            hint = f"choose one of: {', '.join(DETECTORS)}, or '{CHECKPOINT_DETECTOR}' with --checkpoint DIR"
            raise SpecError(f"unknown DETR-family detector {detector!r} (or no checkpoint given)", hint=hint)
        model_type, kwargs, size = DETECTORS[detector]
        config_cls, model_cls, processor_cls, backbone_cls = _classes(model_type)
        kwargs = dict(kwargs)
        backbone = kwargs.pop("backbone", None)
        if backbone is not None:
            kwargs["backbone_config"] = backbone_cls(**backbone)
        config = config_cls(num_labels=num_classes, id2label={i: str(i) for i in range(num_classes)}, **kwargs)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0 if seed is None else seed)
            model = model_cls(config)
        processor = processor_cls(size=size)
        if checkpoint is not None:
            _load_weights(model, Path(checkpoint))
    model.float().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    model.detserve_processor = processor
    model.detserve_type = model_type
    if seed is not None:
        spread_head_init(model, seed)
    return model


def _load_folder(path: Path, num_classes: int) -> tuple[Any, Any, str]:
    hf_env()
    if not path.is_dir() or not (path / "config.json").is_file():
        raise CheckpointError(
            f"{path} is not a transformers save_pretrained folder (no config.json)",
            hint="pass the folder model.save_pretrained(DIR) and processor.save_pretrained(DIR) wrote",
        )
    if not (path / "preprocessor_config.json").is_file():
        raise CheckpointError(
            f"{path} has no preprocessor_config.json: the image processor decides the preprocessing",
            hint="save the model's image processor into the same folder (processor.save_pretrained(DIR))",
        )
    from transformers import AutoConfig, AutoImageProcessor

    try:
        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
        _, model_cls, _, _ = _classes(str(config.model_type))
        model = model_cls.from_pretrained(str(path), local_files_only=True)
        processor = AutoImageProcessor.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot load {path} with transformers: {type(e).__name__}: {e}") from e
    nc = int(model.config.num_labels)
    if num_classes and num_classes != nc:
        raise CheckpointError(
            f"{path} has {nc} classes, {num_classes} were asked for", hint=f"pass --num-classes {nc} (or omit it)"
        )
    return model, processor, str(config.model_type)


def _load_weights(model: Any, path: Path) -> None:
    """A state dict for the named configuration: every key, every shape (strict), or a clear error."""
    import torch

    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    state: Any
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
            state = state.get("model", state.get("state_dict", state)) if isinstance(state, dict) else state
        model.load_state_dict(state, strict=True)
    except Exception as e:  # safetensors/torch/unpickler errors, missing or unexpected keys, shape mismatches
        raise CheckpointError(
            f"cannot load {path} into {type(model).__name__}: {type(e).__name__}: {str(e)[:500]}",
            hint="the file must hold this configuration's state dict with the same --num-classes; "
            "a save_pretrained folder brings its own configuration (detector 'hf')",
        ) from e


def spread_head_init(model: Any, seed: int, logit_std: float = 3.0, fraction_above: float = 0.2) -> Any:
    """Give an untrained model class scores spread over 0..1, deterministically (a test fixture: families/spread.py).

    transformers initialises the class heads so that every query scores the same prior (and the
    encoder's query-selection head with zero weights: the top-k over anchors is then a tie, which
    ONNX Runtime and PyTorch break differently). The query-selection head and every class head are
    re-drawn from ``seed`` (weights / sqrt(fan-in)); the class heads are then scaled together so the
    final logits have ``logit_std`` on a fixed noise image and (sigmoid models) shifted so that about
    ``fraction_above`` of the (query, class) pairs score above 0.05.
    """
    import torch

    from detserve.families.spread import spread_init

    selection = [m for n, m in model.named_modules() if n.endswith("enc_score_head") and isinstance(m, torch.nn.Linear)]
    heads: list[Any] = []
    for n, m in model.named_modules():  # RT-DETRv2 / D-FINE tie two lists of class heads: each weight once
        is_head = isinstance(m, torch.nn.Linear) and ("class_embed" in n or n.endswith("class_labels_classifier"))
        if is_head and all(m.weight is not h.weight for h in heads):
            heads.append(m)
    if not heads:
        raise SpecError(f"{type(model).__name__}: no class head found to initialise")

    def probe(gen: torch.Generator) -> Any:
        return model(pixel_values=torch.rand((1, 3, *_trace_hw(model)), generator=gen))

    spread_init(
        seed,
        probe,
        heads,
        logit_std=logit_std,
        fraction_above=fraction_above if model.detserve_type in _SIGMOID_TYPES else None,
        sample=lambda scores, gen: scores,
        logits=lambda out: out.logits.flatten(),
        fan_in=True,
        also_redrawn=selection,
        before_probe=(lambda gen: _spread_detr_queries(model, gen)) if model.detserve_type == "detr" else None,
    )
    return model


def _spread_detr_queries(model: Any, gen: torch.Generator) -> None:
    """Untrained DETR decodes every query to nearly the same output (its 0.02-std projections make
    the cross-attention uniform): seeded query embeddings, sharper cross-attention and a box MLP
    with unit gain make the queries look at different places and give different boxes."""
    import torch

    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Embedding) and "query_position" in name:
            mod.weight.copy_(torch.randn(mod.weight.shape, generator=gen))
        elif isinstance(mod, torch.nn.Linear) and (
            ("encoder_attn" in name and name.endswith(("q_proj", "k_proj"))) or "bbox_predictor" in name
        ):
            gain = 3.0 if "encoder_attn" in name else 1.5
            mod.weight.copy_(torch.randn(mod.weight.shape, generator=gen) * (gain / math.sqrt(mod.in_features)))


def _trace_hw(model: Any) -> tuple[int, int]:
    return preprocess_spec(model).trace_hw


def _size(processor: Any) -> dict[str, int]:
    size = processor.size
    keys = ("height", "width", "shortest_edge", "longest_edge", "max_height", "max_width")
    raw = dict(size) if isinstance(size, dict) else {k: getattr(size, k, None) for k in keys}
    return {k: int(v) for k, v in raw.items() if v is not None}


def preprocess_spec(model: Any) -> PreprocessSpec:
    """The attached image processor's settings as a ``resize_mode="transformers"`` spec (refusing what it cannot repeat)."""
    p = model.detserve_processor
    name = type(p).__name__
    if getattr(p, "backend", None) != "torchvision":
        raise CheckpointError(
            f"{name}: only the image processors' torchvision backend is repeated bit for bit",
            hint="save the processor with its default (torchvision) backend",
        )
    if not p.do_resize or int(p.resample) != 2 or not p.do_rescale:  # 2: PILImageResampling.BILINEAR
        raise CheckpointError(f"{name}: detserve repeats do_resize=True, resample=BILINEAR, do_rescale=True only")
    pixel_max = 1.0 / float(p.rescale_factor)
    if 1.0 / pixel_max != float(p.rescale_factor):
        raise CheckpointError(f"{name}: rescale_factor {p.rescale_factor} is not 1 / x for a float x; cannot repeat it exactly")
    if getattr(p, "pad_size", None):
        raise CheckpointError(f"{name}: a fixed pad_size is not supported (pad only to batch neighbours, the default)")
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)
    if p.do_normalize:
        mean, std = tuple(float(v) for v in p.image_mean), tuple(float(v) for v in p.image_std)
        if mean == (0.0, 0.0, 0.0) and std == (1.0, 1.0, 1.0):
            raise CheckpointError(f"{name}: do_normalize with mean 0 and std 1 is not supported (set do_normalize false)")
    size = _size(p)
    common: dict[str, Any] = {"resize_mode": "transformers", "size_divisible": 1, "image_mean": mean, "image_std": std}
    common["pixel_max"] = pixel_max
    if "height" in size and "width" in size:
        return PreprocessSpec(fixed_size=(size["height"], size["width"]), **common)
    if "shortest_edge" in size and "longest_edge" in size:
        return PreprocessSpec(min_size=size["shortest_edge"], max_size=size["longest_edge"], **common)
    raise CheckpointError(f"{name}: size {size} is not supported", hint="use height/width or shortest_edge/longest_edge")


def decode_spec(model: Any, pre: PreprocessSpec) -> DetrDecodeSpec:
    config = model.config
    model_type = model.detserve_type
    if model_type in _SIGMOID_TYPES and not bool(getattr(config, "use_focal_loss", True)):
        raise CheckpointError(f"{model_type} with use_focal_loss=False is not supported (the processor's softmax branch)")
    nc, queries = int(config.num_labels), int(config.num_queries)
    id2label = getattr(config, "id2label", None) or {}
    return DetrDecodeSpec(
        model_type=model_type,
        activation="sigmoid" if model_type in _SIGMOID_TYPES else "softmax",
        num_classes=nc,
        num_queries=queries,
        class_names=tuple(str(id2label.get(i, i)) for i in range(nc)),
        detections_per_img=min(DEFAULT_MAX_DET, queries),
    )


def core(model: Any, spec: DetrDecodeSpec) -> torch.nn.Module:
    """images [N, 3, H, W] (preprocessed) -> ``logits``, ``pred_boxes``: the whole model, no post-processing.

    DETR gets no ``pixel_mask``: the model then uses all ones, which is the processor's mask for
    an image alone on its canvas (every single-image request; batches group same-size requests).
    """
    import torch

    class DetrCore(torch.nn.Module):
        def __init__(self, net: torch.nn.Module) -> None:
            super().__init__()
            self.net = net

        def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            out = self.net(pixel_values=images)
            return out.logits, out.pred_boxes

    return DetrCore(model).eval()


def reference(model: Any, rgb: np.ndarray, score_threshold: float, iou_threshold: float | None, max_det: int) -> dict[str, Any]:
    """The image processor, the eager model and ``post_process_object_detection`` on one RGB image, by score;
    ``iou_threshold`` is ignored (no NMS)."""
    hf_env()
    import torch

    processor = model.detserve_processor
    # channels_last said, not guessed: transformers takes a [3, 3, 3] or [3, W, 3] array for channels-first
    inputs = processor(images=np.ascontiguousarray(rgb), input_data_format="channels_last", return_tensors="pt")
    with torch.no_grad():
        out = model(**inputs)
    res = processor.post_process_object_detection(out, threshold=score_threshold, target_sizes=[tuple(rgb.shape[:2])])[0]
    order = torch.argsort(res["scores"], descending=True, stable=True)[:max_det]
    return {
        "boxes": res["boxes"][order].numpy().astype(np.float32),
        "scores": res["scores"][order].numpy().astype(np.float32),
        "labels": res["labels"][order].numpy().astype(np.int64),
    }
