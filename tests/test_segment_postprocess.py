"""Retail post-processing rules and segment parsing, on hand-built masks (no model)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from retailklip.segment import (
    MaskGeneratorOptions,
    PostprocessOptions,
    SegmenterOptionError,
    crop_segment,
    make_segment,
    mask_to_bbox,
    save_segments,
    segment_filename,
    select_masks,
)

H, W = 100, 200  # image area 20,000 px


def box(x0, y0, x1, y1) -> np.ndarray:
    m = np.zeros((H, W), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


def disk(cx, cy, r) -> np.ndarray:
    yy, xx = np.mgrid[:H, :W]
    return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r


# ---------------------------------------------------------------- post-processing rules


def test_banana_stem_inside_banana_is_dropped():
    banana = disk(60, 50, 30)  # ~2,800 px, includes its stem
    stem = box(55, 22, 65, 30)  # 80 px, all inside the banana mask
    apple = disk(150, 50, 20)  # separate product
    assert select_masks([stem, banana, apple]) == [1, 2]


def test_containment_threshold_is_configurable():
    banana = box(20, 20, 80, 80)  # 3,600 px
    stem = box(70, 40, 90, 50)  # 200 px, half inside the banana
    assert select_masks([banana, stem]) == [0, 1]  # 50 % < 0.8: a separate object
    assert select_masks([banana, stem], PostprocessOptions(containment_threshold=0.5)) == [0]
    assert select_masks([banana, stem], PostprocessOptions(containment_threshold=0.51)) == [0, 1]
    # Fully contained parts are kept when the rule is disabled (threshold > 1).
    inner = box(30, 30, 40, 40)
    assert select_masks([banana, inner], PostprocessOptions(containment_threshold=1.01)) == [0, 1]


def test_containment_is_against_kept_masks_only():
    # A part of a background mask must not be dropped: background goes first.
    background = box(0, 0, 200, 100)  # whole image
    product = box(10, 10, 50, 50)
    assert select_masks([background, product]) == [1]
    # Nested wholes: shelf unit > carton > label; carton and label both lie inside the kept unit.
    unit = box(10, 10, 150, 90)
    carton = box(20, 20, 60, 60)
    label = box(30, 30, 40, 40)
    assert select_masks([label, carton, unit]) == [2]


def test_side_by_side_products_are_all_kept():
    masks = [box(10 + 40 * i, 20, 45 + 40 * i, 80) for i in range(4)]
    assert select_masks(masks) == [0, 1, 2, 3]


def test_tiny_segments_are_dropped():
    speck = box(5, 5, 8, 8)  # 9 px < 0.002 * 20,000 = 40 px
    small = box(100, 50, 107, 57)  # 49 px: kept
    assert select_masks([speck, small]) == [1]
    assert select_masks([speck, small], PostprocessOptions(min_area_fraction=0.0)) == [0, 1]
    assert select_masks([speck, small], PostprocessOptions(min_area_fraction=0.003)) == []
    assert select_masks([np.zeros((H, W), bool)], PostprocessOptions(min_area_fraction=0.0)) == []  # empty masks


def test_near_whole_image_background_is_dropped():
    table = np.ones((H, W), bool)
    products = [disk(50, 50, 12), disk(140, 50, 15)]
    for p in products:
        table &= ~p  # background with holes: 94 % of the image
    assert table.mean() > 0.9
    assert select_masks([table, *products]) == [1, 2]
    assert select_masks([table, *products], PostprocessOptions(max_area_fraction=1.0)) == [0, 1, 2]
    big_product = box(0, 0, 190, 100)  # 95 % of the image
    assert select_masks([big_product]) == []
    assert select_masks([big_product], PostprocessOptions(max_area_fraction=0.96)) == [0]


def test_duplicates_keep_the_higher_score():
    a = box(10, 10, 60, 60)
    assert select_masks([a, a.copy()], scores=[0.5, 0.9]) == [1]
    assert select_masks([a, a.copy()], scores=[0.9, 0.5]) == [0]


def test_input_validation():
    with pytest.raises(ValueError, match="one shape"):
        select_masks([box(0, 0, 5, 5), np.zeros((10, 10), bool)])
    with pytest.raises(ValueError, match="scores"):
        select_masks([box(0, 0, 5, 5)], scores=[1.0, 2.0])
    assert select_masks([]) == []
    assert select_masks(np.stack([box(10, 10, 40, 40), box(100, 10, 140, 40)])) == [0, 1]
    for kwargs in (
        {"min_area_fraction": -0.1},
        {"max_area_fraction": 0.0},
        {"min_area_fraction": 0.5, "max_area_fraction": 0.4},
        {"containment_threshold": 0.0},
    ):
        with pytest.raises(SegmenterOptionError):
            PostprocessOptions(**kwargs)
    for kwargs in ({"points_per_side": 0}, {"pred_iou_thresh": 1.5}, {"crop_n_layers": -1}):
        with pytest.raises(SegmenterOptionError):
            MaskGeneratorOptions(**kwargs)


# ---------------------------------------------------------------- segment parsing


@pytest.fixture
def photo() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8), "RGB")


def test_bbox_is_tight_and_exclusive():
    m = np.zeros((H, W), bool)
    m[10, 20] = m[30, 50] = True
    assert mask_to_bbox(m) == (20, 10, 51, 31)
    assert mask_to_bbox(np.ones((H, W), bool)) == (0, 0, W, H)
    with pytest.raises(ValueError, match="empty"):
        mask_to_bbox(np.zeros((H, W), bool))
    with pytest.raises(ValueError, match="2-D"):
        mask_to_bbox(np.ones((2, H, W), bool))


def test_crop_alpha_is_zero_outside_and_colour_unchanged_inside(photo):
    mask = disk(70, 40, 25) | box(120, 60, 150, 90)  # two blobs, one box
    seg = make_segment(photo, mask, score=0.75)
    x0, y0, x1, y1 = seg.bbox
    assert seg.bbox == (45, 15, 150, 90)
    assert seg.crop.mode == "RGBA" and seg.crop.size == (x1 - x0, y1 - y0)
    crop = np.asarray(seg.crop)
    inside = mask[y0:y1, x0:x1]
    assert (crop[..., 3][~inside] == 0).all()
    assert (crop[..., 3][inside] == 255).all()
    assert np.array_equal(crop[..., :3][inside], np.asarray(photo)[y0:y1, x0:x1][inside])
    assert seg.score == 0.75 and seg.area == int(mask.sum())
    assert seg.mask.dtype == bool and seg.mask.shape == (H, W)


def test_crop_of_rgba_photo_keeps_own_alpha_inside(photo):
    rgba = photo.convert("RGBA")
    alpha = np.full((H, W), 200, np.uint8)
    rgba.putalpha(Image.fromarray(alpha))
    mask = box(10, 10, 30, 30)
    crop = np.asarray(crop_segment(rgba, mask))
    assert crop.shape == (20, 20, 4) and (crop[..., 3] == 200).all()
    mask2 = box(10, 10, 30, 30)
    mask2[10, 10] = False
    crop2 = np.asarray(crop_segment(rgba, mask2))
    assert crop2[0, 0, 3] == 0 and np.array_equal(crop2[0, 0, :3], np.asarray(photo)[10, 10])


def test_crop_rejects_mismatched_mask(photo):
    with pytest.raises(ValueError, match="does not match"):
        crop_segment(photo, np.ones((W, H), bool))


def test_segment_file_names():
    assert segment_filename("shelf", 0) == "shelf_segment_0.png"
    assert segment_filename("photos/shelf.JPG", 12) == "shelf_segment_12.png"
    assert segment_filename("a.b.png", 3) == "a.b_segment_3.png"
    assert segment_filename("scan.v2", 1) == "scan.v2_segment_1.png"  # not an image suffix: kept
    for bad in ("", "/"):
        with pytest.raises(ValueError):
            segment_filename(bad, 0)
    with pytest.raises(ValueError):
        segment_filename("x", -1)


def test_save_segments_round_trip(tmp_path, photo):
    segs = [make_segment(photo, box(10, 10, 40, 50), 0.9), make_segment(photo, disk(150, 50, 20), 0.8)]
    out = tmp_path / "new" / "dir"
    paths = save_segments(segs, out, "store/IMG_0042.jpg")
    assert [p.name for p in paths] == ["IMG_0042_segment_0.png", "IMG_0042_segment_1.png"]
    for seg, path in zip(segs, paths):
        back = Image.open(path)
        assert back.mode == "RGBA"
        assert np.array_equal(np.asarray(back), np.asarray(seg.crop))
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    with pytest.raises(NotADirectoryError):
        save_segments(segs, not_a_dir, "x")


def test_a_merge_of_products_is_dropped_not_the_products():
    """Rule 3: SAM's "all products on the tray" mask holds the products (covering most of it) and
    is dropped; without the rule the contained-parts rule would drop the products instead.  A
    product holding its own small parts (label, cap) stays, the parts go."""
    h, w = 200, 300
    a = np.zeros((h, w), bool)
    a[20:100, 20:120] = True
    b = np.zeros((h, w), bool)
    b[30:110, 150:260] = True
    tray = a | b
    tray[60:70, 120:150] = True  # the merge bridges the gap between them
    bottle = np.zeros((h, w), bool)
    bottle[120:195, 40:100] = True
    label = np.zeros((h, w), bool)
    label[140:160, 45:95] = True
    cap = np.zeros((h, w), bool)
    cap[120:128, 60:80] = True
    options = PostprocessOptions(min_area_fraction=0.001)
    assert select_masks([tray, a, b, bottle, label, cap], options) == [1, 2, 3]
    assert select_masks([tray, a, b], PostprocessOptions(min_area_fraction=0.001, composite_coverage=1.5)) == [0]
