"""catalog rebuild / versions / rollback: versioned indexes, validation, atomic swap, no lost
work, resumability (issue 5).  Real GroceryStore packshots; the MobileNetV2 weights for the
encoder-change cases, the tiny random open_clip model elsewhere (fast)."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
from conftest import MOBILENET_OPTIONS, MOBILENET_SPEC
from isolated import run_isolated
from raycases import rebuild_on_ray
from safetensors.torch import load_file, save_file

from catalog import Catalog
from catalog.errors import CatalogError, RebuildBusyError, ValidationError
from catalog.index_store import INDEX_FILE, MANIFEST_FILE
from catalog.vectors import VectorTable
from catalog.versions import RebuildLock
from retailklip import Recognizer
from retailklip.index import IndexTypeError


def _fill(cat: Catalog, iconic, n: int, start: int = 0) -> list[str]:
    skus = []
    for _cid, name, path in iconic[start : start + n]:
        cat.add(path, sku=name)
        skus.append(name)
    return skus


def test_init_creates_an_active_empty_version(tiny_catalog):
    (v,) = tiny_catalog.versions()
    assert v.active and v.status == "ready" and v.factory == "Flat" and v.vectors == 0
    files = tiny_catalog.root / v.path
    assert (files / INDEX_FILE).is_file()
    assert json.loads((files / MANIFEST_FILE).read_text())["version"] == v.id


def test_rebuild_makes_a_validated_version_and_recognition_uses_it(tiny_catalog, iconic):
    cat = tiny_catalog
    skus = _fill(cat, iconic, 6)
    rec = Recognizer(cat, threshold=2.0)
    before = [rec.recognize(p)[0].sku for _c, _n, p in iconic[:6]]
    assert before == skus  # served from version 1 + the SKUs added since (from the database)
    info = cat.rebuild()
    assert info.active and info.status == "ready" and info.id == 2
    assert info.vectors == 6 * 2 and info.dim == 32 and info.recall_at_1 == 1.0 and info.factory == "Flat"
    assert "embedded 0" in info.note  # same encoder: every vector came from the cache
    assert rec.version == 2
    assert [rec.recognize(p)[0].sku for _c, _n, p in iconic[:6]] == skus
    # the snapshot itself holds every vector: the recognizer applied no difference
    assert rec.matcher.index.ntotal == 12 and set(rec.matcher.sku_of.values()) == set(skus)


def test_rebuild_with_a_new_encoder_reembeds_and_swaps_encoder(tmp_path, iconic, mobilenet_weights):
    cat = Catalog.init(tmp_path / "c", encoder=MOBILENET_SPEC, random_init=True, encoder_options=MOBILENET_OPTIONS)
    skus = _fill(cat, iconic, 8)
    rec = Recognizer(cat, threshold=2.0)
    old_key = cat.encoder_identity().key
    rec.recognize(iconic[0][2])
    info = cat.rebuild(encoder=MOBILENET_SPEC, weights=mobilenet_weights, encoder_options=MOBILENET_OPTIONS)
    assert info.encoder_key != old_key and cat.encoder_identity().key == info.encoder_key
    assert "embedded 8" in info.note and info.vectors == 8
    # the recognizer follows the swap: encoder and index change together
    got = [rec.recognize(p)[0] for _c, _n, p in iconic[:8]]
    assert [r.sku for r in got] == skus and max(r.distance for r in got) < 1e-4
    # vectors of the new encoder are what `add` now makes
    cat.add(iconic[8][2], sku="late")
    assert rec.recognize(iconic[8][2])[0].sku == "late"


def test_rollback_restores_the_previous_encoder_and_keeps_adds(tmp_path, iconic, mobilenet_weights):
    cat = Catalog.init(tmp_path / "c", encoder=MOBILENET_SPEC, random_init=True, encoder_options=MOBILENET_OPTIONS)
    _fill(cat, iconic, 4)
    v2 = cat.rebuild()  # same (random) encoder
    v3 = cat.rebuild(encoder=MOBILENET_SPEC, weights=mobilenet_weights, encoder_options=MOBILENET_OPTIONS)
    cat.add(iconic[4][2], sku="added-on-v3")
    rec = Recognizer(cat, threshold=2.0)
    assert rec.version == v3.id
    back = cat.rollback()
    assert back.id == v2.id and back.active
    assert cat.encoder_identity().key == v2.encoder_key
    # the SKU added while v3 served was embedded with v2's encoder during the rollback
    r = rec.recognize(iconic[4][2])[0]
    assert rec.version == v2.id and r.sku == "added-on-v3" and r.distance < 1e-4
    with pytest.raises(CatalogError, match="already active"):
        cat.rollback(v2.id)
    with pytest.raises(CatalogError, match="no index version"):
        cat.rollback(99)


def test_keep_retires_old_versions_and_their_files(tiny_catalog, iconic):
    cat = tiny_catalog
    _fill(cat, iconic, 2)
    for _ in range(4):
        cat.rebuild(keep=2)
    vs = {v.id: v for v in cat.versions()}
    ready = [v for v in vs.values() if v.status == "ready"]
    assert len(ready) == 2 and vs[5].active
    for v in vs.values():
        assert (cat.root / v.path).exists() == (v.status == "ready"), v
    with pytest.raises(CatalogError, match="retired"):
        cat.rollback(1)


def test_remove_while_snapshot_holds_the_sku(tiny_catalog, iconic):
    cat = tiny_catalog
    skus = _fill(cat, iconic, 4)
    cat.rebuild()
    rec = Recognizer(cat, threshold=2.0)
    cat.remove(skus[0])
    r = rec.recognize(iconic[0][2])[0]
    assert r.sku != skus[0]  # the snapshot still holds its vectors; they are no longer mapped
    rec2 = Recognizer(cat, threshold=2.0)  # a fresh process loads the snapshot and subtracts
    assert rec2.recognize(iconic[0][2])[0].sku != skus[0]


def test_hnsw_snapshot_cannot_delete_but_removed_skus_never_match(tiny_catalog, iconic):
    cat = tiny_catalog
    skus = _fill(cat, iconic, 5)
    before = [v.id for v in cat.versions()]
    with pytest.raises(IndexTypeError, match="cannot search by inner product"):  # refused before any work
        cat.rebuild(index_type="HNSW32,PQ8")
    assert [v.id for v in cat.versions()] == before
    info = cat.rebuild(index_type="HNSW32")
    assert info.factory == "HNSW32" and info.recall_at_1 is not None and info.recall_at_1 >= 0.99
    rec = Recognizer(cat, threshold=2.0)
    cat.remove(skus[1])
    assert rec.matcher.index.ntotal == 10  # tombstoned, not deleted
    for _c, _n, p in iconic[:5]:
        assert rec.recognize(p)[0].sku != skus[1]


def test_validation_failure_keeps_the_old_version(tiny_catalog, iconic, monkeypatch):
    cat = tiny_catalog
    _fill(cat, iconic, 3)
    v2 = cat.rebuild()
    import catalog.rebuild as rb

    real = rb.vector_table

    def lose_one(c, enc_id, k):  # a bug that drops a vector must not go live
        t = real(c, enc_id, k)
        return VectorTable(t.ids[1:], t.references[1:], t.views[1:], t.n_references)

    monkeypatch.setattr(rb, "vector_table", lose_one)
    with pytest.raises(ValidationError, match="expected 3 references"):
        cat.rebuild()
    vs = {v.id: v for v in cat.versions()}
    assert vs[v2.id].active and vs[3].status == "failed" and "ValidationError" in vs[3].note
    assert ValidationError.exit_code == 4


def test_a_second_rebuild_is_refused_while_one_runs(tiny_catalog):
    with RebuildLock(tiny_catalog.root), pytest.raises(RebuildBusyError, match="another rebuild"):
        tiny_catalog.rebuild()
    tiny_catalog.rebuild()  # lock released


def test_add_during_rebuild_is_not_lost(tmp_path, iconic, mobilenet_weights, monkeypatch):
    """SKUs added between the embedding pass and the swap are embedded with the new encoder
    before the swap; an add whose vectors came from the old encoder re-embeds after it."""
    cat = Catalog.init(tmp_path / "c", encoder=MOBILENET_SPEC, random_init=True, encoder_options=MOBILENET_OPTIONS)
    _fill(cat, iconic, 4)
    other = Catalog.open(cat.root)  # another process's handle
    import catalog.rebuild as rb

    real_validate = rb.validate_index
    added = []

    def validate_then_add(*a, **kw):  # runs after the index was built, before the swap
        out = real_validate(*a, **kw)
        for _c, name, path in iconic[4:7]:
            other.add(path, sku=name)
            added.append(name)
        return out

    monkeypatch.setattr(rb, "validate_index", validate_then_add)
    info = cat.rebuild(encoder=MOBILENET_SPEC, weights=mobilenet_weights, encoder_options=MOBILENET_OPTIONS)
    assert info.vectors == 4  # the snapshot; the 3 later SKUs were caught up before the swap
    rec = Recognizer(Catalog.open(cat.root), threshold=2.0)
    for _c, name, path in iconic[:7]:
        r = rec.recognize(path)[0]
        assert r.sku == name and r.distance < 1e-4, (name, r)
    assert len(cat.list_skus()) == 7 and all(s.vectors == 1 for s in cat.list_skus())

    # An add that embedded with the old encoder and writes after a swap re-embeds.
    enc_before = other.snapshot().encoder_id
    other.encoder()  # cached: the handle now holds the active encoder
    state = {}
    import catalog.writes as writes

    real_prepare = writes.prepare_reference

    def prepare_then_swap(*a, **kw):
        p = real_prepare(*a, **kw)
        if not state:
            state["swapped"] = cat.rollback()  # back to the random encoder
        return p

    monkeypatch.setattr(writes, "prepare_reference", prepare_then_swap)
    other.add(iconic[7][2], sku="raced")
    assert other.snapshot().encoder_id != enc_before
    rec = Recognizer(Catalog.open(cat.root), threshold=2.0)
    r = rec.recognize(iconic[7][2])[0]
    assert r.sku == "raced" and r.distance < 1e-4


def test_rebuild_resumes_from_cached_vectors(tmp_path, iconic, mobilenet_weights, monkeypatch):
    cat = Catalog.init(tmp_path / "c", encoder=MOBILENET_SPEC, random_init=True, encoder_options=MOBILENET_OPTIONS)
    _fill(cat, iconic, 6)
    import catalog.rebuild as rb

    def boom(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(rb, "build_index", boom)
    with pytest.raises(KeyboardInterrupt):
        cat.rebuild(encoder=MOBILENET_SPEC, weights=mobilenet_weights, encoder_options=MOBILENET_OPTIONS, batch=2)
    assert [v.status for v in cat.versions()][0] == "failed"
    assert cat.versions()[1].active  # version 1 still serves
    monkeypatch.undo()
    info = cat.rebuild(encoder=MOBILENET_SPEC, weights=mobilenet_weights, encoder_options=MOBILENET_OPTIONS)
    assert "embedded 0" in info.note  # all 6 came from the interrupted run's committed batches


def test_recognition_never_mixes_versions_during_swaps(tiny_catalog, iconic):
    """Threads recognise while one thread adds and removes SKUs and another rebuilds and rolls
    back repeatedly (Flat and HNSW versions): no exception, every answer right, nothing lost."""
    cat = tiny_catalog
    _fill(cat, iconic, 6)
    cat.rebuild()
    rec = Recognizer(Catalog.open(cat.root), threshold=2.0)
    writer_cat = Catalog.open(cat.root)
    stop = threading.Event()
    errors: list[BaseException] = []
    answers: list[tuple[str, str | None]] = []

    def reader(n):
        try:
            while not stop.is_set():
                _c, name, path = iconic[n % 5]  # SKUs nobody removes
                answers.append((name, rec.recognize(path)[0].sku))
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    def writer():
        try:
            _c, toggled, path = iconic[5]
            for i, (_c2, name, p2) in enumerate(iconic[6:10]):
                writer_cat.remove(toggled)
                writer_cat.add(path, sku=toggled)
                writer_cat.add(p2, sku=name)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(3)] + [threading.Thread(target=writer)]
    for t in threads:
        t.start()
    try:
        for i in range(3):
            cat.rebuild(index_type="HNSW32" if i % 2 else "Flat")
            cat.rollback()
    finally:
        threads[-1].join()
        stop.set()
        for t in threads:
            t.join()
    assert not errors, errors
    assert answers and all(a == b for a, b in answers)
    # nothing lost: all 10 SKUs present, each complete, each recognised as itself
    assert [s.sku for s in cat.list_skus()] == sorted(n for _c, n, _p in iconic[:10])
    assert all(s.vectors == 2 for s in cat.list_skus())
    fresh = Recognizer(Catalog.open(cat.root), threshold=2.0)
    for _c, name, path in iconic[:10]:
        assert rec.recognize(path)[0].sku == name and fresh.recognize(path)[0].sku == name


def test_corrupt_active_index_file_falls_back_to_database(tiny_catalog, iconic, caplog):
    cat = tiny_catalog
    skus = _fill(cat, iconic, 3)
    info = cat.rebuild()
    (cat.root / info.path / INDEX_FILE).write_bytes(b"garbage")
    rec = Recognizer(Catalog.open(cat.root), threshold=2.0)
    assert rec.recognize(iconic[2][2])[0].sku == skus[2]
    assert "serving from the database" in caplog.text
    with pytest.raises(CatalogError):
        cat.load_index(info.id, verify=True)


def test_finetuned_weights_rebuild_from_the_cli(tmp_path, iconic, mobilenet_weights):
    """The nightly-job path: `catalog rebuild --encoder SPEC --weights FILE` via the CLI."""
    from catalog.cli import main

    root = tmp_path / "c"
    assert main(["--catalog", str(root), "init", "--encoder", MOBILENET_SPEC, "--random-init",
                 "--encoder-option", "interpolation=bilinear"]) == 0
    for _c, name, path in iconic[:3]:
        assert main(["--catalog", str(root), "add", str(path), "--sku", name]) == 0
    # "finetuned" weights: the real ImageNet weights, slightly changed, saved as safetensors
    sd = load_file(str(mobilenet_weights))
    key = next(k for k in sd if k.endswith("weight"))
    sd[key] = sd[key] * 1.01
    ft = tmp_path / "finetuned.safetensors"
    save_file(sd, str(ft))
    assert main(["--catalog", str(root), "rebuild", "--encoder", MOBILENET_SPEC, "--weights", str(ft),
                 "--encoder-option", "interpolation=bilinear", "--json"]) == 0
    assert main(["--catalog", str(root), "versions", "--json"]) == 0
    cat = Catalog.open(root)
    v = cat.versions()[0]
    assert v.active and v.vectors == 3 and cat.settings()["weights"] == str(ft.resolve())
    vecs = cat.vectors(*[cat.embedding_table()[0]], dim=v.dim)
    assert np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    assert main(["--catalog", str(root), "rollback", "7"]) == 1


def test_vector_ids_are_never_reused(tiny_catalog, iconic):
    """Embedding row ids are FAISS ids inside snapshots: a removed SKU's ids must never come back
    for a new SKU, or a fresh recognizer would serve the old vectors under the new SKU's name."""
    cat = tiny_catalog
    skus = _fill(cat, iconic, 3)
    cat.rebuild()
    before = int(cat.embedding_table()[0].max())
    cat.remove(skus[-1])
    cat.add(iconic[3][2], sku="newcomer")
    ids, owners = cat.embedding_table()
    assert min(i for i, o in zip(ids.tolist(), owners) if o == "newcomer") > before
    rec = Recognizer(Catalog.open(cat.root), threshold=2.0)
    r = rec.recognize(iconic[3][2])[0]
    assert r.sku == "newcomer" and r.distance < 1e-4
    assert rec.recognize(iconic[2][2])[0].sku != skus[-1]


def test_ray_rebuild_matches_the_single_process_rebuild(tmp_path, iconic, mobilenet_weights):
    """`catalog rebuild --ray local`: Ray Data embeds on a local cluster; the vectors, outlier
    references' included, equal the single-process rebuild's and every packshot finds itself.
    References and outliers are embedded on one cluster, started once and stopped at the end.
    The cluster runs in a spawned process (tests/isolated.py says why)."""
    import shutil

    a = Catalog.init(tmp_path / "a", encoder=MOBILENET_SPEC, random_init=True, encoder_options=MOBILENET_OPTIONS)
    skus = _fill(a, iconic, 6)
    a.add_outliers([iconic[40][2], iconic[41][2]])
    a.close()
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    a = Catalog.open(tmp_path / "a")
    kw = dict(encoder=MOBILENET_SPEC, weights=mobilenet_weights, encoder_options=MOBILENET_OPTIONS)
    va = a.rebuild(**kw)
    res = run_isolated(rebuild_on_ray, tmp_path / "b", dict(ray_workers=2, **kw))
    assert "version" in res, res
    assert res["ray_inits"] == 1 and not res["connected_after"], res
    vb = res["version"]
    b = Catalog.open(tmp_path / "b")
    assert vb["encoder_key"] == va.encoder_key and vb["vectors"] == va.vectors == 6
    assert "embedded 6 + 2 outlier(s)" in vb["note"] and vb["note"].split(";")[0] == va.note.split(";")[0]
    (oa, xoa), (ob, xob) = (c.existing_outlier_vectors(c.outlier_table(), va.dim) for c in (a, b))
    assert len(oa) == len(ob) == 2 * a.settings()["augmentations"] and np.abs(xoa - xob).max() <= 1e-6
    ia, sa = a.embedding_table()
    ib, sb = b.embedding_table()
    order_a, order_b = np.argsort(sa, kind="stable"), np.argsort(sb, kind="stable")
    assert [sa[i] for i in order_a] == [sb[i] for i in order_b]
    xa = a.vectors(ia[order_a], va.dim)
    xb = b.vectors(ib[order_b], vb["dim"])
    assert np.abs(xa - xb).max() <= 1e-6
    rec = Recognizer(b, threshold=2.0)
    assert [rec.recognize(p)[0].sku for _c, _n, p in iconic[:6]] == skus


def test_rebuild_connects_to_ray_only_when_it_has_something_to_embed(tmp_path, iconic, mobilenet_weights):
    """`--ray ADDRESS` connects on the first embedding that has work (catalog.embedding.RayConnection):
    a rebuild whose vectors all exist never touches the (here unreachable) cluster; one that must
    embed fails in one line naming the address, marks its version failed and keeps the old one
    serving, and leaves this process unconnected."""
    import ray

    cat = Catalog.init(tmp_path / "c", encoder=MOBILENET_SPEC, random_init=True, encoder_options=MOBILENET_OPTIONS)
    _fill(cat, iconic, 2)
    v = cat.rebuild(ray="127.0.0.1:1")  # the same encoder: nothing to embed, no connection
    assert v.active and v.vectors == 2 * cat.settings()["augmentations"] and not ray.is_initialized()
    with pytest.raises(CatalogError) as e:
        cat.rebuild(ray="127.0.0.1:1", encoder=MOBILENET_SPEC, weights=mobilenet_weights,
                    encoder_options=MOBILENET_OPTIONS)
    assert "127.0.0.1:1" in str(e.value) and "\n" not in str(e.value)
    assert not ray.is_initialized()
    newest, active = cat.versions()[0], next(x for x in cat.versions() if x.active)
    assert newest.status == "failed" and active.id == v.id
