from __future__ import annotations

import numpy as np
import pytest

from detserve.errors import ImageError
from detserve.imaging import decode_image
from tests.bad_images import NOT_AN_IMAGE, bomb_png, png_bytes, truncated_jpeg


def test_decodes_rgb_and_grey_to_three_channels(samples: dict[str, bytes]) -> None:
    rgb = decode_image(samples["astronaut.jpg"], 10**8)
    assert rgb.shape == (512, 512, 3) and rgb.dtype == np.uint8
    grey = decode_image(samples["camera.png"], 10**8)
    assert grey.shape == (512, 512, 3)
    assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()


def test_rgba_drops_alpha() -> None:
    img = decode_image(png_bytes(10, 6, "RGBA"), 10**6)
    assert img.shape == (6, 10, 3)


@pytest.mark.parametrize(
    "payload, fragment",
    [
        (b"", "empty image payload"),
        (NOT_AN_IMAGE, "not a decodable image"),
    ],
)
def test_bad_payloads(payload: bytes, fragment: str) -> None:
    with pytest.raises(ImageError, match=fragment):
        decode_image(payload, 10**8)


def test_truncated_jpeg(samples: dict[str, bytes]) -> None:
    with pytest.raises(ImageError, match="pixel data"):
        decode_image(truncated_jpeg(samples["astronaut.jpg"]), 10**8)


@pytest.mark.parametrize("side", [10_000, 100_000])
def test_declared_size_over_limit_is_refused_before_decoding(side: int) -> None:
    # 10k x 10k passes PIL's own bomb check and hits ours; 100k x 100k hits PIL's first
    with pytest.raises(ImageError, match="over the limit of 40000000"):
        decode_image(bomb_png(side, side), 40_000_000)


def test_limit_is_configurable() -> None:
    blob = png_bytes(100, 100)
    assert decode_image(blob, 10_000).shape == (100, 100, 3)
    with pytest.raises(ImageError, match="over the limit of 9999"):
        decode_image(blob, 9_999)
