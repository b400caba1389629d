"""The per-stage timing tool measures every stage of a served family, through the family seam."""

from __future__ import annotations

from detserve.runtime.samples import sample_files
from loadtest.stages import time_detector


def test_stage_timing_of_a_torchvision_family() -> None:
    blobs = list(sample_files().values())[:2]
    t = time_detector("ssdlite320_mobilenet_v3_large", {}, blobs, repeat=1)
    assert t.family == "ssd" and t.input_hw == (320, 320)
    assert t.preprocess_ms > 0 and t.core_ms > 0 and t.decode_ms > 0 and t.detections > 0
    assert t.row().startswith("| ssdlite320_mobilenet_v3_large | ssd | 320x320 |")
