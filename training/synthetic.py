"""A generated object-detection dataset: shapes on varied backgrounds, COCO-format annotations.

Every image is a pure function of (split seed, image index): ``render(cfg, i)`` gives the same pixels
and boxes on any machine, in any order, so the training loop draws images on the fly and
``write_split`` materialises exactly the same images as files.

The splits are generated apart, never sliced from one pool:
- ``train``: seed 1000, backgrounds noise / gradient / crops of one set of photographs;
- ``val``: seed 2000, the training distribution (for training decisions only);
- ``test``: seed 3000 and a *shifted* distribution: other photographs, textures never seen in
  training (stripes, checkers), wider image sizes and aspect ratios, slightly smaller and larger
  objects, more clutter.

Boxes are the tight box of each object's *visible* pixels (COCO convention: x, y, w, h in pixels,
area = visible pixel count); an object is placed only where any earlier object keeps at least
``min_visible`` of its pixels, so every annotated object is mostly visible.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

CLASSES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
# COCO category ids are 1..5; torchvision label 0 is the background, so label == category id.
NUM_CLASSES = len(CLASSES) + 1

# Files bundled with scikit-image (nothing is downloaded); the test split's photographs are never seen in training.
TRAIN_PHOTOS = (
    "astronaut.png",
    "coffee.png",
    "chelsea.png",
    "rocket.jpg",
    "brick.png",
    "grass.png",
    "gravel.png",
    "motorcycle_left.png",
)
TEST_PHOTOS = (
    "camera.png",
    "coins.png",
    "moon.png",
    "hubble_deep_field.jpg",
    "retina.jpg",
    "motorcycle_right.png",
    "color.png",
    "page.png",
)


@dataclass(frozen=True)
class SplitConfig:
    name: str
    seed: int
    num_images: int
    short_side: tuple[int, int]  # image short side, pixels
    aspect: tuple[float, float]  # long / short
    objects: tuple[int, int]  # objects per image, inclusive
    object_frac: tuple[float, float]  # object extent / image short side
    backgrounds: tuple[str, ...]
    photos: tuple[str, ...]
    clutter: tuple[int, int]
    min_visible: float = 0.75
    stretch: tuple[float, float] = (0.75, 1.33)  # anisotropic object scale
    blur_prob: float = 0.2
    noise_sigma: tuple[float, float] = (0.0, 8.0)
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)


_TRAIN = SplitConfig(
    name="train",
    seed=1000,
    num_images=40000,
    short_side=(256, 384),
    aspect=(1.0, 1.4),
    objects=(1, 6),
    object_frac=(0.12, 0.45),
    backgrounds=("noise", "gradient", "photo"),
    photos=TRAIN_PHOTOS,
    clutter=(0, 12),
)

SPLITS: dict[str, SplitConfig] = {
    "train": _TRAIN,
    # the training distribution under its own seed: for training decisions only
    "val": replace(_TRAIN, name="val", seed=2000, num_images=200),
    "test": SplitConfig(
        name="test",
        seed=3000,
        num_images=300,
        short_side=(240, 480),
        aspect=(1.0, 1.6),
        objects=(1, 7),
        object_frac=(0.11, 0.48),
        backgrounds=("noise", "gradient", "photo", "stripes", "checker"),
        photos=TEST_PHOTOS,
        clutter=(2, 16),
    ),
}


@dataclass(frozen=True)
class Sample:
    image: np.ndarray  # uint8 HWC RGB
    boxes: np.ndarray  # float32 [N, 4] x0, y0, x1, y1 (pixels, exclusive right/bottom)
    labels: np.ndarray  # int64 [N], 1..len(CLASSES)
    areas: np.ndarray  # float32 [N] visible pixels
    # each object's visible pixels exactly (what its box and area are measured on), as COCO RLE
    # (pycocotools' encoding, counts as text): a few hundred bytes where a bool mask is H x W
    masks: list[dict] | None = None


@cache
def _photo(name: str) -> Image.Image:
    import skimage.data

    with Image.open(Path(skimage.data.__file__).parent / name) as im:
        return im.convert("RGB")


def _colour(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, size=3).astype(np.float32)


def _background(cfg: SplitConfig, rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    kind = cfg.backgrounds[int(rng.integers(len(cfg.backgrounds)))]
    if kind == "noise":
        small = rng.uniform(0, 255, size=(int(rng.integers(2, 9)), int(rng.integers(2, 9)), 3)).astype(np.uint8)
        img = np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC), dtype=np.float32)
        img += rng.standard_normal(img.shape, dtype=np.float32) * rng.uniform(5, 30)
    elif kind == "gradient":
        a, b = _colour(rng), _colour(rng)
        angle = rng.uniform(0, 2 * math.pi)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        t = xx * math.cos(angle) + yy * math.sin(angle)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1.0)
        img = a + (b - a) * t[..., None]
    elif kind == "photo":
        photo = _photo(cfg.photos[int(rng.integers(len(cfg.photos)))])
        pw, ph = photo.size
        cw = int(rng.integers(min(pw, ph) // 3, min(pw, ph) + 1))
        chh = min(ph, max(8, int(cw * h / w)))
        x0, y0 = int(rng.integers(0, pw - cw + 1)), int(rng.integers(0, ph - chh + 1))
        img = np.asarray(photo.crop((x0, y0, x0 + cw, y0 + chh)).resize((w, h), Image.Resampling.BILINEAR), dtype=np.float32)
    elif kind == "stripes":
        a, b = _colour(rng), _colour(rng)
        period = rng.uniform(6, 40)
        angle = rng.uniform(0, math.pi)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        t = (np.sin((xx * math.cos(angle) + yy * math.sin(angle)) * 2 * math.pi / period) > 0).astype(np.float32)
        img = a + (b - a) * t[..., None]
    elif kind == "checker":
        a, b = _colour(rng), _colour(rng)
        cell = int(rng.integers(8, 48))
        yy, xx = np.mgrid[0:h, 0:w]
        t = (((xx // cell) + (yy // cell)) % 2).astype(np.float32)
        img = a + (b - a) * t[..., None]
    else:
        raise ValueError(f"unknown background kind {kind!r}")
    return np.clip(img, 0, 255)


def _shape_points(kind: str, rng: np.random.Generator) -> list[tuple[float, float]]:
    """Outline in unit coordinates (extent about [-1, 1])."""
    if kind == "circle":
        n = 48
        return [(math.cos(2 * math.pi * k / n), math.sin(2 * math.pi * k / n)) for k in range(n)]
    if kind == "square":
        return [(-1, -1), (1, -1), (1, 1), (-1, 1)]
    if kind == "triangle":
        return [(math.cos(a), math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if kind == "star":
        inner = rng.uniform(0.38, 0.5)
        return [
            ((1 if k % 2 == 0 else inner) * math.cos(-math.pi / 2 + k * math.pi / 5),
             (1 if k % 2 == 0 else inner) * math.sin(-math.pi / 2 + k * math.pi / 5))
            for k in range(10)
        ]  # fmt: skip
    if kind == "cross":
        t = rng.uniform(0.28, 0.4)
        return [(-t, -1), (t, -1), (t, -t), (1, -t), (1, t), (t, t), (t, 1), (-t, 1), (-t, t), (-1, t), (-1, -t), (-t, -t)]
    raise ValueError(kind)


def _object_polygon(
    kind: str, rng: np.random.Generator, cfg: SplitConfig, cx: float, cy: float, size: float
) -> list[tuple[float, float]]:
    pts = _shape_points(kind, rng)
    sx = size / 2 * rng.uniform(*cfg.stretch) ** 0.5
    sy = size / 2 / rng.uniform(*cfg.stretch) ** 0.5
    rot = 0.0 if kind == "circle" else rng.uniform(0, 2 * math.pi)
    c, s = math.cos(rot), math.sin(rot)
    return [(cx + c * x * sx - s * y * sy, cy + s * x * sx + c * y * sy) for x, y in pts]


def _clutter(draw: ImageDraw.ImageDraw, rng: np.random.Generator, w: int, h: int, n: int) -> None:
    for _ in range(n):
        col = tuple(int(v) for v in rng.integers(0, 256, size=3))
        if rng.random() < 0.6:
            x0, y0 = rng.uniform(0, w), rng.uniform(0, h)
            ln, a = rng.uniform(10, max(w, h) / 2), rng.uniform(0, 2 * math.pi)
            draw.line([(x0, y0), (x0 + ln * math.cos(a), y0 + ln * math.sin(a))], fill=col, width=int(rng.integers(1, 4)))
        else:
            x0, y0, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(1, 4)
            draw.ellipse([x0 - r, y0 - r, x0 + r, y0 + r], fill=col)


def render(cfg: SplitConfig, index: int) -> Sample:
    """Image ``index`` of split ``cfg``: deterministic in (cfg.seed, index) alone.

    Every random draw comes from one generator seeded by (seed, index), in a fixed order: size, background,
    clutter, objects, blur, noise. The helpers below take their draws in that order; reordering them changes
    every image.
    """
    rng = np.random.default_rng([cfg.seed, index])
    short = int(rng.integers(cfg.short_side[0], cfg.short_side[1] + 1))
    long_ = int(short * rng.uniform(*cfg.aspect))
    w, h = (long_, short) if rng.random() < 0.5 else (short, long_)
    canvas = _backdrop(cfg, rng, w, h)
    owner, labels = _place_objects(cfg, rng, canvas, short)
    return _annotated(_camera(cfg, rng, canvas), owner, labels)


def _backdrop(cfg: SplitConfig, rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """Background plus clutter, as a writable uint8 HWC array the objects are painted on."""
    bg = Image.fromarray(_background(cfg, rng, w, h).astype(np.uint8))
    _clutter(ImageDraw.Draw(bg), rng, w, h, int(rng.integers(cfg.clutter[0], cfg.clutter[1] + 1)))
    return np.asarray(bg, dtype=np.uint8).copy()


@dataclass(frozen=True)
class _Footprint:
    """An object's polygon rasterised in its own box only: image pixels ``[y0:y0 + rows, x0:x0 + cols]``."""

    x0: int
    y0: int
    local: list[tuple[float, float]]  # the polygon in the box's coordinates
    mask: np.ndarray  # bool [rows, cols]: the object's pixels

    @classmethod
    def of(cls, poly: list[tuple[float, float]]) -> _Footprint:
        x0, y0 = int(min(x for x, _ in poly)), int(min(y for _, y in poly))
        x1, y1 = int(max(x for x, _ in poly)) + 2, int(max(y for _, y in poly)) + 2
        local = [(x - x0, y - y0) for x, y in poly]
        m_img = Image.new("L", (x1 - x0, y1 - y0), 0)
        ImageDraw.Draw(m_img).polygon(local, fill=255)
        return cls(x0, y0, local, np.asarray(m_img) > 0)

    def window(self, a: np.ndarray) -> np.ndarray:
        """The footprint's box of image-sized array ``a`` (a view: writes go to ``a``)."""
        rows, cols = self.mask.shape
        return a[self.y0 : self.y0 + rows, self.x0 : self.x0 + cols]


def _place_objects(cfg: SplitConfig, rng: np.random.Generator, canvas: np.ndarray, short: int) -> tuple[np.ndarray, list[int]]:
    """Paint objects onto ``canvas`` until the image's drawn count is placed (at most 8 tries per object).

    Returns the owner map (object number, 1-based, owning each pixel; 0 = none) and each object's label.
    A candidate is rejected when it leaves the image, is under 16 pixels, or would leave an earlier
    object less than ``cfg.min_visible`` of its pixels.
    """
    h, w = canvas.shape[:2]
    owner = np.zeros((h, w), dtype=np.int32)
    full_area: list[int] = []
    visible: list[int] = []
    labels: list[int] = []
    target = int(rng.integers(cfg.objects[0], cfg.objects[1] + 1))
    for _ in range(target * 8):
        if len(labels) == target:
            break
        label = int(rng.integers(len(CLASSES))) + 1
        size = rng.uniform(*cfg.object_frac) * short
        cx, cy = rng.uniform(size / 2, w - size / 2), rng.uniform(size / 2, h - size / 2)
        poly = _object_polygon(CLASSES[label - 1], rng, cfg, cx, cy, size)
        if not _inside(poly, w, h):
            continue
        fp = _Footprint.of(poly)
        if fp.mask.sum() < 16:
            continue
        region = fp.window(owner)
        covered = np.bincount(region[fp.mask], minlength=len(labels) + 1)
        if any(visible[k] - covered[k + 1] < cfg.min_visible * full_area[k] for k in range(len(labels)) if covered[k + 1]):
            continue
        _paint(rng, fp.window(canvas), fp)
        for k in range(len(labels)):
            visible[k] -= int(covered[k + 1])
        region[fp.mask] = len(labels) + 1
        full_area.append(int(fp.mask.sum()))
        visible.append(int(fp.mask.sum()))
        labels.append(label)
    return owner, labels


def _paint(rng: np.random.Generator, patch: np.ndarray, fp: _Footprint) -> None:
    """Fill the object's pixels of ``patch`` (its box of the canvas) with a colour that stands out from what it covers."""
    fill = _contrasting_fill(rng, patch[fp.mask].astype(np.float32).mean(axis=0))
    patch[fp.mask] = fill.astype(np.uint8)
    if rng.random() < 0.3:  # a darker or lighter outline, kept inside the mask so the box stays exact
        rows, cols = fp.mask.shape
        o_img = Image.new("L", (cols, rows), 0)
        ImageDraw.Draw(o_img).polygon(fp.local, outline=255, width=int(rng.integers(1, 4)))
        patch[(np.asarray(o_img) > 0) & fp.mask] = np.clip(fill * rng.uniform(0.4, 1.6), 0, 255).astype(np.uint8)


def _camera(cfg: SplitConfig, rng: np.random.Generator, canvas: np.ndarray) -> np.ndarray:
    """The painted canvas as a camera might give it: sometimes blurred, then sensor noise, rounded to uint8."""
    picture = Image.fromarray(canvas)
    if rng.random() < cfg.blur_prob:
        picture = picture.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0)))
    img = np.asarray(picture, dtype=np.float32)
    sigma = rng.uniform(*cfg.noise_sigma)
    if sigma > 0:
        img = img + rng.standard_normal(img.shape, dtype=np.float32) * sigma
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _annotated(image: np.ndarray, owner: np.ndarray, labels: list[int]) -> Sample:
    """``image`` with each object's box, area and mask measured on its visible pixels (fully hidden ones dropped)."""
    boxes, areas, kept, masks = [], [], [], []
    for k, label in enumerate(labels, start=1):
        ys, xs = np.nonzero(owner == k)
        if len(xs) == 0:
            continue
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        areas.append(len(xs))
        kept.append(label)
        masks.append(_rle(owner == k))
    return Sample(
        image=image,
        boxes=np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
        labels=np.asarray(kept, dtype=np.int64),
        areas=np.asarray(areas, dtype=np.float32),
        masks=masks,
    )


def _inside(poly: list[tuple[float, float]], w: int, h: int) -> bool:
    return all(0 <= x <= w - 1 and 0 <= y <= h - 1 for x, y in poly)


def _contrasting_fill(rng: np.random.Generator, under: np.ndarray) -> np.ndarray:
    """A random colour at least a fixed distance from the mean colour it is drawn over."""
    best = _colour(rng)
    for _ in range(20):
        if float(np.abs(best - under).sum()) >= 150:
            return best
        best = _colour(rng)
    return np.where(under > 127, 0.0, 255.0).astype(np.float32)


def _rle(mask: np.ndarray) -> dict:
    """One binary mask as COCO RLE (``segmentation``; pycocotools' encoding, counts as text)."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def coco_dict(cfg: SplitConfig, samples: list[tuple[str, Sample]]) -> dict:
    images: list[dict] = []
    annotations: list[dict] = []
    for image_id, (file_name, s) in enumerate(samples, start=1):
        h, w = s.image.shape[:2]
        images.append({"id": image_id, "file_name": file_name, "width": w, "height": h})
        rles = s.masks if s.masks is not None else [None] * len(s.labels)
        for box, label, area, rle in zip(s.boxes.tolist(), s.labels.tolist(), s.areas.tolist(), rles, strict=True):
            x0, y0, x1, y1 = box
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": int(label),
                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": float(area), "iscrowd": 0,
                **({"segmentation": rle} if rle is not None else {}),
            })  # fmt: skip
    return {
        "info": {"description": f"detserve synthetic shapes, split {cfg.name}", "split": cfg.to_json()},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i, "name": n, "supercategory": "shape"} for i, n in enumerate(CLASSES, start=1)],
    }


def write_split(cfg: SplitConfig, out: Path, limit: int | None = None) -> Path:
    """Write the first ``limit`` (default: all) images as PNG plus ``annotations.json``; returns the JSON path."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "images").mkdir(exist_ok=True)
    n = cfg.num_images if limit is None else min(limit, cfg.num_images)
    samples = []
    for i in range(n):
        s = render(cfg, i)
        name = f"{cfg.name}_{i:06d}.png"
        Image.fromarray(s.image).save(out / "images" / name)
        samples.append((name, s))
    path = out / "annotations.json"
    path.write_text(json.dumps(coco_dict(cfg, samples)))
    return path
