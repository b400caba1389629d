"""The sample photographs (detserve/samples.py: a foundation helper the families use too), for the runtime's callers."""

from __future__ import annotations

from detserve.samples import SAMPLES, sample_array, sample_bytes, sample_files, sample_photos, write_samples

__all__ = ["SAMPLES", "sample_array", "sample_bytes", "sample_files", "sample_photos", "write_samples"]
