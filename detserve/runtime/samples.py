"""The sample photographs (detserve/samples.py: a foundation helper the families use too), for the runtime's callers."""

from __future__ import annotations

from typing import Any

from detserve.samples import SAMPLES, sample_array, sample_bytes, sample_files, sample_photos, write_samples

__all__ = ["SAMPLES", "sample_array", "sample_bytes", "sample_files", "sample_images", "sample_photos", "write_samples"]


def sample_images() -> list[Any]:
    """The sample photographs, decoded exactly as the server decodes them (the build's verification inputs)."""
    from detserve.runtime.imaging import decode_image

    return [decode_image(blob, 1 << 31) for blob in sample_files().values()]
