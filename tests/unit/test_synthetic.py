"""The generated dataset: deterministic per (seed, index), tight visible boxes, a test split generated apart."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from training.synthetic import CLASSES, SPLITS, coco_dict, render, write_split


def test_an_image_depends_only_on_split_seed_and_index() -> None:
    a, b = render(SPLITS["train"], 7), render(SPLITS["train"], 7)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.boxes, b.boxes) and np.array_equal(a.labels, b.labels)
    render(SPLITS["train"], 3)  # order of generation does not matter
    assert np.array_equal(render(SPLITS["train"], 7).image, a.image)
    assert not np.array_equal(render(SPLITS["train"], 8).image[:10], a.image[:10])


def test_splits_use_different_seeds_and_the_test_split_is_shifted() -> None:
    train, val, test = SPLITS["train"], SPLITS["val"], SPLITS["test"]
    assert len({train.seed, val.seed, test.seed}) == 3
    assert not set(train.photos) & set(test.photos)  # test photographs are never seen in training
    assert set(test.backgrounds) - set(train.backgrounds)  # textures only the test split has
    assert test.short_side[1] > train.short_side[1] and test.aspect[1] > train.aspect[1]
    assert val.photos == train.photos  # val: the training distribution, for training decisions


def test_boxes_are_the_tight_box_of_visible_object_pixels() -> None:
    for i in range(20):
        s = render(SPLITS["test"], i)
        h, w = s.image.shape[:2]
        assert s.image.dtype == np.uint8 and s.image.shape[2] == 3
        assert len(s.boxes) == len(s.labels) == len(s.areas) >= 1
        assert set(s.labels.tolist()) <= set(range(1, len(CLASSES) + 1))
        x0, y0, x1, y1 = s.boxes.T
        assert (x0 >= 0).all() and (y0 >= 0).all() and (x1 <= w).all() and (y1 <= h).all()
        assert ((x1 - x0) >= 4).all() and ((y1 - y0) >= 4).all()
        assert (s.areas <= (x1 - x0) * (y1 - y0)).all()


def test_write_split_is_reproducible_and_valid_coco(tmp_path: Path) -> None:
    from pycocotools.coco import COCO

    digests = []
    for run in ("a", "b"):
        ann = write_split(SPLITS["val"], tmp_path / run, limit=4)
        files = sorted((tmp_path / run / "images").iterdir())
        digests.append(
            [hashlib.sha256(p.read_bytes()).hexdigest() for p in files] + [hashlib.sha256(ann.read_bytes()).hexdigest()]
        )
    assert digests[0] == digests[1]
    data = json.loads((tmp_path / "a" / "annotations.json").read_text())
    assert [c["name"] for c in data["categories"]] == list(CLASSES)
    coco = COCO(str(tmp_path / "a" / "annotations.json"))
    assert len(coco.getImgIds()) == 4 and len(coco.getAnnIds()) == len(data["annotations"]) > 0


def test_coco_dict_boxes_are_xywh() -> None:
    s = render(SPLITS["val"], 0)
    d = coco_dict(SPLITS["val"], [("x.png", s)])
    x0, y0, x1, y1 = s.boxes[0].tolist()
    assert d["annotations"][0]["bbox"] == [x0, y0, x1 - x0, y1 - y0]
