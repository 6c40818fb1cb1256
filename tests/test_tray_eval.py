"""Tray-level evaluation (``catalog eval --layout coco``) on a tiny COCO tray set built here from
real GroceryStore packshots: each packshot is cut from its white background by thresholding,
pasted onto a real GroceryStore photo, and annotated with that cut-out mask as RLE.

The catalog holds the cut-outs themselves, so recognising an annotated mask reproduces a
reference's pixels exactly (distance ~0, real MobileNetV2 weights): with ``--masks
ground-truth`` the outcome of every object is known, and the metrics are checked against it.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from catalog.cli import main
from retailklip import Recognizer
from retailklip.coco import CocoAnnotation, CocoError, decode_segmentation, read_coco
from retailklip.tray_eval import evaluate_trays, mask_iou

THRESHOLD = 0.05  # known objects match at ~1e-6; the packshot not in the catalog is far beyond


def _cutout(path) -> tuple[np.ndarray, np.ndarray]:
    """(RGB pixels, bool mask) of a packshot cut to its non-white pixels' tight box."""
    rgb = np.asarray(Image.open(path).convert("RGB"))
    mask = (rgb < 235).any(axis=2)
    ys, xs = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    sl = np.s_[ys[0]:ys[-1] + 1, xs[0]:xs[-1] + 1]
    return rgb[sl], mask[sl]


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE: run lengths of the column-major flattening, starting with 0s."""
    flat = mask.flatten(order="F").astype(np.int8)
    edges = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], edges, [flat.size]])).tolist()
    if flat[0]:
        runs = [0, *runs]
    return {"size": list(mask.shape), "counts": runs}


@pytest.fixture(scope="module")
def packshots(iconic) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {"golden": _cutout(iconic[0][2]), "oatly": _cutout(iconic[40][2]), "stranger": _cutout(iconic[60][2])}


@pytest.fixture()
def trays(tmp_path, packshots, grocery_store) -> tuple:
    """Three 600x400 trays on real store photos: [golden, oatly], [golden, stranger (not in the
    catalog)], [oatly, oatly]; annotations alternate compressed and uncompressed RLE."""
    backgrounds = [p.path for p in grocery_store.photos("train")[:3]]
    layouts = [["golden", "oatly"], ["golden", "stranger"], ["oatly", "oatly"]]
    names = sorted({n for layout in layouts for n in layout})
    coco = {"images": [], "annotations": [], "categories": [{"id": i + 1, "name": n} for i, n in enumerate(names)]}
    for t, (bg, layout) in enumerate(zip(backgrounds, layouts)):
        tray = np.array(Image.open(bg).convert("RGB").resize((600, 400)))
        coco["images"].append({"id": t + 1, "file_name": f"tray_{t}.png", "width": 600, "height": 400})
        for k, name in enumerate(layout):
            rgb, mask = packshots[name]
            x, y = 20 + 300 * k, 30
            full = np.zeros((400, 600), bool)
            full[y:y + mask.shape[0], x:x + mask.shape[1]] = mask
            tray[full] = rgb[mask]
            if k % 2 == 0:
                rle = mask_utils.encode(np.asfortranarray(full.astype(np.uint8)))
                segm = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
            else:
                segm = _uncompressed_rle(full)
            x0, y0, w, h = mask_utils.toBbox(mask_utils.encode(np.asfortranarray(full.astype(np.uint8)))).tolist()
            coco["annotations"].append({"id": len(coco["annotations"]) + 1, "image_id": t + 1,
                                        "category_id": names.index(name) + 1, "bbox": [x0, y0, w, h],
                                        "segmentation": segm})
        Image.fromarray(tray).save(tmp_path / f"tray_{t}.png")
    path = tmp_path / "trays.json"
    path.write_text(json.dumps(coco))
    return path, coco


@pytest.fixture()
def cutout_catalog(mobilenet_catalog, packshots, tmp_path):
    """golden and oatly as RGBA cut-outs (alpha 0 off the packshot); stranger is not added."""
    for sku in ("golden", "oatly"):
        rgb, mask = packshots[sku]
        rgba = np.dstack([rgb, np.where(mask, 255, 0).astype(np.uint8)])
        Image.fromarray(rgba, "RGBA").save(tmp_path / f"{sku}.png")
        mobilenet_catalog.add(tmp_path / f"{sku}.png", sku=sku)
    return mobilenet_catalog


def test_ground_truth_masks_recognise_exactly(cutout_catalog, trays):
    path, _ = trays
    result = evaluate_trays(read_coco(path), Recognizer(cutout_catalog, threshold=THRESHOLD), masks="ground-truth")
    assert (result.photos, result.objects, result.predictions, result.objects_not_in_catalog) == (3, 6, 6, 1)
    assert result.checkout_accuracy == 1.0 and result.count_error == 0.0
    assert result.precision == result.recall == result.segmentation_recall == 1.0
    assert result.unknown == {"rejected": 1, "named_as_sku": 0, "not_segmented": 0, "predicted": 1,
                              "on_catalog_products": 0, "on_nothing": 0}
    assert [p.true_counts for p in result.per_photo] == [{"golden": 1, "oatly": 1}, {"golden": 1}, {"oatly": 2}]
    assert [p.predicted_unknown for p in result.per_photo] == [0, 1, 0]
    assert result.per_sku["oatly"] == {"true_positives": 3, "predicted": 3, "objects": 3, "precision": 1.0, "recall": 1.0}
    # With a loose threshold the stranger is named as a catalog SKU: the bill is wrong.
    loose = evaluate_trays(read_coco(path), Recognizer(cutout_catalog, threshold=2.0), masks="ground-truth")
    assert loose.unknown["named_as_sku"] == 1 and loose.unknown["rejected"] == 0
    assert loose.checkout_accuracy == pytest.approx(2 / 3) and loose.count_error == pytest.approx(2 / 3)
    assert loose.precision == pytest.approx(5 / 6) and loose.recall == 1.0


def test_a_wrong_count_lowers_cacc(cutout_catalog, trays, tmp_path):
    """Annotate tray 2's second oatly as golden: the recognitions (oatly, oatly) are now wrong
    for that photo: cAcc 2/3, count error |2 - 1| + |0 - 1| = 2 on it."""
    _, coco = trays
    golden_id = next(c["id"] for c in coco["categories"] if c["name"] == "golden")
    coco["annotations"][-1]["category_id"] = golden_id
    path = tmp_path / "wrong.json"
    path.write_text(json.dumps(coco))
    result = evaluate_trays(read_coco(path), Recognizer(cutout_catalog, threshold=THRESHOLD), masks="ground-truth")
    assert [p.correct for p in result.per_photo] == [True, True, False]
    assert result.checkout_accuracy == pytest.approx(2 / 3) and result.count_error == pytest.approx(2 / 3)
    assert result.precision == pytest.approx(4 / 5) and result.recall == pytest.approx(4 / 5)
    assert result.per_sku["golden"]["recall"] == pytest.approx(2 / 3)


def test_predicted_masks_whole_image_scans(cutout_catalog, packshots, tmp_path):
    """Single-item scans on grey 128 (what the encoder composites transparency onto) through the
    predicted path with no segmenter: the whole photo is the one segment, its IoU with the
    packshot's mask is the packshot's fill of its box, and the match decides segmentation
    recall but not the counts."""
    coco = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "golden"}, {"id": 2, "name": "oatly"}]}
    fills = []
    for t, sku in enumerate(("golden", "oatly")):
        rgb, mask = packshots[sku]
        photo = np.full(rgb.shape, 128, np.uint8)
        photo[mask] = rgb[mask]
        Image.fromarray(photo).save(tmp_path / f"scan_{t}.png")
        h, w = mask.shape
        coco["images"].append({"id": t + 1, "file_name": f"scan_{t}.png", "width": w, "height": h})
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        coco["annotations"].append({"id": t + 1, "image_id": t + 1, "category_id": t + 1, "bbox": [0, 0, w, h],
                                    "segmentation": {"size": [h, w], "counts": rle["counts"].decode("ascii")}})
        fills.append(mask.mean())
    path = tmp_path / "scans.json"
    path.write_text(json.dumps(coco))
    rec = Recognizer(cutout_catalog, threshold=THRESHOLD)
    assert min(fills) > 0.5
    result = evaluate_trays(read_coco(path), rec)
    assert result.segmenter == "whole image" and result.checkout_accuracy == 1.0
    assert result.precision == result.recall == result.segmentation_recall == 1.0
    strict = evaluate_trays(read_coco(path), rec, iou_threshold=float(max(fills)) + 0.01)
    assert strict.checkout_accuracy == 1.0 and strict.segmentation_recall == 0.0 and strict.precision == 0.0
    assert strict.unknown["on_nothing"] == 0  # the predictions are named SKUs, just not on a matched object


def test_decode_segmentation_formats():
    mask = np.zeros((30, 40), bool)
    mask[5:20, 10:35] = True
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    forms = [{"size": [30, 40], "counts": rle["counts"].decode("ascii")}, _uncompressed_rle(mask)]
    for segm in forms:
        assert np.array_equal(decode_segmentation(CocoAnnotation(1, "x", (10, 5, 25, 15), segm), 30, 40), mask)
    polygon = [[10, 5, 35, 5, 35, 20, 10, 20]]
    decoded = decode_segmentation(CocoAnnotation(1, "x", (10, 5, 25, 15), polygon), 30, 40)
    assert mask_iou(decoded, (0, 0, 40, 30), mask, (0, 0, 40, 30)) > 0.9
    box_only = decode_segmentation(CocoAnnotation(1, "x", (10, 5, 25, 15), None), 30, 40)
    assert np.array_equal(box_only, mask)
    with pytest.raises(CocoError, match="size"):
        decode_segmentation(CocoAnnotation(3, "x", (0, 0, 1, 1), dict(forms[0], size=[31, 40])), 30, 40)
    with pytest.raises(CocoError, match="annotation 4: 'segmentation' must be"):
        decode_segmentation(CocoAnnotation(4, "x", (0, 0, 1, 1), [[1, 2, 3]]), 30, 40)
    with pytest.raises(CocoError, match="empty"):
        decode_segmentation(CocoAnnotation(5, "x", (0, 0, 1, 1), _uncompressed_rle(np.zeros((30, 40), bool))), 30, 40)


def test_cli_eval_coco(cutout_catalog, trays, tmp_path, capsys):
    path, coco = trays
    d = str(cutout_catalog.root)
    capsys.readouterr()
    assert main(["--catalog", d, "eval", "--layout", "coco", str(path), "--masks", "ground-truth",
                 "--threshold", str(THRESHOLD), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["checkout_accuracy"] == 1.0 and out["unknown"]["rejected"] == 1 and len(out["per_photo"]) == 3
    assert main(["--catalog", d, "eval", "--layout", "coco", str(path), "--masks", "ground-truth",
                 "--threshold", str(THRESHOLD)]) == 0
    text = capsys.readouterr().out
    assert "checkout accuracy (cAcc)       1.000  (3 of 3 photos counted right)" in text
    # The photos elsewhere: --images; a missing photo or a bad file is one error line.
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    (moved / "trays.json").write_text(json.dumps(coco))
    assert main(["--catalog", d, "eval", "--layout", "coco", str(moved / "trays.json"), "--masks", "ground-truth",
                 "--images", str(tmp_path), "--json"]) == 0
    capsys.readouterr()
    assert main(["--catalog", d, "eval", "--layout", "coco", str(moved / "trays.json"), "--masks", "ground-truth"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "tray_0.png" in err
    (tmp_path / "bad.json").write_text(json.dumps(dict(coco, annotations=[{"image_id": 1}])))
    assert main(["--catalog", d, "eval", "--layout", "coco", str(tmp_path / "bad.json")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "annotations[0]" in err
    assert main(["--catalog", d, "eval", "--layout", "coco", str(path), "--encoder", "timm:x"]) == 1
    assert "--encoder: not used with --layout coco" in capsys.readouterr().err
    assert main(["--catalog", d, "eval", "--layout", "grocery-store", str(tmp_path), "--masks", "ground-truth"]) == 1
    assert "--masks: only with --layout coco" in capsys.readouterr().err


def test_predicted_masks_with_a_sam_segmenter(cutout_catalog, trays):
    """The full pipeline with EfficientViT-SAM-L0 (random weights: meaningless masks, so only the
    bookkeeping is checked): every metric agrees with the per-photo results."""
    import torch

    from retailklip.segment import MaskGeneratorOptions, load_segmenter

    torch.manual_seed(0)
    seg = load_segmenter("efficientvit-sam-l0", random_init=True,
                         generator_options=MaskGeneratorOptions(points_per_side=4, pred_iou_thresh=0.0,
                                                                stability_score_thresh=0.0))
    path, _ = trays
    result = evaluate_trays(read_coco(path), Recognizer(cutout_catalog, threshold=THRESHOLD, segmenter=seg))
    assert result.segmenter == "efficientvit-sam-l0" and result.photos == 3 and result.objects == 6
    assert result.predictions == sum(p.predictions for p in result.per_photo) > 0
    assert result.count_error == pytest.approx(np.mean([p.count_error for p in result.per_photo]))
    assert result.checkout_accuracy == pytest.approx(np.mean([p.correct for p in result.per_photo]))
    assert result.unknown["predicted"] == sum(p.predicted_unknown for p in result.per_photo)
    u = result.unknown
    assert u["rejected"] + u["named_as_sku"] + u["not_segmented"] == result.objects_not_in_catalog
    assert u["rejected"] + u["on_catalog_products"] + u["on_nothing"] == u["predicted"]
