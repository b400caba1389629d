"""Real photographs for demos, checks and the seeded test fixtures, from scikit-image (nothing is downloaded).

Several sizes and aspect ratios, one grey, encoded as JPEG or PNG so they go through the same
decoder as any user's image. A foundation helper: the families calibrate their seeded fixtures on
these photographs and may not import the runtime, which re-exports them (detserve/runtime/samples.py).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

# name -> encoding; camera is grey, chelsea/coffee/rocket are not square
SAMPLES: dict[str, str] = {"astronaut": "JPEG", "chelsea": "PNG", "coffee": "JPEG", "camera": "PNG", "rocket": "JPEG"}


def sample_array(name: str) -> np.ndarray:
    from skimage import data

    return np.ascontiguousarray(getattr(data, name)())


def sample_bytes(name: str) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(sample_array(name)).save(buf, format=SAMPLES[name], **({"quality": 92} if SAMPLES[name] == "JPEG" else {}))
    return buf.getvalue()


def sample_files() -> dict[str, bytes]:
    """file name -> encoded bytes, for every sample."""
    return {f"{name}.{'jpg' if fmt == 'JPEG' else 'png'}": sample_bytes(name) for name, fmt in SAMPLES.items()}


def sample_photos() -> list[np.ndarray]:
    """Every sample file decoded to uint8 RGB [H, W, 3], the pixels the server's decoder gives for them
    (runtime/imaging.py converts 8-bit grey and RGB files with Pillow's ``convert("RGB")`` too)."""
    from PIL import Image

    return [np.array(Image.open(io.BytesIO(blob)).convert("RGB"), dtype=np.uint8) for blob in sample_files().values()]


def write_samples(out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for filename, blob in sample_files().items():
        path = out / filename
        path.write_bytes(blob)
        paths.append(path)
    return paths
