"""Compositing of transparent segment pixels before the encoder (issue 3 item 5).

The colour, grey 128, was chosen by measurement (benchmarks/bench_composite.py, docs/segmentation.md
"Compositing transparency"): a segment crop (alpha 0 outside its mask) must reach the model with
exactly that colour outside the mask and its own colours inside, through the encoder's real
preprocessing.
"""

import json

import numpy as np
import pytest
from PIL import Image

from retailklip.images import DEFAULT_BACKGROUND, to_rgb
from retailklip.segment.parsing import crop_segment

GREY = (128, 128, 128)


@pytest.fixture(scope="module")
def photo(grocery) -> Image.Image:
    return Image.open(grocery / "val/Fruit/Banana/Banana_001.jpg").convert("RGB")  # 348 x 348


@pytest.fixture(scope="module")
def half_mask(photo) -> np.ndarray:
    """Mask over the photo: the right half of a 256 x 256 box at (40, 50) (plus its left edge column,
    so the tight box is 256 wide), with a 20 px hole."""
    mask = np.zeros((photo.height, photo.width), bool)
    mask[50:306, 168:296] = True  # box x 40..296: the left half (x 40..168) transparent
    mask[50:306, 40] = True
    mask[150:170, 230:250] = False  # a hole inside
    return mask


def test_default_is_the_measured_grey():
    assert DEFAULT_BACKGROUND == GREY, "changing the compositing colour needs a new measurement (docs/segmentation.md)"


@pytest.mark.parametrize("colour", [GREY, (0, 0, 0), (255, 255, 255), (124, 116, 104), (7, 200, 31)])
def test_crop_is_colour_outside_mask_and_unchanged_inside(photo, half_mask, colour):
    crop = crop_segment(photo, half_mask)
    assert crop.mode == "RGBA" and crop.size == (256, 256)
    rgb = np.asarray(to_rgb(crop) if colour == GREY else to_rgb(crop, colour))
    inside = half_mask[50:306, 40:296]
    original = np.asarray(photo)[50:306, 40:296]
    assert (rgb[~inside] == colour).all()
    assert np.array_equal(rgb[inside], original[inside])
    assert (~inside).sum() > 256 * 128  # the left half and the hole are outside


def test_rgb_images_are_not_composited(photo):
    assert to_rgb(photo) is photo


def test_encoder_preprocessing_sees_the_background_outside_and_the_photo_inside(mobilenet_encoder, photo, half_mask):
    enc = mobilenet_encoder
    assert enc.background == DEFAULT_BACKGROUND
    assert json.loads(enc.identity.preprocess)["background"] == list(DEFAULT_BACKGROUND)
    crop = crop_segment(photo, half_mask)
    x = enc.prepare(crop)  # decode + composite + resize 256 + centre crop 224 + normalise
    assert tuple(x.shape) == (3, 224, 224)
    grey = enc.preprocess(Image.new("RGB", crop.size, enc.background))
    plain = enc.preprocess(crop.convert("RGB"))  # the box's own colours everywhere
    # Crop x = tensor column + 16; the transparent half is x < 128 (column < 112), the hole is
    # rows 100..119 / x 190..209 of the crop (rows 84..103 / columns 174..193 of the tensor).
    np.testing.assert_allclose(x[:, :, :104], grey[:, :, :104], atol=1e-6)
    np.testing.assert_allclose(x[:, 90:98, 180:188], grey[:, 90:98, 180:188], atol=1e-6)
    np.testing.assert_allclose(x[:, :80, 120:], plain[:, :80, 120:], atol=1e-6)
    assert not np.allclose(plain[:, :, :104], grey[:, :, :104], atol=0.1)  # the photo is not grey there


def test_embedding_depends_on_the_compositing_colour(mobilenet_encoder, photo, half_mask):
    enc = mobilenet_encoder
    crop = crop_segment(photo, half_mask)
    v_crop, v_grey, v_white = enc.embed([crop, to_rgb(crop, GREY), to_rgb(crop, (255, 255, 255))])
    np.testing.assert_allclose(v_crop, v_grey, atol=1e-6)
    assert float(v_crop @ v_white) < 0.99  # the colour reaches the model: it is a real choice
