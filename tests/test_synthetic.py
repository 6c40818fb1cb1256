"""Synthetic checkout trays (retailklip.segment.synthetic) and the oracle decoder
(retailklip.segment.oracle), on the real GroceryStore images."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

from retailklip.segment.errors import SegmenterOptionError
from retailklip.segment.oracle import OracleDecoder, OracleRates, low_res_size
from retailklip.segment.synthetic import TrayMaker, TrayOptions, main, packshot_mask, read_coco_masks, write_trays


@pytest.fixture(scope="module")
def maker(grocery_store) -> TrayMaker:
    return TrayMaker(grocery_store)


def test_packshot_mask_cuts_the_product_from_its_white_background(grocery_store):
    for c in grocery_store.classes[::10]:
        rgb = np.asarray(Image.open(c.iconic).convert("RGB"))
        m = packshot_mask(rgb)
        assert not (m[0].any() or m[-1].any() or m[:, 0].any() or m[:, -1].any()), c.name
        assert 0.1 < m.mean() < 0.95, c.name
        outside = rgb[~m].astype(int)
        # what is cut away is mostly the white background; what is kept is mostly not white
        assert (outside.min(-1) >= 240).mean() > 0.8, c.name
        assert (rgb[m].min(-1) >= 250).mean() < 0.5, c.name


def test_trays_are_deterministic_and_sized(maker):
    a, b = maker.make(3, (640, 480)), maker.make(3, (640, 480))
    assert a.skus == b.skus and np.array_equal(a.labels, b.labels)
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    c = maker.make(4, (640, 480))
    assert not np.array_equal(a.labels, c.labels)
    big = maker.make(3, (1920, 1080))
    assert big.image.size == (1920, 1080) and big.labels.shape == (1080, 1920) and big.labels.dtype == np.int16


def test_trays_have_visible_objects_with_occlusions(maker):
    counts, occluded = [], 0
    for seed in range(12):
        t = maker.make(seed, (512, 384))
        counts.append(len(t.skus))
        assert set(np.unique(t.labels)) <= set(range(len(t.skus) + 1))
        areas = np.bincount(t.labels.ravel(), minlength=len(t.skus) + 1)[1:]
        assert (areas > 0).all()
        assert set(t.skus) <= set(maker.skus)
        masks = t.masks()
        assert masks.shape == (len(t.skus), 384, 512) and not (masks.sum(0) > 1).any()
        # an occluded object: its visible mask has a concavity made by a later object's pixels
        for k in range(len(t.skus)):
            ys, xs = np.nonzero(masks[k])
            box = t.labels[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
            occluded += bool((box > k + 1).sum() > 0.05 * areas[k])
    assert min(counts) >= 3 and max(counts) <= 15 and len(set(counts)) > 3
    assert occluded >= 5


def test_tray_pixels_come_from_the_packshots(maker):
    t = maker.make(0, (800, 600))
    rgb = np.asarray(t.image).astype(int)
    # the object pixels are the packshots' colours (not the blurred photo): a real difference
    # between the object interiors and their ring of background
    for k in range(len(t.skus)):
        m = t.labels == k + 1
        assert rgb[m].std() > 5


def test_coco_round_trip(maker, tmp_path):
    path = write_trays(tmp_path, 3, seed=7, size=(320, 240), maker=maker, image_format="jpg")
    coco = json.loads(path.read_text())
    assert [im["file_name"] for im in coco["images"]] == ["tray_0007.jpg", "tray_0008.jpg", "tray_0009.jpg"]
    assert len(coco["categories"]) == 81 and coco["categories"][0] == {
        "id": 1, "name": maker.skus[0], "supercategory": maker.coarse[0]}
    assert all(a["iscrowd"] == 0 for a in coco["annotations"])
    assert len({a["id"] for a in coco["annotations"]}) == len(coco["annotations"])
    back = read_coco_masks(path)
    for (photo, masks, skus), seed, ann_img in zip(back, (7, 8, 9), coco["images"]):
        t = maker.make(seed, (320, 240))
        assert skus == t.skus and np.array_equal(masks, t.masks())
        assert Image.open(photo).size == (320, 240)
        anns = [a for a in coco["annotations"] if a["image_id"] == ann_img["id"]]
        for a, m in zip(anns, masks):
            ys, xs = np.nonzero(m)
            assert a["area"] == m.sum()
            assert a["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]


def test_cli_writes_trays(tmp_path, grocery, capsys):
    main(["--out", str(tmp_path), "--n", "1", "--size", "200x150", "--root", str(grocery)])
    assert capsys.readouterr().out.strip() == str(tmp_path / "annotations.json")
    assert Image.open(tmp_path / "tray_0000.png").size == (200, 150)


def test_bad_tray_options_are_refused(maker, tmp_path):
    for bad in ({"min_objects": 0}, {"min_objects": 5, "max_objects": 4}, {"min_scale": 0.0}, {"min_visible": 2.0}):
        with pytest.raises(SegmenterOptionError):
            TrayOptions(**bad)
    with pytest.raises(SegmenterOptionError, match="64"):
        maker.make(0, (32, 300))
    with pytest.raises(SegmenterOptionError, match="n must be"):
        write_trays(tmp_path, 0, maker=maker)
    with pytest.raises(SegmenterOptionError, match="image_format"):
        write_trays(tmp_path, 1, maker=maker, image_format="gif")
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------------------------- oracle
def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def _full(decoder: OracleDecoder, logits: torch.Tensor) -> np.ndarray:
    H, W = decoder.image_size
    return decoder.upsample(logits, (0, 0, W, H)).numpy()


def _interior_point(labels: np.ndarray, k: int) -> tuple[float, float]:
    from scipy import ndimage as ndi

    depth = ndi.distance_transform_edt(labels == k + 1)
    y, x = np.unravel_index(int(depth.argmax()), depth.shape)
    return float(x) + 0.5, float(y) + 0.5


def test_oracle_shapes_and_determinism(maker):
    t = maker.make(1, (1024, 768))
    d = OracleDecoder(t, seed=1)
    assert d.image_size == (768, 1024) and d.low_res_size == low_res_size(768, 1024) == (192, 256)
    pts = np.array([[10.5, 20.5], [500.0, 400.0], [900.2, 700.9]])
    logits, iou = d.decode(pts)
    assert logits.shape == (3, 3, 192, 256) and logits.dtype == torch.float32
    assert iou.shape == (3, 3) and iou.dtype == torch.float32 and ((iou >= 0) & (iou <= 1)).all()
    one, one_iou = d.decode(pts[1:2])
    assert torch.equal(one[0], logits[1]) and torch.equal(one_iou[0], iou[1])
    again = OracleDecoder(t, seed=1).decode(pts)
    assert torch.equal(again[0], logits) and torch.equal(again[1], iou)
    assert not torch.equal(OracleDecoder(t, seed=2).decode(pts)[1], iou)


def test_oracle_answers_the_object_under_the_point(maker):
    t = maker.make(5, (1024, 768))
    sure = OracleRates(object_interior=1.0, object_edge=1.0, tray_on_object=0.0)
    d = OracleDecoder(t, sure, seed=0)
    gt = t.masks()
    for k in range(len(t.skus)):
        x, y = _interior_point(t.labels, k)
        logits, _ = d.decode(np.array([[x, y]]))
        whole = _full(d, logits[0, 1])
        assert _iou(whole, gt[k]) > 0.85, t.skus[k]
        part = _full(d, logits[0, 0])
        assert part.sum() < 0.8 * gt[k].sum() and (part & gt[k]).sum() > 0.9 * part.sum()
    # the box-restricted upsampling is the full upsampling cut to the box
    box = (100, 50, 612, 333)
    inside = d.upsample(logits[0, 1], box).numpy()
    assert np.array_equal(inside, whole[50:333, 100:612])


def test_oracle_failure_modes_at_their_rates(maker):
    t = maker.make(5, (1024, 768))
    union = t.labels > 0
    never = OracleDecoder(t, OracleRates(object_interior=0.0, object_edge=0.0, tray_on_object=1.0), seed=0)
    gt = t.masks()
    for k in range(len(t.skus)):
        x, y = _interior_point(t.labels, k)
        logits, _ = never.decode(np.array([[x, y]]))
        outs = [_full(never, logits[0, j]) for j in range(3)]
        assert max(_iou(o, gt[k]) for o in outs[:2]) < 0.85
        assert _iou(outs[2], union) > 0.9
    # rates are rates: a point deep inside an object gets its mask in about object_interior of prompts
    rates = OracleRates(object_interior=0.7, tray_on_object=0.0)
    d = OracleDecoder(t, rates, seed=0)
    k = int(np.argmax(gt.reshape(len(gt), -1).sum(1)))
    cx, cy = _interior_point(t.labels, k)
    rng = np.random.default_rng(0)
    pts = np.array([[cx, cy]]) + rng.integers(-3, 4, size=(200, 2))
    hits = np.mean([d.answer_ids(x, y)[1] == d.object_ids[k] for x, y in pts])
    assert 0.55 < hits < 0.85


def test_oracle_correct_masks_score_higher_and_are_stable(maker):
    from segment_anything.utils.amg import calculate_stability_score

    t = maker.make(8, (1024, 768))
    d = OracleDecoder(t, OracleRates(tray_on_object=0.0), seed=3)
    right, parts, stab = [], [], []
    for k in range(len(t.skus)):
        x, y = _interior_point(t.labels, k)
        logits, iou = d.decode(np.array([[x, y]]))
        ids = d.answer_ids(x, y)
        parts.append(float(iou[0, 0]))
        if ids[1] == d.object_ids[k]:
            right.append(float(iou[0, 1]))
            stab.append(float(calculate_stability_score(logits[0, 1:2], 0.0, 1.0)))
    assert np.mean(right) > np.mean(parts) + 0.05
    assert np.median(stab) > 0.95


def test_bad_oracle_rates_are_refused():
    with pytest.raises(SegmenterOptionError):
        OracleRates(object_interior=1.5)
    with pytest.raises(SegmenterOptionError):
        dataclasses.replace(OracleRates(), amplitude=0.5)
