"""Overlay pictures: masks tinted, boxes, labels; nothing else changes (``--overlay`` too)."""

import json
import os

import numpy as np
import pytest
from conftest import TINY_CLIP_OPTIONS
from PIL import Image

from catalog import Catalog
from catalog.cli import main
from retailklip import Recognition, Recognizer
from retailklip.errors import RetailKlipError
from retailklip.overlay import (
    UNKNOWN_COLOR,
    OverlayStyle,
    draw_overlay,
    label_boxes,
    overlay_paths,
    save_overlay,
)
from retailklip.segment import make_segment


def _photo(w=320, h=240):
    """A smooth gradient photo (no pixel equals a tint by accident)."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // w, y * 255 // h, (x + y) * 127 // (w + h) + 64], axis=-1).astype(np.uint8)


def _disc(h, w, cx, cy, r):
    y, x = np.mgrid[0:h, 0:w]
    return (x - cx) ** 2 + (y - cy) ** 2 <= r * r


def _rec(mask, sku, distance, name=None):
    ys, xs = np.nonzero(mask)
    bbox = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
    return Recognition(sku=sku, nearest_sku=sku or "lemon", name=name, distance=distance, threshold=0.4,
                       runner_up=None, bbox=bbox, mask=mask, score=0.9)


def _band(h, w, bbox, width):
    """The inward outline band of a box."""
    x0, y0, x1, y1 = bbox
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    m[y0 + width : y1 - width, x0 + width : x1 - width] = False
    return m


def test_overlay_changes_pixels_only_in_masks_boxes_and_labels(tmp_path):
    photo = _photo()
    h, w = photo.shape[:2]
    known = _rec(_disc(h, w, 90, 150, 50), "banana", 0.21, name="Banana")
    unknown = _rec(_disc(h, w, 230, 130, 45), None, 0.63)
    style = OverlayStyle()
    out = np.asarray(draw_overlay(photo, [known, unknown], style))
    assert out.shape == photo.shape
    changed = (out != photo).any(axis=2)
    line, _ = style.widths((w, h))
    allowed = known.mask | unknown.mask | _band(h, w, known.bbox, line) | _band(h, w, unknown.bbox, line)
    labels = label_boxes((w, h), [known, unknown], style)
    for x0, y0, x1, y1 in labels:
        allowed[y0:y1, x0:x1] = True
    assert not (changed & ~allowed).any(), "pixels changed outside masks, boxes and labels"
    # Every mask pixel changes (tinted, or under an outline or a label); every label is drawn.
    for r in (known, unknown):
        assert changed[r.mask].all()
    for x0, y0, x1, y1 in labels:
        assert changed[y0:y1, x0:x1].mean() > 0.5
    # The unknown is drawn in red: its label box is red and its mask tint pulls towards red.
    x0, y0, x1, y1 = labels[1]
    assert np.all(out[y0:y1, x0:x1] == UNKNOWN_COLOR, axis=2).mean() > 0.3
    plain = unknown.mask & ~_band(h, w, unknown.bbox, line)
    for x0, y0, x1, y1 in labels:
        plain[y0:y1, x0:x1] = False
    assert (out[plain][:, 0].astype(int) - photo[plain][:, 0]).mean() > 20
    assert (out[plain][:, 2].astype(int) - photo[plain][:, 2]).mean() < 0
    Image.fromarray(out).save(tmp_path / "overlay.png")  # for a look while debugging


def test_whole_image_recognition_changes_only_border_and_label():
    photo = _photo()
    h, w = photo.shape[:2]
    r = Recognition(sku=None, nearest_sku="milk", name=None, distance=0.9, threshold=0.4, runner_up=None,
                    bbox=(0, 0, w, h), mask=None)
    out = np.asarray(draw_overlay(photo, [r]))
    changed = (out != photo).any(axis=2)
    line = OverlayStyle().widths((w, h))[0]
    x0, y0, x1, y1 = label_boxes((w, h), [r])[0]
    allowed = _band(h, w, (0, 0, w, h), line)
    allowed[y0:y1, x0:x1] = True
    assert changed.any() and not (changed & ~allowed).any()
    assert (y0, x0) == (0, 0)  # no room above the box: the label sits inside it


def test_mask_of_wrong_shape_and_bad_paths(tmp_path):
    photo = _photo()
    r = _rec(np.ones((10, 10), bool), "x", 0.1)
    with pytest.raises(ValueError, match="does not match"):
        draw_overlay(photo, [r])
    with pytest.raises(RetailKlipError, match="suffix"):
        save_overlay(photo, [], tmp_path / "out.gif")
    with pytest.raises(RetailKlipError, match="does not exist"):
        save_overlay(photo, [], tmp_path / "missing" / "out.png")
    assert os.listdir(tmp_path) == []
    assert overlay_paths("a/out.png", 1) == [overlay_paths("a/out.png", 1)[0]]
    assert [p.name for p in overlay_paths("a/out.png", 3)] == ["out_0.png", "out_1.png", "out_2.png"]


class _TwoHalves:
    """A stand-in segmenter: the left and right halves of the photo, as real segments."""

    def segment(self, image):
        from retailklip.images import load_image

        im = load_image(image)
        left = np.zeros((im.height, im.width), bool)
        left[:, : im.width // 2] = True
        right = _disc(im.height, im.width, im.width * 3 // 4, im.height // 2, min(im.size) // 5)
        return [make_segment(im, left, 0.9), make_segment(im, right, 0.8)]


def test_recognizer_segments_to_overlay_png(tiny_catalog, iconic, val_photos, tmp_path):
    tiny_catalog.add(iconic[0][2], sku="golden", name="Golden Delicious")
    tiny_catalog.add(iconic[10][2], sku=iconic[10][1])
    photo = val_photos[0][0]
    rec = Recognizer(tiny_catalog, segmenter=_TwoHalves(), threshold=2.0)
    recs = rec.recognize(photo)
    assert len(recs) == 2 and all(r.mask is not None for r in recs)
    path = save_overlay(photo, recs, tmp_path / "o.png")
    out = np.asarray(Image.open(path))
    src = np.asarray(Image.open(photo).convert("RGB"))
    assert out.shape == src.shape and (out != src).any()
    # Outside both segments, their outlines and labels: the photo itself.
    h, w = src.shape[:2]
    allowed = recs[0].mask | recs[1].mask
    for x0, y0, x1, y1 in label_boxes((w, h), recs):
        allowed[y0:y1, x0:x1] = True
    line = OverlayStyle().widths((w, h))[0]
    for r in recs:
        allowed |= _band(h, w, r.bbox, line)
    assert np.array_equal(out[~allowed], src[~allowed])


@pytest.fixture()
def cli_catalog(tmp_path, iconic):
    d = tmp_path / "cat"
    opts = json.dumps(TINY_CLIP_OPTIONS["model_overrides"])
    assert main(["--catalog", str(d), "init", "--encoder", "open_clip:ViT-B-32", "--random-init",
                 "--augmentations", "2", "--threshold", "0.3", "--encoder-option", f"model_overrides={opts}"]) == 0
    Catalog.open(d).add(iconic[0][2], sku="golden")
    return d


def test_cli_recognize_overlay_one_and_several_images(cli_catalog, iconic, val_photos, tmp_path, capsys):
    d, photo = str(cli_catalog), str(val_photos[0][0])
    out = tmp_path / "shots" / "out.png"
    out.parent.mkdir()
    capsys.readouterr()
    assert main(["--catalog", d, "recognize", photo, "--overlay", str(out), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res[0]["overlay"] == str(out) and Image.open(out).size == Image.open(photo).size
    # A threshold near 0: the reference itself is known, the store photo unknown.
    assert main(["--catalog", d, "recognize", photo, str(iconic[0][2]), "--overlay", str(out), "--json",
                 "--threshold", "0.0001"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res[0]["recognitions"][0]["sku"] is None
    assert [r["overlay"] for r in res] == [str(out.parent / "out_0.png"), str(out.parent / "out_1.png")]
    # The reference itself (distance 0) is known: its picture has no red (unknown) label.
    assert res[1]["recognitions"][0]["sku"] == "golden"
    pic = np.asarray(Image.open(out.parent / "out_1.png"))
    assert pic.shape[1::-1] == Image.open(iconic[0][2]).size and not np.all(pic == UNKNOWN_COLOR, axis=2).any()
    first = np.asarray(Image.open(out.parent / "out_0.png"))
    assert np.all(first == UNKNOWN_COLOR, axis=2).sum() > 100  # red label and outline
    before = sorted(os.listdir(out.parent))
    assert main(["--catalog", d, "recognize", photo, "--overlay", str(out.parent / "o.gif")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("catalog: error: ") and "\n" not in err
    assert sorted(os.listdir(out.parent)) == before
