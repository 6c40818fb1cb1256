"""Prompted segmentation (boxes / points -> one segment each), its bounded memory, the box file
format and ``catalog recognize --boxes``, on real GroceryStore photos.

Random EfficientViT-SAM-L0 weights make the masks meaningless, so mask *quality* is not tested;
what is tested: one segment per prompt in prompt order, the segment contract, masks inside their
boxes, the same masks as ``segment_anything.SamPredictor.predict`` prompt by prompt, and that no
upsampling ever runs on more than one prompt's mask.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from catalog.cli import main
from retailklip import Recognizer
from retailklip.coco import CocoError, read_boxes
from retailklip.segment import SamSegmenter, SegmenterOptionError, WholeImageSegmenter, load_segmenter
from retailklip.segment.prompted import PromptedSegmenter, box_mask, build_predictor

BOXES = [[10, 20, 200, 300], [100.5, 100.2, 340.7, 347.9], [0, 0, 348, 348], [-30, -5, 60, 80]]
POINTS = [[100, 100], [300, 40]]


@pytest.fixture(scope="module")
def l0() -> SamSegmenter:
    torch.manual_seed(0)
    return load_segmenter("efficientvit-sam-l0", random_init=True)


@pytest.fixture(scope="module")
def photo(grocery_store) -> Image.Image:
    return Image.open(grocery_store.photos("train")[0].path).convert("RGB")  # 348 x 348


def _check_contract(seg, image: Image.Image) -> None:
    assert seg.mask.dtype == bool and seg.mask.shape == (image.height, image.width)
    x0, y0, x1, y1 = seg.bbox
    assert seg.mask[y0:y1, x0:x1].sum() == seg.mask.sum() > 0
    crop = np.asarray(seg.crop)
    assert seg.crop.mode == "RGBA" and seg.crop.size == (x1 - x0, y1 - y0)
    inside = seg.mask[y0:y1, x0:x1]
    assert (crop[..., 3][~inside] == 0).all() and (crop[..., 3][inside] == 255).all()
    assert np.array_equal(crop[..., :3][inside], np.asarray(image)[y0:y1, x0:x1][inside])


def test_one_segment_per_prompt_masks_inside_boxes(l0, photo):
    segments = l0.segment(photo, boxes=BOXES, points=POINTS)
    assert len(segments) == len(BOXES) + len(POINTS)
    for seg in segments:
        _check_contract(seg, photo)
        assert isinstance(seg.score, float) and 0.0 <= seg.stability_score <= 1.0
    for seg, box in zip(segments, BOXES):
        inside = box_mask(np.clip(np.asarray(box, np.float32), 0, 348), 348, 348)
        assert not (seg.mask & ~inside).any()  # clip_to_box: nothing outside the prompt's box
    # The prompts' order is kept: a segment's box lies inside its own prompt box.
    assert segments[0].bbox[2] <= 200 and segments[3].bbox[0] == 0 and segments[3].bbox[2] <= 60
    # The same prompts give the same segments, and the predictor holds no image afterwards.
    again = l0.segment(photo, boxes=BOXES[:1])
    assert np.array_equal(again[0].mask, segments[0].mask) and again[0].score == pytest.approx(segments[0].score, abs=1e-5)
    assert not l0.prompted.predictor.is_image_set


def test_unclipped_masks_are_sam_predictors_prompt_by_prompt(l0, photo):
    """Batched decoding + one upsample per prompt = SamPredictor.predict on each prompt alone
    (boxes: single-mask output; points: the best of three by predicted IoU)."""
    prompted = PromptedSegmenter(l0.model, batch_size=3, clip_to_box=False)
    segments = prompted.segment_image(photo, boxes=BOXES, points=POINTS)
    predictor = build_predictor(l0.model)
    predictor.set_image(np.asarray(photo))
    boxes = np.clip(np.asarray(BOXES, np.float32), 0, 348)
    for seg, box in zip(segments, boxes):
        masks, scores, _ = predictor.predict(box=box, multimask_output=False)
        assert seg.score == pytest.approx(float(scores[0]), abs=1e-4)
        assert (seg.mask != masks[0]).mean() < 1e-3  # batch-of-3 vs 1: float rounding at the threshold only
    for seg, point in zip(segments[len(BOXES):], POINTS):
        masks, scores, _ = predictor.predict(point_coords=np.asarray([point]), point_labels=np.asarray([1]))
        best = int(np.argmax(scores))
        assert seg.score == pytest.approx(float(scores[best]), abs=1e-4)
        assert (seg.mask != masks[best]).mean() < 1e-3


def test_memory_is_bounded_one_upsample_per_prompt(l0, photo, monkeypatch):
    """A 12 MP photo with 24 box prompts: every full-resolution upsample holds one mask."""
    big = photo.resize((4000, 3000), Image.BILINEAR)
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 3400, size=(24, 2)) * [1, 0.75]
    boxes = np.concatenate([xy, xy + rng.uniform(200, 600, size=(24, 2))], axis=1)
    shapes = []
    upsample = l0.model.postprocess_masks

    def counting(masks, input_size, original_size):
        out = upsample(masks, input_size, original_size)
        shapes.append(tuple(out.shape))
        return out

    monkeypatch.setattr(l0.model, "postprocess_masks", counting)
    segments = l0.segment(big, boxes=boxes)
    assert len(segments) == 24
    assert shapes == [(1, 1, 3000, 4000)] * 24  # never N x H x W at once
    del segments


def test_bad_prompts_are_one_clear_error(l0, photo):
    cases = [
        ({"boxes": [[1, 2, 3]]}, r"shape \(N, 4\)"),
        ({"boxes": [[10, 10, 5, 20]]}, r"box 0: needs x1 > x0"),
        ({"boxes": [[0, 0, 10, 10], [400, 0, 500, 10]]}, r"box 1: .* outside the 348x348 photo"),
        ({"boxes": [[0, 0, float("nan"), 10]]}, r"box 0: not finite"),
        ({"boxes": "abc"}, r"boxes must be numbers"),
        ({"points": [[348, 10]]}, r"point 0: \[348.0, 10.0\] is not inside"),
    ]
    for kwargs, message in cases:
        with pytest.raises(SegmenterOptionError, match=message):
            l0.segment(photo, **kwargs)
    with pytest.raises(SegmenterOptionError, match="needs boxes or points"):
        l0.segment_prompts(photo)
    assert l0.segment(photo, boxes=np.zeros((0, 4))) == []
    with pytest.raises(SegmenterOptionError, match="batch_size"):
        PromptedSegmenter(l0.model, batch_size=0)


def test_whole_image_segmenter_cuts_the_boxes(photo):
    segments = WholeImageSegmenter().segment(photo, boxes=[[10.2, 20, 200, 300.5]])
    assert [s.bbox for s in segments] == [(10, 20, 200, 301)] and segments[0].mask.sum() == 190 * 281
    with pytest.raises(SegmenterOptionError, match="cannot take point prompts"):
        WholeImageSegmenter().segment(photo, points=[[1, 1]])


def _side_by_side(a: Image.Image, b: Image.Image) -> Image.Image:
    tray = Image.new("RGB", (a.width + b.width + 30, max(a.height, b.height) + 20), (90, 90, 90))
    tray.paste(a, (10, 10))
    tray.paste(b, (a.width + 20, 10))
    return tray


@pytest.fixture()
def two_sku_catalog(mobilenet_catalog, iconic):
    mobilenet_catalog.add(iconic[0][2], sku="golden")
    mobilenet_catalog.add(iconic[40][2], sku="other")
    return mobilenet_catalog


def test_recognize_with_boxes(two_sku_catalog, iconic, l0):
    """The boxes of a fixed layout are recognised in order; with no segmenter each box is the
    crop itself, so a packshot's own box matches it at distance ~0."""
    a, b = Image.open(iconic[0][2]).convert("RGB"), Image.open(iconic[40][2]).convert("RGB")
    tray = _side_by_side(a, b)
    boxes = [[a.width + 20, 10, a.width + 20 + b.width, 10 + b.height], [10, 10, 10 + a.width, 10 + a.height]]
    recs = Recognizer(two_sku_catalog).recognize(tray, boxes=boxes)
    assert [r.sku for r in recs] == ["other", "golden"] and max(r.distance for r in recs) < 1e-4
    assert [r.bbox for r in recs] == [tuple(int(v) for v in b) for b in boxes]
    recs = Recognizer(two_sku_catalog, segmenter=l0).recognize(tray, boxes=boxes)
    assert len(recs) == 2 and all(r.mask is not None for r in recs)
    for r, (x0, y0, x1, y1) in zip(recs, boxes):
        assert x0 <= r.bbox[0] and y0 <= r.bbox[1] and r.bbox[2] <= x1 and r.bbox[3] <= y1
    # Given masks are recognised as they are: the packshot's full box mask again matches at ~0.
    mask = np.zeros((tray.height, tray.width), bool)
    mask[10:10 + a.height, 10:10 + a.width] = True
    (r,) = Recognizer(two_sku_catalog).recognize(tray, masks=[mask])
    assert r.sku == "golden" and r.distance < 1e-4
    with pytest.raises(SegmenterOptionError, match="mask 0"):
        Recognizer(two_sku_catalog).recognize(tray, masks=[mask[:-1]])
    with pytest.raises(Exception, match="point prompts need a model segmenter"):
        Recognizer(two_sku_catalog).recognize(tray, points=[[5, 5]])


def test_box_files(tmp_path):
    good = tmp_path / "boxes.json"
    good.write_text(json.dumps([[0, 0, 10, 20], [5.5, 6, 7, 8]]))
    assert read_boxes(good).boxes_for("any.jpg").tolist() == [[0, 0, 10, 20], [5.5, 6, 7, 8]]
    coco = {"images": [{"id": 1, "file_name": "shots/tray.jpg", "width": 50, "height": 40},
                       {"id": 2, "file_name": "empty.jpg", "width": 50, "height": 40}],
            "categories": [{"id": 3, "name": "golden"}],
            "annotations": [{"id": 9, "image_id": 1, "category_id": 3, "bbox": [2, 3, 10, 5]}]}
    cf = tmp_path / "coco.json"
    cf.write_text(json.dumps(coco))
    box_file = read_boxes(cf)
    assert box_file.boxes_for("/elsewhere/tray.jpg").tolist() == [[2, 3, 12, 8]]
    assert box_file.boxes_for("empty.jpg").shape == (0, 4)
    with pytest.raises(CocoError, match="no image with file_name 'nope.jpg'"):
        box_file.boxes_for("nope.jpg")
    bad = {
        "not json": (r"not JSON", "{"),
        "a number": (r"expected a JSON list", "3"),
        "short box": (r"box 1 is not \[x0, y0, x1, y1\]", "[[0, 0, 1, 1], [1, 2]]"),
        "flipped": (r"box 0 needs x1 > x0", "[[5, 0, 1, 1]]"),
        "string": (r"expected a finite number", '[[0, 0, "a", 1]]'),
        "coco no lists": (r"not a COCO annotation file", '{"images": []}'),
        "coco bad image": (r"image_id 7 is not in 'images'",
                           json.dumps(dict(coco, annotations=[dict(coco["annotations"][0], image_id=7)]))),
    }
    for name, (message, text) in bad.items():
        path = tmp_path / f"{name}.json"
        path.write_text(text)
        with pytest.raises(CocoError, match=message):
            read_boxes(path)
    with pytest.raises(CocoError, match="no such file"):
        read_boxes(tmp_path / "missing.json")


def test_cli_recognize_boxes(two_sku_catalog, iconic, tmp_path, capsys):
    a, b = Image.open(iconic[0][2]).convert("RGB"), Image.open(iconic[40][2]).convert("RGB")
    photo = tmp_path / "tray.png"
    _side_by_side(a, b).save(photo)
    boxes = [[10, 10, 10 + a.width, 10 + a.height], [a.width + 20, 10, a.width + 20 + b.width, 10 + b.height]]
    coco = {"images": [{"id": 1, "file_name": "tray.png", "width": 1, "height": 1}],
            "categories": [{"id": 1, "name": "x"}],
            "annotations": [{"image_id": 1, "category_id": 1, "bbox": [x0, y0, x1 - x0, y1 - y0]} for x0, y0, x1, y1 in boxes]}
    d = str(two_sku_catalog.root)
    for content in (boxes, coco):
        (tmp_path / "boxes.json").write_text(json.dumps(content))
        capsys.readouterr()
        assert main(["--catalog", d, "recognize", str(photo), "--boxes", str(tmp_path / "boxes.json"), "--json"]) == 0
        out = json.loads(capsys.readouterr().out)[0]["recognitions"]
        assert [r["sku"] for r in out] == ["golden", "other"] and [r["bbox"] for r in out] == boxes
    (tmp_path / "bad.json").write_text('{"images": 1}')
    capsys.readouterr()
    assert main(["--catalog", d, "recognize", str(photo), "--boxes", str(tmp_path / "bad.json")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a COCO annotation file" in err
