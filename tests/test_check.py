"""`catalog check [--repair]`: each kind of drift is detected, repaired, and recognition works
afterwards (issue 7 item 3).  Real GroceryStore packshots, tiny random encoder."""

from __future__ import annotations

import os
import shutil
import time

import numpy as np
import pytest
from sqlalchemy import delete, select, update

from catalog import Catalog
from catalog.check import check
from catalog.cli import main
from catalog.index_store import INDEX_FILE
from catalog.models import Embedding, ReferenceImage
from retailklip import Recognizer


@pytest.fixture()
def filled(tiny_catalog, iconic):
    for _c, name, path in iconic[:5]:
        tiny_catalog.add(path, sku=name)
    tiny_catalog.rebuild()
    return tiny_catalog


def _kinds(report):
    return {f.kind: f for f in report.findings}


def _recognises_all(cat, iconic, n=5):
    rec = Recognizer(Catalog.open(cat.root), threshold=2.0)
    for _c, name, path in iconic[:n]:
        r = rec.recognize(path)[0]
        assert r.sku == name and r.distance < 1e-4, (name, r)


def test_clean_catalog_is_ok(filled):
    rep = check(filled)
    assert rep.ok and rep.findings == [] and rep.references == 5 and rep.vectors == 10
    assert main(["--catalog", str(filled.root), "check"]) == 0


def test_vectors_without_rows_and_rows_without_vectors(filled, iconic):
    cat = filled
    with cat.sessions.begin() as s:
        # rows without vectors: drop both views of one reference
        rid = s.scalar(select(ReferenceImage.id).where(ReferenceImage.sku_id == iconic[1][1]))
        s.execute(delete(Embedding).where(Embedding.reference_id == rid))
        # a corrupt vector: wrong length
        eid = s.scalar(select(Embedding.id).order_by(Embedding.id.desc()).limit(1))
        s.execute(update(Embedding).where(Embedding.id == eid).values(vector=b"\x00" * 12))
    # vectors without rows: foreign keys off, as a crashed tool or a hand edit might do
    raw = cat.engine.raw_connection()
    try:
        raw.execute("PRAGMA foreign_keys=OFF")
        enc = raw.execute("SELECT encoder_id FROM catalog_state").fetchone()[0]
        raw.execute("INSERT INTO embeddings (reference_id, encoder_id, view, vector) VALUES (9999, ?, 0, ?)",
                    (enc, np.ones(32, np.float32).tobytes()))
        raw.commit()
    finally:
        raw.close()
    cat = Catalog.open(cat.root)
    found = _kinds(check(cat))
    assert found["orphan_vectors"].count == 1
    assert found["bad_vectors"].count == 1
    assert found["missing_vectors"].count == 1  # the corrupt vector's reference counts after repair only
    assert main(["--catalog", str(cat.root), "check"]) == 1
    rep = check(cat, repair=True)
    assert rep.ok, rep.to_dict()
    assert _kinds(rep)["missing_vectors"].repaired == 2  # the dropped one + the one with the bad vector
    assert check(cat).findings == []
    _recognises_all(cat, iconic)


def test_missing_and_corrupt_images_restored_from_a_folder(filled, iconic, tmp_path):
    cat = filled
    paths = [p for s in cat.list_skus() for p in cat.reference_path(s.sku)]
    paths[0].unlink()
    paths[1].write_bytes(b"not the image")
    found = _kinds(check(cat))
    assert found["missing_images"].count == 1 and found["corrupt_images"].count == 1
    rep = check(cat, repair=True)  # nowhere to restore from: reported, not "fixed"
    assert not rep.ok and not _kinds(rep)["missing_images"].repairable
    backup = tmp_path / "packshots"
    backup.mkdir()
    for _c, _n, p in iconic[:5]:
        shutil.copy(p, backup / p.name)
    assert main(["--catalog", str(cat.root), "check", "--repair", "--images-from", str(backup)]) == 0
    assert check(cat).findings == []


def test_orphan_files_respect_the_grace_period(filled):
    cat = filled
    orphan = cat.root / "images" / "ff" / ("f" * 64 + ".jpg")
    orphan.parent.mkdir(exist_ok=True)
    orphan.write_bytes(b"left by an add killed before its commit")
    assert "orphan_files" not in _kinds(check(cat))  # young: might be an add in progress
    old = time.time() - 3600
    os.utime(orphan, (old, old))
    assert _kinds(check(cat))["orphan_files"].count == 1
    assert check(cat, repair=True).ok and not orphan.exists()


def test_broken_active_index_is_rebuilt_from_the_database(filled, iconic):
    cat = filled
    active = next(v for v in cat.versions() if v.active)
    (cat.root / active.path / INDEX_FILE).write_bytes(b"\x00" * 100)
    found = _kinds(check(cat))
    assert found["active_index"].count == 1
    rep = check(cat, repair=True)
    assert rep.ok
    new = next(v for v in cat.versions() if v.active)
    assert new.id > active.id and "embedded 0" in new.note  # nothing re-embedded
    _recognises_all(cat, iconic)


def test_stale_versions_and_temp_dirs(filled):
    cat = filled
    (cat.root / "indexes" / ".v000099.tmp-123").mkdir()
    (cat.root / "indexes" / "v000042").mkdir()
    found = _kinds(check(cat))
    assert found["stale_versions"].count == 2
    assert check(cat, repair=True).ok
    assert not (cat.root / "indexes" / "v000042").exists()
    assert check(cat).findings == []
