import threading

import numpy as np
import pytest

from catalog import Catalog
from retailklip import Recognition, Recognizer
from retailklip.errors import EmptyCatalogError, InvalidImageError


def test_empty_catalog_is_a_clear_error(tiny_catalog, val_photos):
    rec = Recognizer(tiny_catalog)
    with pytest.raises(EmptyCatalogError, match="catalog add"):
        rec.recognize(val_photos[0][0])


def test_new_sku_recognised_at_once_and_removal_stops_matching(mobilenet_catalog, iconic, val_photos):
    """With the real MobileNetV2: a photo of a product matches the product right after it is
    added, with no rebuild, and stops matching it right after it is removed."""
    cat = mobilenet_catalog
    by_name = {name: path for _, name, path in iconic}
    for name in ["Golden-Delicious", "Lemon", "Orange", "Red-Bell-Pepper", "Pineapple"]:
        cat.add(by_name[name], sku=name)
    rec = Recognizer(cat, threshold=2.0)  # no cutoff: test the 1-NN itself
    photos = [p for p, _ in val_photos if "/Banana/" in str(p)][:4]
    before = [r.nearest_sku for p in photos for r in rec.recognize(p)]
    assert "Banana" not in before
    # Another process-like handle on the same catalog adds the SKU (as `catalog add` would).
    Catalog.open(cat.root).add(by_name["Banana"], sku="Banana", name="Banana")
    after = [rec.recognize(p)[0] for p in photos]
    assert sum(r.nearest_sku == "Banana" for r in after) >= 3
    r = after[0]
    assert isinstance(r, Recognition) and r.name in ("Banana", None)
    assert r.runner_up is not None and r.runner_up.sku != r.nearest_sku and r.runner_up.distance >= r.distance
    assert r.bbox == (0, 0, 348, 348)
    Catalog.open(cat.root).remove("Banana")
    assert all(rec.recognize(p)[0].nearest_sku != "Banana" for p in photos)


def test_threshold_turns_far_matches_unknown(mobilenet_catalog, iconic, val_photos):
    cat = mobilenet_catalog
    cat.add(iconic[0][2], sku="golden")
    cat.add(iconic[1][2], sku="granny")
    photo = val_photos[0][0]
    d = Recognizer(cat, threshold=2.0).recognize(photo)[0].distance
    assert Recognizer(cat, threshold=d + 1e-4).recognize(photo)[0].sku is not None
    r = Recognizer(cat, threshold=max(d - 1e-3, 0.0)).recognize(photo)[0]
    assert r.sku is None and r.nearest_sku in ("golden", "granny") and not r.known
    assert r.to_dict()["sku"] is None and r.to_dict()["nearest_sku"] == r.nearest_sku
    cat.set_threshold(0.0)
    assert Recognizer(cat).recognize(photo)[0].sku is None


def test_bad_image_raises_and_catalog_unchanged(tiny_catalog, iconic, tmp_path):
    tiny_catalog.add(iconic[0][2], sku="a")
    bad = tmp_path / "x.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0garbage")
    with pytest.raises(InvalidImageError):
        Recognizer(tiny_catalog).recognize(bad)


def test_concurrent_recognize_while_catalog_changes(tiny_catalog, iconic, val_photos):
    """Threads recognising while another adds and removes SKUs: no exception, and every answer
    names an SKU that existed in some catalog version."""
    cat = tiny_catalog
    for c, name, path in iconic[:3]:
        cat.add(path, sku=name)
    rec = Recognizer(cat, threshold=2.0)
    errors, answers = [], []
    stop = threading.Event()

    def reader(n):
        try:
            i = 0
            while not stop.is_set():
                answers.append(rec.recognize(val_photos[(n * 7 + i) % len(val_photos)][0])[0].nearest_sku)
                i += 1
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=reader, args=(n,)) for n in range(3)]
    for t in threads:
        t.start()
    extra = [name for _, name, _ in iconic[3:7]]
    try:
        for (_, name, path) in iconic[3:7]:
            cat.add(path, sku=name)
        for name in extra[:2]:
            cat.remove(name)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors, errors
    assert answers and set(answers) <= {name for _, name, _ in iconic[:7]}
    rec.refresh()
    assert set(rec.matcher.sku_of.values()) == {s.sku for s in cat.list_skus()}
    assert rec.matcher.index.ntotal == 2 * len(cat)


def test_segmenter_hook(tiny_catalog, iconic, val_photos):
    """A segmenter's segments are each recognised; boxes and masks are passed through."""
    from dataclasses import dataclass

    from PIL import Image

    @dataclass
    class Seg:
        mask: np.ndarray
        bbox: tuple
        score: float
        crop: Image.Image

    class TwoHalves:
        def segment(self, image):
            w, h = image.size
            out = []
            for x0, x1 in ((0, w // 2), (w // 2, w)):
                m = np.zeros((h, w), bool)
                m[:, x0:x1] = True
                out.append(Seg(m, (x0, 0, x1, h), 0.9, image.convert("RGBA").crop((x0, 0, x1, h))))
            return out

    tiny_catalog.add(iconic[0][2], sku="a")
    recs = Recognizer(tiny_catalog, segmenter=TwoHalves()).recognize(val_photos[0][0])
    assert [r.bbox for r in recs] == [(0, 0, 174, 348), (174, 0, 348, 348)]
    assert all(r.mask is not None and r.score == 0.9 for r in recs)
