"""Outlier references (catalog/outliers.py) and the outlier-ratio open-set score end to end, on
real GroceryStore packshots and photos: add / import / list / remove on SQLite and PostgreSQL,
all-or-nothing writes, never a match, the recognizer's outlier distance and its rejection,
``catalog calibrate`` on outlier-ratio (and its default), ``catalog rebuild`` re-embedding them,
``catalog check``, read-only catalogs and the migration from a 0003 catalog."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from alembic import command
from conftest import MOBILENET_OPTIONS, MOBILENET_SPEC, write_snapshot
from imagekinds import write_bad_files
from isolated import run_isolated
from privileges import no_override
from raycases import rebuild_on_ray
from sqlalchemy import func, select

from catalog import Catalog, schema
from catalog.check import check
from catalog.cli import main
from catalog.errors import CatalogError, DuplicateSKUError, ReadOnlyCatalogError
from catalog.models import OutlierEmbedding, OutlierReference
from catalog.outliers import UnknownOutlierError
from retailklip import Recognizer
from retailklip.errors import InvalidImageError, RetailKlipError
from retailklip.open_set import OPEN_SET_SCORES, outlier_ratio

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(TESTS), os.environ.get("PYTHONPATH", "")]))


def cli(*argv, prefix=()) -> subprocess.CompletedProcess:
    """The real ``catalog`` command of this checkout in its own process."""
    return subprocess.run([*prefix, sys.executable, "-m", "catalog", *map(str, argv)], capture_output=True, text=True,
                          env=ENV, cwd=REPO, timeout=600, check=False)


def one_line_error(r: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 1, (r.returncode, r.stdout[-1000:], r.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith("catalog: error: "), r.stderr[-2000:]
    return lines[0]


def snapshot(cat) -> tuple:
    """What a refused write must leave unchanged: rows of SKUs, references, vectors and outliers,
    stored files and the generation (SQLite or PostgreSQL)."""
    with cat.sessions() as s:
        outliers = tuple(s.scalar(select(func.count()).select_from(t)) for t in (OutlierReference, OutlierEmbedding))
    return write_snapshot(cat), outliers


@pytest.fixture(scope="module")
def packshots(iconic) -> dict[str, Path]:
    """Class name -> real GroceryStore packshot."""
    return {name: path for _c, name, path in iconic}


# ---------------------------------------------------------------------------- store (both backends)
def test_add_list_remove_outliers(store_catalog, iconic, tmp_path):
    cat = store_catalog
    skus = [cat.add(p, sku=n).sku for _c, n, p in iconic[:3]]
    gen = cat.generation
    added = cat.add_outliers([iconic[40][2], iconic[41][2]])
    assert [o.label for o in added] == [iconic[40][2].stem, iconic[41][2].stem]  # default label: the file name
    assert [o.vectors for o in added] == [2, 2] and cat.generation == gen + 1
    assert [o.id for o in cat.list_outliers()] == [o.id for o in added]
    stored = cat.root / added[0].filename
    assert stored.read_bytes() == iconic[40][2].read_bytes()
    # outliers are no SKUs: not listed, not counted, not in the table the index is built from
    assert [s.sku for s in cat.list_skus()] == sorted(skus) and len(cat) == 3
    assert set(cat.embedding_table()[1]) == set(skus)
    assert len(cat.outlier_table()) == 4 and cat.existing_outlier_vectors(cat.outlier_table(), 32)[1].shape == (4, 32)

    # refused writes change nothing: an image twice, already an outlier, an SKU's image, a bad image
    before = snapshot(cat)
    for images, match in (([iconic[42][2], iconic[42][2]], "same image"),
                          ([iconic[42][2], iconic[40][2]], "already outlier reference"),
                          ([iconic[0][2]], "reference image of SKU")):
        with pytest.raises(DuplicateSKUError, match=match):
            cat.add_outliers(images)
        assert snapshot(cat) == before
    with pytest.raises(DuplicateSKUError, match=rf"outlier reference {added[0].id}.*catalog outliers remove"):
        cat.add(iconic[40][2], sku="was-an-outlier")  # and an outlier is no SKU either
    bad = write_bad_files(iconic[0][2], tmp_path / "bad")
    for path in (bad["truncated_jpeg"], bad["text_as_jpg"], tmp_path / "missing.jpg"):
        with pytest.raises(InvalidImageError):
            cat.add_outliers([iconic[43][2], path])  # the good first image is not written either
        assert snapshot(cat) == before

    # import: image[,label], all or nothing, paths relative to the CSV
    rows = [(os.path.relpath(iconic[44][2], tmp_path), "oat milk"), (os.path.relpath(iconic[45][2], tmp_path), "")]
    with open(tmp_path / "out.csv", "w", newline="") as f:
        csv.writer(f).writerows([("image", "label"), *rows])
    imported = cat.import_outliers(tmp_path / "out.csv")
    assert [o.label for o in imported] == ["oat milk", iconic[45][2].stem]
    with open(tmp_path / "bad.csv", "w", newline="") as f:
        csv.writer(f).writerows([("image", "label"), (str(iconic[46][2]), "x"), ("nope.jpg", "y")])
    before = snapshot(cat)
    with pytest.raises(CatalogError, match=r"bad.csv:3: .*nope.jpg"):
        cat.import_outliers(tmp_path / "bad.csv")
    assert snapshot(cat) == before

    # remove: all or nothing; the file goes once no row names it
    with pytest.raises(UnknownOutlierError, match="unknown outlier reference 999"):
        cat.remove_outliers([added[0].id, 999])
    assert snapshot(cat) == before
    gen = cat.generation
    assert cat.remove_outliers([added[0].id]) == 1
    assert cat.generation == gen + 1 and not stored.exists()
    assert [o.id for o in cat.list_outliers()] == [added[1].id] + [o.id for o in imported]
    assert len(cat.outlier_table()) == 6
    cat.add(iconic[40][2], sku="now-an-sku")  # its image is free again


def test_catalog_from_0003_is_upgraded_and_keeps_working(store_catalog, iconic):
    cat = store_catalog
    cat.add(iconic[0][2], sku="a")
    cat.add(iconic[1][2], sku="b")
    root, url = cat.root, cat.engine.url.render_as_string(hide_password=False)
    db_url = None if cat.engine.dialect.name == "sqlite" else url
    with cat.engine.begin() as conn:  # the catalog as retailklip before outlier references wrote it
        command.downgrade(schema.alembic_config(conn), "0003")
    cat.close()
    with pytest.raises(CatalogError, match=r"schema is at 0003, this retailklip needs 0005; run `catalog upgrade`"):
        Catalog.open(root, db_url=db_url)
    assert Catalog.upgrade(root, db_url=db_url) == ("0003", "0005")
    cat = Catalog.open(root, db_url=db_url)
    try:
        assert [s.sku for s in cat.list_skus()] == ["a", "b"] and cat.list_outliers() == []
        # no outliers: the score is unavailable, and says so in one line; nothing changes
        before = snapshot(cat)
        with pytest.raises(RetailKlipError, match="needs outlier references.*catalog outliers add"):
            cat.set_threshold(1.0, "outlier-ratio")
        with pytest.raises(RetailKlipError, match="needs outlier references"):
            Recognizer(cat, threshold=1.0, open_set_score="outlier-ratio").recognize(iconic[0][2])
        assert snapshot(cat) == before
        r = Recognizer(cat).recognize(iconic[0][2])[0]  # the other scores work as before
        assert r.sku == "a" and r.outlier_distance is None and "outlier_ratio" not in r.to_dict()
        cat.add_outliers([iconic[50][2]])
        assert Recognizer(cat).recognize(iconic[0][2])[0].outlier_distance is not None
    finally:
        cat.close()


def test_read_only_catalog_refuses_outlier_writes(store_catalog, iconic):
    cat = store_catalog
    cat.add(iconic[0][2], sku="a")
    (o,) = cat.add_outliers([iconic[50][2]])
    cat.read_only = True  # what Catalog.open sets for a catalog it cannot write
    before = snapshot(cat)
    for call in (lambda: cat.add_outliers([iconic[51][2]]), lambda: cat.remove_outliers([o.id])):
        with pytest.raises(ReadOnlyCatalogError, match="is read-only"):
            call()
    assert snapshot(cat) == before and [x.id for x in cat.list_outliers()] == [o.id]


# ---------------------------------------------------------------------------- recognition (real MobileNetV2)
def test_outliers_are_never_matched_and_reject_through_outlier_ratio(mobilenet_catalog, iconic):
    cat = mobilenet_catalog
    known = [cat.add(p, sku=n).sku for _c, n, p in iconic[:6]]
    rec = Recognizer(cat, threshold=1.0, open_set_score="outlier-ratio")
    with pytest.raises(RetailKlipError, match="needs outlier references"):  # none yet: one line, nothing recognised
        rec.recognize(iconic[0][2])
    outliers = cat.add_outliers([p for _c, _n, p in iconic[40:52]])
    assert all(o.vectors == 4 for o in outliers)
    # the recognizer picks the new outlier vectors up from the database (generation bump)
    own = rec.recognize(iconic[0][2])[0]
    assert own.sku == known[0] and own.distance < 1e-4 and own.outlier_ratio < 1e-3
    assert 0.0 < own.outlier_distance <= 2.0
    d = own.to_dict()
    assert d["open_set_score"] == "outlier-ratio" and d["outlier_distance"] == pytest.approx(own.outlier_distance, abs=1e-6)
    assert d["runner_up"] is not None and d["distance"] == pytest.approx(own.distance, abs=1e-6)
    # an outlier's own packshot: its nearest SKU is an SKU (never the outlier), and the outlier is
    # nearer than any SKU, so the outlier-ratio rejects it while the distance alone would not
    for _c, _n, p in iconic[40:52]:
        r = rec.recognize(p)[0]
        assert r.nearest_sku in known and r.outlier_distance < 1e-4
        assert r.sku is None and r.outlier_ratio > 1.0
        assert r.to_dict()["outlier_ratio"] == "inf" or r.to_dict()["outlier_ratio"] > 1.0
        assert Recognizer(cat, threshold=r.distance + 1e-3).recognize(p)[0].sku == r.nearest_sku
    # the score matches the library function on the same numbers
    assert own.outlier_ratio == pytest.approx(float(outlier_ratio(own.distance, own.outlier_distance)))
    # removed outliers leave the recognizer's outlier index on its next call
    cat.remove_outliers([o.id for o in outliers[1:]])
    assert rec.matcher.outliers.ntotal == 4
    r = rec.recognize(iconic[41][2])[0]
    assert r.outlier_distance > 1e-3  # its own outlier is gone
    # the catalog's threshold on outlier-ratio cannot lose its last outlier
    cat.set_threshold(1.0, "outlier-ratio")
    with pytest.raises(CatalogError, match="calibrate on another score first"):
        cat.remove_outliers([outliers[0].id])
    assert len(cat.list_outliers()) == 1


def test_rebuild_reembeds_outliers_with_the_new_encoder(tmp_path, iconic, mobilenet_weights):
    cat = Catalog.init(tmp_path / "c", encoder=MOBILENET_SPEC, random_init=True, encoder_options=MOBILENET_OPTIONS,
                       augmentations=2)
    for _c, n, p in iconic[:4]:
        cat.add(p, sku=n)
    cat.add_outliers([p for _c, _n, p in iconic[40:43]])
    rec = Recognizer(cat)
    before = rec.recognize(iconic[40][2])[0]
    old_enc = cat.snapshot().encoder_id
    info = cat.rebuild(encoder=MOBILENET_SPEC, weights=mobilenet_weights, encoder_options=MOBILENET_OPTIONS, keep=1)
    new_enc = cat.snapshot().encoder_id
    assert new_enc != old_enc and "embedded 4 + 3 outlier(s)" in info.note
    assert len(cat.outlier_table(new_enc)) == 6 and [o.vectors for o in cat.list_outliers()] == [2, 2, 2]
    assert len(cat.outlier_table(old_enc)) == 0  # dropped with the retired version's vectors
    # the new vectors are the new encoder's embedding of the stored images (what `add` would make now)
    from retailklip.references import embed_reference

    ids = cat.outlier_table(new_enc)
    got = cat.existing_outlier_vectors(ids, 1280)[1]
    want = np.concatenate([embed_reference(cat.encoder(), p, 2, 0) for _c, _n, p in iconic[40:43]])
    np.testing.assert_allclose(got, want, atol=1e-5)
    after = rec.recognize(iconic[40][2])[0]  # the recognizer swapped encoder and outlier index together
    assert after.outlier_distance < 1e-4 and rec.matcher.outliers.ntotal == 6
    assert before.to_dict() != after.to_dict()
    assert check(cat).ok


def test_rollback_embeds_outliers_added_since_with_the_old_encoder(tmp_path, iconic, mobilenet_weights):
    cat = Catalog.init(tmp_path / "c", encoder=MOBILENET_SPEC, random_init=True, encoder_options=MOBILENET_OPTIONS)
    for _c, n, p in iconic[:3]:
        cat.add(p, sku=n)
    cat.add_outliers([iconic[40][2]])
    v1_enc = cat.snapshot().encoder_id
    cat.rebuild(encoder=MOBILENET_SPEC, weights=mobilenet_weights, encoder_options=MOBILENET_OPTIONS)
    cat.add_outliers([iconic[41][2]])  # embedded with the new encoder only
    assert len(cat.outlier_table(v1_enc)) == 1
    cat.rollback()
    assert cat.snapshot().encoder_id == v1_enc and len(cat.outlier_table(v1_enc)) == 2
    r = Recognizer(cat).recognize(iconic[41][2])[0]
    assert r.outlier_distance < 1e-4 and r.nearest_sku in {n for _c, n, _p in iconic[:3]}


def test_versions_count_each_versions_outliers(tmp_path, iconic, mobilenet_weights, capsys):
    """`catalog versions` (text and --json) and Catalog.versions(): the outlier references and
    vectors of each version's encoder; 0 on a catalog without outliers."""
    root = tmp_path / "c"
    cat = Catalog.init(root, encoder=MOBILENET_SPEC, random_init=True, encoder_options=MOBILENET_OPTIONS,
                       augmentations=2)
    cat.add(iconic[0][2], sku="a")

    def versions() -> tuple[list[dict], list[list[str]]]:
        assert main(["--catalog", str(root), "versions", "--json"]) == 0
        js = json.loads(capsys.readouterr().out)
        assert main(["--catalog", str(root), "versions"]) == 0
        head, *rows = capsys.readouterr().out.splitlines()
        assert head.split()[-3:] == ["outlier", "vectors", "encoder"] and "outliers" in head.split()
        # columns: [*] id date time status index vectors recall@1 outliers outlier-vectors encoder
        return js, [r.lstrip("* ").split()[-3:-1] for r in rows]

    js, text = versions()
    assert [(v["outlier_references"], v["outlier_vectors"]) for v in js] == [(0, 0)] and text == [["0", "0"]]
    assert [(v.outlier_references, v.outlier_vectors) for v in cat.versions()] == [(0, 0)]

    cat.add_outliers([iconic[40][2], iconic[41][2]])
    cat.rebuild(encoder=MOBILENET_SPEC, weights=mobilenet_weights, encoder_options=MOBILENET_OPTIONS)
    cat.add_outliers([iconic[42][2]])  # embedded with version 2's encoder only
    js, text = versions()
    assert [v["id"] for v in js] == [2, 1] and js[0]["active"]
    assert [(v["outlier_references"], v["outlier_vectors"]) for v in js] == [(3, 6), (2, 4)]
    assert text == [["3", "6"], ["2", "4"]]
    assert [(v.outlier_references, v.outlier_vectors) for v in cat.versions()] == [(3, 6), (2, 4)]
    cat.remove_outliers([cat.list_outliers()[0].id])
    assert [(v.outlier_references, v.outlier_vectors) for v in cat.versions()] == [(2, 4), (1, 2)]


def test_outliers_added_during_a_rebuild_are_logged_as_outliers(tmp_path, iconic, mobilenet_weights, caplog,
                                                                monkeypatch):
    """An outlier added while a rebuild embeds is caught up before the swap, and the log calls it
    an outlier reference (it called it a reference image)."""
    import threading
    import time

    cat = Catalog.init(tmp_path / "c", encoder=MOBILENET_SPEC, random_init=True, encoder_options=MOBILENET_OPTIONS)
    cat.add(iconic[0][2], sku="a")
    go = tmp_path / "go"
    monkeypatch.setenv("RETAILKLIP_PAUSE_AT", "rebuild.before_swap")
    monkeypatch.setenv("RETAILKLIP_PAUSE_FILE", str(go))
    monkeypatch.setenv("RETAILKLIP_PAUSE_LIMIT", "60")
    done: list = []

    def rebuild():
        try:
            done.append(cat.rebuild(encoder=MOBILENET_SPEC, weights=mobilenet_weights,
                                    encoder_options=MOBILENET_OPTIONS))
        except BaseException as e:  # noqa: BLE001 -- re-raised below
            done.append(e)

    caplog.set_level("INFO", logger="catalog.rebuild")
    t = threading.Thread(target=rebuild)
    t.start()
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "go.reached").exists() and t.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert (tmp_path / "go.reached").exists()
        other = Catalog.open(cat.root)
        other.add_outliers([iconic[40][2]])  # with the old (active) encoder only
        other.close()
    finally:
        go.touch()
        t.join(120)
    (info,) = done
    assert not isinstance(info, BaseException), info
    assert "1 outlier reference(s) added meanwhile" in caplog.text
    assert "reference image(s) added meanwhile" not in caplog.text
    assert [o.vectors for o in cat.list_outliers()] == [1] and len(cat.outlier_table(cat.snapshot().encoder_id)) == 1


def test_ray_rebuild_names_an_unreadable_outlier_an_outlier_reference(tmp_path, iconic, mobilenet_weights):
    """`catalog rebuild --ray`: an outlier whose stored image cannot be read fails the rebuild
    with an error naming the outlier reference (not a reference image) and the Ray node.  The
    cluster runs in a spawned process (tests/isolated.py says why)."""
    cat = Catalog.init(tmp_path / "c", encoder=MOBILENET_SPEC, random_init=True, encoder_options=MOBILENET_OPTIONS)
    cat.add(iconic[0][2], sku="a")
    (o,) = cat.add_outliers([iconic[40][2]])
    stored = cat.root / o.filename
    stored.chmod(0o644)
    stored.write_bytes(b"not an image")
    cat.close()
    res = run_isolated(rebuild_on_ray, cat.root,
                       {"encoder": MOBILENET_SPEC, "weights": mobilenet_weights,
                        "encoder_options": MOBILENET_OPTIONS, "ray_workers": 1})
    assert "error" in res, res
    assert res["ray_inits"] == 1 and not res["connected_after"], res  # one cluster for both, stopped
    err = res["error"]
    assert "InvalidImageError" in err["types"], err
    msg = err["message"]
    assert msg.startswith(f"outlier reference {o.id}: ") and "Ray node" in msg and "\n" not in msg, msg
    assert "reference image" not in msg
    cat = Catalog.open(cat.root)
    assert cat.versions()[0].status == "failed" and cat.versions()[1].active


def test_check_verifies_outlier_files_and_vectors(tmp_path, iconic, mobilenet_weights):
    cat = Catalog.init(tmp_path / "c", encoder=MOBILENET_SPEC, weights=mobilenet_weights,
                       encoder_options=MOBILENET_OPTIONS, augmentations=1)
    cat.add(iconic[0][2], sku="a")
    (o1, o2) = cat.add_outliers([iconic[40][2], iconic[41][2]])
    report = check(cat, grace_s=0)
    assert report.ok and not report.findings  # outlier images are no orphan files
    (cat.root / o1.filename).unlink()
    with cat.sessions.begin() as s:
        s.execute(OutlierEmbedding.__table__.delete().where(OutlierEmbedding.reference_id == o2.id))
    report = check(cat, grace_s=0)
    kinds = {f.kind: f for f in report.findings}
    assert not report.ok and set(kinds) == {"missing_images", "missing_vectors"}
    assert kinds["missing_images"].examples == [f"outlier reference {o1.id}: {o1.filename}"]
    assert kinds["missing_vectors"].examples == [f"outlier reference {o2.id}"]
    report = check(cat, repair=True, images_from=[iconic[40][2].parent], grace_s=0)
    assert report.ok and [o.vectors for o in cat.list_outliers()] == [1, 1]
    assert (cat.root / o1.filename).read_bytes() == iconic[40][2].read_bytes()


# ---------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def cli_catalog(tmp_path_factory, mobilenet_weights, grocery_store):
    """A MobileNetV2 catalog (K = 2) of 6 packshots, a CSV of labelled train photos (3 per known
    class, 3 per each of 4 unknown classes) and 10 packshots of other classes for outliers."""
    root = tmp_path_factory.mktemp("cli")
    classes = grocery_store.classes
    known, unknown, outliers = classes[:6], classes[20:24], classes[40:50]
    cat = Catalog.init(root / "cat", encoder=MOBILENET_SPEC, weights=mobilenet_weights,
                       encoder_options=MOBILENET_OPTIONS, augmentations=2)
    for c in known:
        cat.add(c.iconic, sku=c.name)
    cat.close()
    per: dict[str, list[Path]] = {}
    for p in grocery_store.photos("train"):
        per.setdefault(p.label, []).append(p.path)
    with open(root / "photos.csv", "w", newline="") as f:
        csv.writer(f).writerows([("image", "sku")] + [(str(p), c.name) for c in known + unknown for p in per[c.name][:3]])
    (root / "outliers").mkdir()
    for c in outliers:
        shutil.copy(c.iconic, root / "outliers" / c.iconic.name)
    return root, [c.name for c in known]


def test_cli_outliers_calibrate_and_recognize(cli_catalog, tmp_path, capsys):
    src, known = cli_catalog
    root = shutil.copytree(src / "cat", tmp_path / "cat")
    photos = src / "photos.csv"

    def run(*argv) -> tuple[int, str, str]:
        code = main(["--catalog", str(root), *map(str, argv)])
        out = capsys.readouterr()
        return code, out.out, out.err

    # without outliers: calibrate defaults to ratio, and outlier-ratio is refused in one line
    code, out, _ = run("calibrate", photos, "--match-softmax-cutoff", "0.78", "--json", "--dry-run")
    assert code == 0 and json.loads(out)["open_set_score"] == "ratio" and json.loads(out)["outlier_vectors"] == 0
    code, _, err = run("calibrate", photos, "--match-softmax-cutoff", "0.78", "--score", "outlier-ratio")
    assert code == 1 and err.count("\n") == 1 and "needs outlier references" in err
    code, _, err = run("recognize", src / "outliers" / sorted(os.listdir(src / "outliers"))[0], "--score", "outlier-ratio",
                       "--threshold", "1")
    assert code == 1 and "needs outlier references" in err

    code, out, _ = run("outliers", "add", src / "outliers", "--json")  # a directory: every image in it
    added = json.loads(out)
    assert code == 0 and len(added) == 10 and all(o["vectors"] == 2 for o in added)
    code, out, err = run("outliers", "list")
    assert code == 0 and out.count("\n") == 10 and "10 outlier reference(s)" in err
    code, out, _ = run("outliers", "list", "--json")
    assert [o["id"] for o in json.loads(out)] == [o["id"] for o in added]
    code, _, err = run("outliers", "remove", "12345")
    assert code == 1 and err.startswith("catalog: error: unknown outlier reference 12345")
    code, _, err = run("outliers", "add", src / "outliers" / os.listdir(src / "outliers")[0])
    assert code == 1 and "already outlier reference" in err
    code, out, _ = run("info", "--json")
    assert json.loads(out)["outlier_references"] == 10 and json.loads(out)["open_set_score"] == "distance"

    # with outliers: calibrate's default score is outlier-ratio; its threshold is stored with it
    code, out, _ = run("calibrate", photos, "--match-softmax-cutoff", "0.78", "--json")
    cal = json.loads(out)
    assert code == 0 and cal["open_set_score"] == "outlier-ratio" and cal["stored"] and cal["outlier_vectors"] == 20
    nn = cal["nearest_neighbour"]
    assert nn["unknown_rejection"] >= cal["softmax"]["unknown_rejection"] - 1e-9 and 0.0 <= nn["auroc"] <= 1.0
    cat = Catalog.open(root)
    assert (cat.open_set_score, cat.threshold) == ("outlier-ratio", pytest.approx(cal["threshold"], abs=1e-6))
    # every score can still be chosen explicitly
    for score in OPEN_SET_SCORES:
        code, out, _ = run("calibrate", photos, "--match-softmax-cutoff", "0.78", "--score", score, "--json", "--dry-run")
        assert code == 0 and json.loads(out)["open_set_score"] == score

    # recognize on the catalog's outlier-ratio threshold: distance and runner-up kept, outlier fields added
    rows = list(csv.DictReader(open(photos)))
    some = [Path(r["image"]) for r in rows[::5]]
    code, out, _ = run("recognize", *some, "--json")
    assert code == 0
    for item, path in zip(json.loads(out), some):
        (r,) = item["recognitions"]
        assert {"distance", "runner_up", "outlier_distance", "outlier_ratio", "ratio"} <= set(r)
        assert r["open_set_score"] == "outlier-ratio" and r["threshold"] == pytest.approx(cal["threshold"], abs=1e-6)
        assert r["outlier_ratio"] == pytest.approx(r["distance"] / r["outlier_distance"], rel=1e-4)
        assert (r["sku"] is not None) == (r["outlier_ratio"] <= cal["threshold"])
        assert r["nearest_sku"] in known
    code, out, _ = run("recognize", some[0])
    assert code == 0 and "outlier-ratio" in out and "runner-up" in out
    code, _, err = run("recognize", some[0], "--score", "ratio", "--threshold", "1.5")
    assert code == 1 and "a threshold on ratio is a distance ratio in [0, 1]" in err

    # the last outliers cannot go while the threshold is on outlier-ratio
    code, _, err = run("outliers", "remove", *[o["id"] for o in added])
    assert code == 1 and "calibrate on another score first" in err
    code, out, _ = run("outliers", "remove", added[0]["id"], added[1]["id"])
    assert code == 0 and "removed 2 outlier reference(s); 8 left" in out


def test_read_only_catalog_lists_outliers_and_recognizes_with_them(cli_catalog, tmp_path):
    prefix = no_override()
    if prefix is None:
        pytest.skip("root without setpriv(1): cannot drop the permission overrides")
    src, _known = cli_catalog
    root = shutil.copytree(src / "cat", tmp_path / "ro")
    cat = Catalog.open(root)
    added = cat.add_outliers(sorted((src / "outliers").iterdir())[:4])
    cat.set_threshold(1.0, "outlier-ratio")
    cat.close()
    photo = sorted((src / "outliers").iterdir())[5]
    for p in [root, *root.rglob("*")]:
        p.chmod(p.stat().st_mode & ~0o222)
    try:
        r = cli("--catalog", root, "outliers", "list", "--json", prefix=prefix)
        assert r.returncode == 0 and [o["id"] for o in json.loads(r.stdout)] == [o.id for o in added], r.stderr
        r = cli("--catalog", root, "recognize", "--json", photo, prefix=prefix)
        assert r.returncode == 0, r.stderr
        (rec,) = json.loads(r.stdout)[0]["recognitions"]
        assert rec["open_set_score"] == "outlier-ratio" and "outlier_ratio" in rec
        for argv in (["outliers", "add", photo], ["outliers", "remove", added[0].id]):
            assert "is read-only" in one_line_error(cli("--catalog", root, *argv, prefix=prefix)), argv
    finally:
        for p in [root, *root.rglob("*")]:
            p.chmod(p.stat().st_mode | 0o200)
