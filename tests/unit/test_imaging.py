"""decode_image: every kind of input docs/inputs.md lists, decoded or refused as it says."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable, Iterator

import numpy as np
import pytest
from PIL import Image

from detserve.errors import ImageError
from detserve.runtime.imaging import decode_image, load_image, open_request_images
from detserve.runtime.preprocess import preprocess
from detserve.specs import PreprocessSpec
from tests.bad_images import (
    EPS,
    NOT_AN_IMAGE,
    bomb_gif,
    bomb_jpeg,
    bomb_png,
    bomb_tiff,
    bomb_webp,
    cmyk_jpeg,
    encode,
    exif_rotated_jpeg,
    gradient,
    of_mode,
    palette_png,
    pgm16,
    png16,
    png_bytes,
    tiff_grey,
    truncated_jpeg,
    unusual_images,
)

UNUSUAL = unusual_images()


def test_decodes_rgb_and_grey_to_three_channels(samples: dict[str, bytes]) -> None:
    rgb = decode_image(samples["astronaut.jpg"], 10**8)
    assert rgb.shape == (512, 512, 3) and rgb.dtype == np.uint8
    grey = decode_image(samples["camera.png"], 10**8)
    assert grey.shape == (512, 512, 3)
    assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()


@pytest.mark.parametrize("name", sorted(UNUSUAL))
def test_unusual_inputs_decode_to_writable_uint8_rgb(name: str) -> None:
    rgb = decode_image(UNUSUAL[name], 10**6)
    assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3
    assert rgb.flags.writeable  # torch.from_numpy warns on (and later misuses) read-only buffers


@pytest.mark.parametrize(
    "name", ["grey L png", "grey L jpeg", "LA png", "1-bit png", "16-bit grey png", "grey tiff", "16-bit pgm"]
)
def test_grey_inputs_become_three_equal_channels(name: str) -> None:
    rgb = decode_image(UNUSUAL[name], 10**6)
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()


def test_la_keeps_the_grey_and_drops_alpha() -> None:
    la = Image.fromarray(gradient()).convert("LA")
    la.putalpha(0)  # fully transparent: the stored grey is still what the model sees
    rgb = decode_image(encode(la, "PNG"), 10**6)
    assert np.array_equal(rgb[..., 0], np.asarray(la)[..., 0])


def test_rgba_drops_alpha_without_compositing() -> None:
    assert decode_image(png_bytes(10, 6, "RGBA"), 10**6).shape == (6, 10, 3)
    im = Image.new("RGBA", (4, 4), (200, 100, 50, 0))  # transparent, not blended onto white or black
    assert (decode_image(encode(im, "PNG"), 10**6) == (200, 100, 50)).all()


def test_16bit_grey_is_scaled_by_its_high_byte_not_clipped() -> None:
    values = np.array([[0, 255, 256, 4095, 32768, 65535]], dtype=np.uint16)
    rgb = decode_image(png16(values), 10**6)
    assert rgb[0, :, 0].tolist() == [0, 0, 1, 15, 128, 255]
    # what Pillow's convert("RGB") alone would give: everything above 255 turns white
    clipped = np.asarray(Image.fromarray(values).convert("RGB"))[0, :, 0]
    assert clipped.tolist() == [0, 255, 255, 255, 255, 255]


def test_16bit_grey_decodes_like_the_same_16bit_rgb() -> None:
    """Pillow reads 16-bit RGB PNGs by their high byte; grey must agree with it."""
    values = (np.arange(48 * 64, dtype=np.uint32).reshape(48, 64) * 21).astype(np.uint16)
    grey = decode_image(png16(values), 10**6)
    rgb = decode_image(png16(np.stack([values] * 3, axis=-1)), 10**6)
    assert np.array_equal(grey, rgb)
    assert np.array_equal(grey[..., 0], (values >> 8).astype(np.uint8))


def test_16bit_grey_tiff_and_pgm_follow_the_same_rule() -> None:
    values = np.array([[0, 300, 40000, 65535]], dtype=np.uint16)
    tiff = decode_image(encode(Image.fromarray(values), "TIFF"), 10**6)
    assert tiff[0, :, 0].tolist() == [0, 1, 156, 255]
    # Pillow scales a PGM's maxval to 0..65535 (mode "I"); 4095 is the top of a 12-bit PGM
    assert decode_image(pgm16([0, 300, 65535]), 10**6)[0, :, 0].tolist() == [0, 1, 255]
    assert decode_image(pgm16([4095], maxval=4095), 10**6)[0, 0, 0] == 255


@pytest.mark.parametrize(
    "array, fragment",
    [
        (np.full((4, 4), 70_000, np.int32), "32-bit integer pixels in 70000..70000, outside 0..65535"),
        (np.full((4, 4), -5, np.int32), "32-bit integer pixels in -5..-5"),
        (np.full((4, 4), 0.5, np.float32), "floating-point pixels (mode F)"),
    ],
)
def test_pixels_without_an_8bit_mapping_are_refused(array: np.ndarray, fragment: str) -> None:
    with pytest.raises(ImageError, match="TIFF image has") as e:
        decode_image(encode(Image.fromarray(array), "TIFF"), 10**6)
    assert fragment in e.value.message and e.value.hint


def test_cmyk_jpeg_becomes_rgb_without_colour_management() -> None:
    rgb = decode_image(cmyk_jpeg((0, 255, 255, 0)), 10**6)  # pure cyan-free magenta+yellow = red
    assert np.abs(rgb.astype(int) - (255, 0, 0)).max() <= 8  # JPEG rounding only


@pytest.mark.parametrize("transparent_index", [None, 1])
def test_palette_png_looks_up_colours_and_ignores_transparency(transparent_index: int | None) -> None:
    rgb = decode_image(palette_png(transparent_index), 10**6)
    assert (rgb[:, :2] == (10, 20, 30)).all() and (rgb[:, 2:] == (200, 100, 50)).all()


def test_exif_orientation_is_not_applied() -> None:
    """Policy: pixels as stored, as torchvision's training reads see them (docs/inputs.md)."""
    blob = exif_rotated_jpeg(width=40, height=20, orientation=6)
    with Image.open(io.BytesIO(blob)) as im:
        assert im.getexif()[0x0112] == 6
        stored = np.asarray(im.convert("RGB"))
    rgb = decode_image(blob, 10**6)
    assert rgb.shape == (20, 40, 3)  # applied, it would be 40 high and 20 wide
    assert np.array_equal(rgb, stored)


def test_multi_frame_files_use_the_first_frame() -> None:
    assert decode_image(UNUSUAL["MPO jpeg"], 10**6).shape == (24, 32, 3)
    assert (decode_image(UNUSUAL["animated gif"], 10**6) == (0, 1, 2)).all()  # frame 0 is palette index 0
    frames = [Image.new("RGB", (8, 8), (50 * i, 0, 0)) for i in range(3)]
    for fmt, save in (("WEBP", {"lossless": True}), ("TIFF", {})):
        blob = encode(frames[0], fmt, save_all=True, append_images=frames[1:], **save)
        assert (decode_image(blob, 10**6) == (0, 0, 0)).all(), fmt


@pytest.mark.parametrize(
    "payload, fragment",
    [
        (b"", "empty image payload"),
        (NOT_AN_IMAGE, "not a JPEG, PNG, GIF, BMP, TIFF, WEBP, PPM file"),
        (bytes(100), "not a JPEG, PNG"),
        (EPS, "not a JPEG, PNG"),  # Pillow would hand EPS to Ghostscript; we do not open it at all
        (b"\x89PNG\r\n\x1a\n", "starts like PNG, but its header is invalid or cut short"),
        (b"\xff\xd8\xff", "starts like JPEG"),
        (bomb_png(0, 10), "starts like PNG"),  # zero width
        (bomb_jpeg(8, 0), "starts like JPEG"),  # zero height
        (tiff_grey(0, 4, b""), "starts like TIFF"),
        (of_mode("P", "GIF")[:100], "starts like GIF"),
        (of_mode("RGB")[:3000], "cannot decode PNG pixel data"),
        (of_mode("RGB", "BMP")[:500], "cannot decode BMP pixel data"),
        (tiff_grey(8, 6, bytes(10)), "cannot decode TIFF pixel data"),
        (of_mode("RGB", "WEBP")[:300], "not a decodable image (300 bytes)"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_bad_payloads(payload: bytes, fragment: str) -> None:
    with pytest.raises(ImageError) as e:
        decode_image(payload, 10**8)
    assert fragment in e.value.message


def test_truncated_jpeg(samples: dict[str, bytes]) -> None:
    with pytest.raises(ImageError, match="cannot decode JPEG pixel data"):
        decode_image(truncated_jpeg(samples["astronaut.jpg"]), 10**8)


class PixelDecodingStarted(BaseException):
    """Not an Exception, so decode_image's own error handling cannot turn it into an ImageError."""


@contextlib.contextmanager
def no_pixel_decoding(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Fail if any pixel decoder is created: "refused before decoding" means exactly that."""
    from PIL import WebPImagePlugin

    def refuse(*args: object, **kwargs: object) -> None:
        raise PixelDecodingStarted

    with monkeypatch.context() as m:
        m.setattr(Image, "_getdecoder", refuse)
        m.setattr(WebPImagePlugin.WebPImageFile, "load", refuse)
        yield


BOMBS: dict[str, Callable[[int, int], bytes]] = {
    "png": bomb_png,
    "jpeg": bomb_jpeg,
    "gif": bomb_gif,
    "tiff": bomb_tiff,
    "webp": bomb_webp,
}


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "TIFF", "WEBP"])
def test_the_decoder_spy_sees_decoding(fmt: str, monkeypatch: pytest.MonkeyPatch) -> None:
    blob = of_mode("RGB", fmt, 8, 8)
    with no_pixel_decoding(monkeypatch), pytest.raises(PixelDecodingStarted):
        decode_image(blob, 10**6)


@pytest.mark.parametrize("fmt", sorted(BOMBS))
@pytest.mark.parametrize("side", [10_000, 16_000])
def test_declared_size_over_limit_is_refused_before_decoding(fmt: str, side: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # 10k x 10k passes Pillow's own bomb check and hits ours; 16k x 16k hits Pillow's first.
    # Undetected, libjpeg and the GIF decoder would fill a 300 MB canvas from these ~200 bytes.
    blob = BOMBS[fmt](side, side)
    assert len(blob) < 2000
    with no_pixel_decoding(monkeypatch), pytest.raises(ImageError, match="over the limit of 40000000") as e:
        decode_image(blob, 40_000_000)
    assert e.value.hint and "--max-image-pixels" in e.value.hint
    if side == 10_000:
        assert f"{fmt.upper()} image declares 10000x10000 = 100000000 pixels" in e.value.message


def test_png_declaring_100k_square_is_refused() -> None:
    with pytest.raises(ImageError, match="over the limit of 40000000"):
        decode_image(bomb_png(100_000, 100_000), 40_000_000)


def test_limit_is_configurable() -> None:
    blob = png_bytes(100, 100)
    assert decode_image(blob, 10_000).shape == (100, 100, 3)
    with pytest.raises(ImageError, match="over the limit of 9999"):
        decode_image(blob, 9_999)


FCOS_SPEC = PreprocessSpec(resize_mode="torchvision", min_size=256, max_size=320)


def test_tiny_images_preprocess() -> None:
    for spec in (FCOS_SPEC, PreprocessSpec(resize_mode="fixed", fixed_size=(320, 320), size_divisible=1)):
        out = preprocess(decode_image(png_bytes(1, 1), 10**6), spec)
        assert out.original_hw == (1, 1) and out.tensor.shape[0] == 3


def test_extreme_aspect_ratio_is_refused_clearly() -> None:
    with pytest.raises(ImageError, match="aspect"):
        preprocess(decode_image(png_bytes(1000, 1), 10**6), FCOS_SPEC)


# --- the per-request pixel budget (issue 20, finding 5): the sum of a request's declared pixels


def test_request_over_pixel_budget_is_refused_before_any_image_is_decoded(monkeypatch: pytest.MonkeyPatch) -> None:
    # 8 bomb headers of 6000 x 6000 (each within the per-image limit): 288 M pixels from ~2 KB each
    blobs = [bomb_png(6000, 6000)] * 8
    with no_pixel_decoding(monkeypatch), pytest.raises(ImageError) as e:
        open_request_images(blobs, 40_000_000, 64_000_000)
    assert "request declares 288000000 pixels in its 8 image(s), over the per-request budget of 64000000" in e.value.message
    assert e.value.hint and "--max-request-pixels" in e.value.hint and "DETSERVE_MAX_REQUEST_PIXELS" in e.value.hint


def test_request_at_the_pixel_budget_decodes() -> None:
    blobs = [png_bytes(100, 100), png_bytes(50, 20)]
    opened = open_request_images(blobs, 10_000, 11_000)
    assert [load_image(im, len(b)).shape for im, b in zip(opened, blobs, strict=True)] == [(100, 100, 3), (20, 50, 3)]
    with pytest.raises(ImageError, match="request declares 11000 pixels in its 2 image"):
        open_request_images(blobs, 10_000, 10_999)


def test_per_image_limit_still_names_the_image_of_a_request() -> None:
    with pytest.raises(ImageError, match=r"^image 2 of 2: PNG image declares 100x100 = 10000 pixels, over the limit of 9999"):
        open_request_images([png_bytes(10, 10), png_bytes(100, 100)], 9_999, 10**9)


def test_preprocess_images_checks_the_budget_first(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys
    from types import SimpleNamespace

    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", SimpleNamespace())
    from detserve.runtime.backend.preprocess_model import preprocess_images

    spec = PreprocessSpec(min_size=32, max_size=64, max_request_pixels=5_000)
    images, info = preprocess_images([png_bytes(64, 48), png_bytes(32, 32)], spec, per_image=True)  # 4096 pixels
    assert images.shape[0] == 2 and info[:, :2].tolist() == [[48, 64], [32, 32]]
    assert info[:, 4:].tolist() == [[32, 64], [32, 32]]  # each image on its own canvas
    # a good image first, an over-budget sum: nothing decoded, not even the first one
    with no_pixel_decoding(monkeypatch), pytest.raises(ImageError, match="over the per-request budget of 5000"):
        preprocess_images([png_bytes(64, 48), png_bytes(64, 48)], spec)
