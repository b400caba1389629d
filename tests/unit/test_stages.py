"""The per-stage timing tool measures every stage of a served family, through the family seam."""

from __future__ import annotations

import pytest

from detserve.runtime.samples import sample_files
from loadtest.stages import as_stages, stage_table, time_detector, time_steps


def test_stage_timing_of_a_torchvision_family() -> None:
    blobs = list(sample_files().values())[:2]
    t = time_detector("ssdlite320_mobilenet_v3_large", {}, blobs, repeat=1)
    assert t.family == "ssd" and t.input_hw == (320, 320)
    assert t.preprocess_ms > 0 and t.core_ms > 0 and t.decode_ms > 0 and t.detections > 0
    assert t.row().startswith("| ssdlite320_mobilenet_v3_large | ssd | 320x320 |")


@pytest.mark.slow
def test_step_timing_of_a_multi_step_family_gets_a_table_of_its_own() -> None:
    """The multi-step path of time_steps (each core exported on the inputs the chain gives it, the torch
    steps through run_step), as `detserve stages` prints it."""
    blobs = list(sample_files().values())[:1]
    t = time_steps("fasterrcnn_mobilenet_v3_large_320_fpn", {}, blobs, repeat=1, torch_threads=1)
    assert t.family == "rcnn" and list(t.ms) == ["preprocess", "core", "proposals", "roi_core", "postprocess"]
    assert all(ms > 0 for ms in t.ms.values()) and t.detections > 0
    assert as_stages(t) is None
    table = stage_table([("fasterrcnn_mobilenet_v3_large_320_fpn", {})], repeat=1, torch_threads=1)
    assert "| detector (multi-step) |" in table and "| fasterrcnn_mobilenet_v3_large_320_fpn | 320x" in table
