import csv
import os
import threading

import numpy as np
import pytest
from conftest import write_snapshot
from imagekinds import write_bad_files

from catalog import Catalog
from retailklip.errors import InvalidImageError
from catalog.errors import CatalogError, DuplicateSKUError, InvalidSKUError, UnknownSKUError


def test_add_list_remove(store_catalog, iconic):
    cat = store_catalog
    info = cat.add(iconic[0][2], sku="golden", name="Golden Delicious")
    assert (info.sku, info.name, info.references, info.vectors) == ("golden", "Golden Delicious", 1, 2)
    cat.add(iconic[1][2])  # default id: the file name without extension
    assert [s.sku for s in cat.list_skus()] == ["Granny-Smith_Iconic", "golden"]
    stored = cat.reference_path("golden")[0]
    assert stored.read_bytes() == iconic[0][2].read_bytes()
    assert stored.name.startswith(__import__("hashlib").sha256(stored.read_bytes()).hexdigest())
    g = cat.generation
    cat.remove("golden")
    assert cat.generation == g + 1 and not stored.exists()
    assert [s.sku for s in cat.list_skus()] == ["Granny-Smith_Iconic"]
    with pytest.raises(UnknownSKUError, match="nope"):
        cat.remove("nope")


def test_append_reference(store_catalog, iconic):
    cat = store_catalog
    cat.add(iconic[0][2], sku="apple")
    info = cat.add(iconic[1][2], sku="apple", append=True)
    assert info.references == 2 and info.vectors == 4
    with pytest.raises(UnknownSKUError):
        cat.add(iconic[2][2], sku="pear", append=True)


def test_duplicates_and_bad_ids_write_nothing(store_catalog, iconic):
    cat = store_catalog
    cat.add(iconic[0][2], sku="golden")
    before = write_snapshot(cat)
    with pytest.raises(DuplicateSKUError, match="already exists"):
        cat.add(iconic[1][2], sku="golden")
    with pytest.raises(DuplicateSKUError, match="already a reference image of SKU 'golden'"):
        cat.add(iconic[0][2], sku="other")
    for bad in ["", "a/b", "..", ".", "x\x00y", "tab\there", "x" * 129, " padded"]:
        with pytest.raises(InvalidSKUError):
            cat.add(iconic[1][2], sku=bad)
    with pytest.raises(InvalidSKUError):
        cat.add(iconic[1][2], sku="ok", name="bad\x00name")
    csv_path = cat.root.parent / "skus.csv"  # an import with one taken id writes none of its rows
    csv_path.write_text(f"image,sku,name\n{iconic[2][2]},new,New\n{iconic[3][2]},golden,Again\n")
    with pytest.raises(DuplicateSKUError, match="golden"):
        cat.import_csv(csv_path, progress=False)
    assert write_snapshot(cat) == before
    assert [s.sku for s in cat.list_skus()] == ["golden"]


def test_bad_images_write_nothing(store_catalog, iconic, tmp_path):
    cat = store_catalog
    cat.add(iconic[0][2], sku="golden")
    before = write_snapshot(cat)
    for kind, path in write_bad_files(iconic[0][2], tmp_path / "bad").items():
        with pytest.raises(InvalidImageError):
            cat.add(path, sku=f"sku-{kind}")
    assert write_snapshot(cat) == before


def test_unicode_ids_and_names(store_catalog, iconic):
    cat = store_catalog
    cat.add(iconic[0][2], sku="äpple-🍎", name="Äpple Golden 金")
    assert cat.get("äpple-🍎").name == "Äpple Golden 金"


def _write_csv(path, rows, header=("image", "sku", "name")):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def test_import_csv_all_or_nothing(store_catalog, iconic, tmp_path):
    cat = store_catalog
    rows = [(os.path.relpath(p, tmp_path), f"sku{c}", name) for c, name, p in iconic[:4]]
    _write_csv(tmp_path / "ok.csv", rows)
    assert [r.references for r in cat.import_csv(tmp_path / "ok.csv", progress=False)] == [1] * 4
    assert len(cat) == 4
    before = write_snapshot(cat)
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    _write_csv(tmp_path / "bad.csv", [(os.path.relpath(iconic[5][2], tmp_path), "new1", "n"), ("broken.jpg", "new2", "n")])
    with pytest.raises(InvalidImageError, match=r"bad.csv:3"):
        cat.import_csv(tmp_path / "bad.csv", progress=False)
    _write_csv(tmp_path / "cols.csv", [("a.jpg", "n")], header=("picture", "name"))
    with pytest.raises(CatalogError, match="missing column"):
        cat.import_csv(tmp_path / "cols.csv", progress=False)
    _write_csv(tmp_path / "dup.csv", [(os.path.relpath(iconic[5][2], tmp_path), "x", ""), (os.path.relpath(iconic[6][2], tmp_path), "x", "")])
    with pytest.raises(DuplicateSKUError, match="repeated"):
        cat.import_csv(tmp_path / "dup.csv", progress=False)
    _write_csv(tmp_path / "exists.csv", [(os.path.relpath(iconic[5][2], tmp_path), "sku0", "")])
    with pytest.raises(DuplicateSKUError):
        cat.import_csv(tmp_path / "exists.csv", progress=False)
    _write_csv(tmp_path / "empty.csv", [])
    with pytest.raises(CatalogError, match="no rows"):
        cat.import_csv(tmp_path / "empty.csv", progress=False)
    assert write_snapshot(cat) == before


def test_open_errors_and_reinit(tmp_path, tiny_catalog):
    with pytest.raises(CatalogError, match="no catalog at"):
        Catalog.open(tmp_path / "missing")
    with pytest.raises(CatalogError, match="already holds a catalog"):
        Catalog.init(tiny_catalog.root, encoder="timm:mobilenetv2_100", random_init=True)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "catalog.db").write_bytes(b"garbage" * 100)
    with pytest.raises(CatalogError):
        Catalog.open(tmp_path / "junk")
    with pytest.raises(CatalogError, match="augmentations"):
        Catalog.init(tmp_path / "k0", encoder="timm:mobilenetv2_100", random_init=True, augmentations=0)
    assert not (tmp_path / "k0").exists()


def test_missing_weights_creates_nothing(tmp_path):
    from retailklip.errors import WeightsError

    with pytest.raises(WeightsError, match="--weights"):
        Catalog.init(tmp_path / "c", encoder="timm:mobilenetv2_100", weights=tmp_path / "nope.safetensors")
    assert not (tmp_path / "c").exists()


def test_encoder_weights_changed_is_detected(tmp_path, tiny_clip_encoder, iconic):
    from conftest import TINY_CLIP_OPTIONS, TINY_CLIP_SPEC
    from safetensors.torch import save_file

    from retailklip.errors import EncoderMismatchError

    w = tmp_path / "w.safetensors"
    sd = {k: v.contiguous().clone() for k, v in tiny_clip_encoder.model.state_dict().items()}
    save_file(sd, str(w))
    Catalog.init(tmp_path / "c", encoder=TINY_CLIP_SPEC, weights=w, augmentations=1, encoder_options=TINY_CLIP_OPTIONS)
    k = next(iter(sd))
    sd[k] = sd[k] + 1.0
    save_file(sd, str(w))  # the weights file changed under the catalog
    with pytest.raises(EncoderMismatchError, match="mismatch"):
        Catalog.open(tmp_path / "c").add(iconic[0][2])


def test_center_photos_are_stored_with_the_encoder(tmp_path, mobilenet_weights, val_photos, iconic):
    from conftest import MOBILENET_OPTIONS, MOBILENET_SPEC

    photos = [p for p, _ in val_photos[::60]]
    cat = Catalog.init(tmp_path / "c", encoder=MOBILENET_SPEC, weights=mobilenet_weights, augmentations=1,
                       encoder_options=MOBILENET_OPTIONS, center_photos=photos)
    ident = cat.encoder_identity()
    assert ident.center.startswith("sha256:")
    again = Catalog.open(cat.root)
    enc = again.encoder()  # rebuilt from the stored spec + centre: same identity, no mismatch
    assert enc.identity == ident
    np.testing.assert_allclose(enc.center.numpy(), enc.mean_feature(photos), rtol=1e-5, atol=1e-6)
    with pytest.raises(CatalogError, match="no photos"):
        Catalog.init(tmp_path / "d", encoder=MOBILENET_SPEC, weights=mobilenet_weights, center_photos=[])


def test_concurrent_writers_lose_no_update(store_catalog, iconic):
    """Two writers (separate engines, as two processes would have) bump the generation
    concurrently; every bump and every row lands."""
    root = store_catalog.root
    start = store_catalog.generation
    writers = [Catalog.open(root), Catalog.open(root)]
    n = 50
    barrier = threading.Barrier(len(writers))
    errors: list[BaseException] = []

    def work(k: int, cat: Catalog) -> None:
        try:
            barrier.wait()
            for i in range(n):
                cat.set_threshold(0.3 + 0.01 * ((i + k) % 10))
            cat.add(iconic[k][2], sku=f"w{k}")
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k, c)) for k, c in enumerate(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    for c in writers:
        c.close()
    assert not errors, errors
    assert store_catalog.generation == start + len(writers) * (n + 1)
    assert [s.sku for s in store_catalog.list_skus()] == ["w0", "w1"]


def test_listed_times_are_aware_utc_on_every_backend(store_catalog, iconic):
    """SQLite keeps no time zone; every listing still reports when, in UTC, on both backends."""
    from datetime import datetime, timedelta, timezone

    cat = store_catalog
    before = datetime.now(timezone.utc) - timedelta(seconds=1)
    cat.add(iconic[0][2], sku="golden")
    cat.add_outliers([iconic[1][2]], ["not sold here"])
    after = datetime.now(timezone.utc) + timedelta(seconds=1)
    listed = [*cat.list_skus(), *cat.reference_images(), *cat.list_outliers(), *cat.versions()]
    assert len(listed) >= 4
    for item in listed:
        assert item.created.utcoffset() == timedelta(0), item
        assert item.to_dict()["created"].endswith("+00:00")
    assert all(before <= item.created <= after for item in listed[:3])  # the version may predate the SKU
