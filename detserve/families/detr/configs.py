"""The DETR family's detectors by name: plain data (no transformers import), read by the family and its builder.

Each entry: the transformers model type, the model config's keyword arguments (the backbone's under
``backbone``), and the image processor's ``size``. The full-size entries are transformers' default
configurations (RT-DETR R50-vd, RT-DETRv2 R50-vd, D-FINE with its HGNetV2 backbone, DETR ResNet-50
built with transformers' own ResNet, not timm); the ``*_tiny`` entries are small configurations of
the same architectures for tests (few layers, d_model 64, 30 queries, 320-pixel inputs), fast on a
CPU. Seeded weights only: nothing is downloaded (``use_pretrained_backbone`` is never set).
"""

from __future__ import annotations

from typing import Any

CHECKPOINT_DETECTOR = "hf"  # with --checkpoint: a save_pretrained folder (config.json + weights + preprocessor_config.json)

_TINY_RESNET: dict[str, Any] = {
    "depths": [1, 1, 1, 1],
    "hidden_sizes": [32, 64, 128, 256],
    "embedding_size": 32,
    "layer_type": "basic",
}
_TINY_RTDETR: dict[str, Any] = {
    "encoder_in_channels": [64, 128, 256],
    "encoder_hidden_dim": 64,
    "encoder_ffn_dim": 128,
    "encoder_attention_heads": 2,
    "d_model": 64,
    "decoder_in_channels": [64, 64, 64],
    "decoder_ffn_dim": 128,
    "decoder_layers": 2,
    "decoder_attention_heads": 2,
    "num_queries": 30,
}
_TINY_HGNET: dict[str, Any] = {
    "stem_channels": [3, 16, 16],
    "stage_in_channels": [16, 32, 64, 128],
    "stage_mid_channels": [16, 32, 64, 64],
    "stage_out_channels": [32, 64, 128, 256],
    "stage_num_blocks": [1, 1, 1, 1],
    "stage_numb_of_layers": [2, 2, 2, 2],
    "hidden_sizes": [32, 64, 128, 256],
    "depths": [1, 1, 1, 1],
    "out_features": ["stage2", "stage3", "stage4"],
}

FIXED_320 = {"height": 320, "width": 320}
FIXED_640 = {"height": 640, "width": 640}

# name -> (model type, config kwargs, processor size)
DETECTORS: dict[str, tuple[str, dict[str, Any], dict[str, int]]] = {
    "rtdetr_r50vd": ("rt_detr", {}, FIXED_640),
    "rtdetr_v2_r50vd": ("rt_detr_v2", {}, FIXED_640),
    "dfine": ("d_fine", {}, FIXED_640),
    "detr_resnet50": ("detr", {"backbone": {"out_features": ["stage4"]}}, {"shortest_edge": 800, "longest_edge": 1333}),
    "rtdetr_tiny": (
        "rt_detr",
        {**_TINY_RTDETR, "backbone": {**_TINY_RESNET, "out_features": ["stage2", "stage3", "stage4"]}},
        FIXED_320,
    ),
    # discrete sampling instead of grid-sample: the option that avoids TensorRT's GridSample issue
    "rtdetr_v2_tiny": (
        "rt_detr_v2",
        {
            **_TINY_RTDETR,
            "decoder_method": "discrete",
            "backbone": {**_TINY_RESNET, "out_features": ["stage2", "stage3", "stage4"]},
        },
        FIXED_320,
    ),
    "dfine_tiny": ("d_fine", {**_TINY_RTDETR, "backbone": _TINY_HGNET}, FIXED_320),
    "detr_tiny": (
        "detr",
        {
            "backbone": {**_TINY_RESNET, "out_features": ["stage4"]},
            "d_model": 64,
            "encoder_layers": 1,
            "decoder_layers": 2,
            "encoder_attention_heads": 2,
            "decoder_attention_heads": 2,
            "encoder_ffn_dim": 128,
            "decoder_ffn_dim": 128,
            "num_queries": 30,
        },
        {"shortest_edge": 256, "longest_edge": 384},
    ),
}
