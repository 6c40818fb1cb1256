"""finetune/backgrounds.py: packshots pasted onto in-store backgrounds (``--reference-backgrounds``),
on real GroceryStore packshots and photos."""

from __future__ import annotations

import random

import numpy as np
import pytest
from PIL import Image

from finetune.backgrounds import BackgroundPaster, packshot_mask, paste_on_background
from finetune.config import TrainConfig
from finetune.data import ImageDataset, Sample
from finetune.errors import FinetuneError
from retailklip.images import load_image, to_rgb

GREY = (128, 128, 128)


@pytest.fixture(scope="module")
def real(grocery_store):
    c = grocery_store.classes[45]  # a milk carton on white
    packshot = to_rgb(load_image(c.iconic), GREY)
    photos = [p.path for p in grocery_store.photos("train")[:20]]
    return packshot, photos


def test_packshot_mask_separates_product_from_white(real):
    packshot, _ = real
    m = packshot_mask(packshot)
    a = np.asarray(packshot)
    assert m.shape == a.shape[:2] and 0.1 < m.mean() < 0.9
    assert not (m[0, 0] or m[0, -1] or m[-1, 0] or m[-1, -1])  # the corners are studio white
    assert a[~m].min(axis=-1).mean() > 240 and a[m].min(axis=-1).mean() < 200


def test_paste_keeps_the_product_and_replaces_the_white(real):
    packshot, photos = real
    bg = to_rgb(load_image(photos[0]), GREY)
    out = paste_on_background(packshot, bg, random.Random(0))
    m = packshot_mask(packshot)
    a, b = np.asarray(packshot), np.asarray(out)
    assert out.size == packshot.size and out.mode == "RGB"
    assert (b[m] == a[m]).all()  # product pixels untouched
    assert b[~m].min(axis=-1).mean() < 200  # the background is the store photo now
    assert np.asarray(paste_on_background(packshot, bg, random.Random(1))).tolist() != b.tolist()  # random crop
    white = Image.new("RGB", (64, 48), (255, 255, 255))
    assert paste_on_background(white, bg, random.Random(0)) is white  # nothing to keep: unchanged


def test_paster_probability_and_errors(real):
    packshot, photos = real
    assert BackgroundPaster(photos, 0.0, GREY)(packshot) is packshot
    random.seed(0)
    assert np.asarray(BackgroundPaster(photos, 1.0, GREY)(packshot)).tolist() != np.asarray(packshot).tolist()
    random.seed(0)
    half = BackgroundPaster(photos, 0.5, GREY)
    changed = sum(half(packshot) is not packshot for _ in range(40))
    assert 8 < changed < 32
    with pytest.raises(ValueError, match="in-store photos"):
        BackgroundPaster([], 0.5, GREY)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        BackgroundPaster(photos, 1.5, GREY)
    with pytest.raises(FinetuneError, match="--reference-backgrounds must be in"):
        TrainConfig(data="x.csv", eval_data="y.csv", out="o", reference_backgrounds=-0.1).validate()


def test_dataset_pastes_only_reference_rows(real, grocery_store):
    packshot, photos = real
    c = grocery_store.classes[45]
    samples = [Sample(c.iconic, c.name, "reference"), Sample(photos[0], c.name, "query")]
    seen = []

    def spy(im):
        seen.append(im.size)
        return im

    ds = ImageDataset(samples, np.array([0, 0]), lambda im: np.asarray(im), GREY, reference_transform=spy)
    ds[1]
    assert seen == []
    ds[0]
    assert seen == [packshot.size]
