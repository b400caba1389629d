"""Shared fixtures: sample photographs, small detectors with a score spread, GPU skipping."""

from __future__ import annotations

import os

import pytest

# Keep bytecode out of any model repository a test builds (Triton would reload python models).
os.environ.setdefault("PYTHONDONTWRITEBYTECODE", "1")


def _has_cuda() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:
        return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def samples() -> dict[str, bytes]:
    from detserve.runtime.samples import sample_files

    return sample_files()
