"""Hubness reduction at the 1-NN (CSLS, retailklip/hubness.py): the hubness of a reference vector,
the matcher's exact CSLS ranking (nearest and runner-up SKU) against a brute-force ranking, and a
real catalog (MobileNetV2, GroceryStore photos) that stores its unlabeled photos, recognises by
CSLS, calibrates by the same ranking, and is switched off and on by rebuilds."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import MOBILENET_OPTIONS, MOBILENET_SPEC

from catalog import Catalog
from catalog.check import check
from catalog.errors import HubReferenceError
from catalog.skus import hub_limit
from catalog.cli import main
from retailklip import Recognizer
from retailklip.calibration import nearest_matches
from retailklip.errors import RetailKlipError
from retailklip.evaluation import score_zero_shot
from retailklip.hubness import DEFAULT_HUBNESS_K, HubnessReference, even_sample
from retailklip.index import VectorIndex
from retailklip import matching
from retailklip.matching import CSLS_FIRST_K, CSLS_LOW_SET, SKUMatcher, switched_to, switches_to


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def brute_force(queries, gallery, skus, offsets):
    """(nearest SKU, its plain distance, runner-up SKU, its plain distance, the two adjusted
    distances) per query, ranking every vector by cosine distance + offset (CSLS), each SKU by
    its best vector."""
    out = []
    for q in queries:
        d = 1.0 - gallery @ q
        a = d + offsets
        best: dict[str, int] = {}
        for n in np.argsort(a, kind="stable"):
            best.setdefault(skus[n], n)
        (s1, n1), (s2, n2) = list(best.items())[:2]
        out.append((s1, float(d[n1]), s2, float(d[n2]), float(a[n1]), float(a[n2])))
    return out


def test_hubness_is_the_mean_similarity_to_the_k_most_similar_photos():
    rng = np.random.default_rng(0)
    photos, vectors = unit(rng.normal(size=(40, 8))), unit(rng.normal(size=(7, 8)))
    hub = HubnessReference(photos, k=5)
    want = np.sort(vectors @ photos.T, axis=1)[:, -5:].mean(1)
    np.testing.assert_allclose(hub.hubness(vectors), want, atol=1e-6)
    np.testing.assert_allclose(hub.offsets(vectors), want / 2, atol=1e-6)
    # k beyond the photos: all of them
    np.testing.assert_allclose(HubnessReference(photos, k=100).hubness(vectors), (vectors @ photos.T).mean(1), atol=1e-6)
    for bad in (dict(photos=photos, k=0), dict(photos=photos[:0], k=5), dict(photos=photos[0], k=5),
                dict(photos=np.full((3, 8), np.nan), k=5), dict(photos=photos, k=2.5)):
        with pytest.raises(RetailKlipError):
            HubnessReference(**bad)
    with pytest.raises(RetailKlipError, match="dimension 8"):
        hub.hubness(vectors[:, :4])


def test_even_sample_is_all_items_or_an_evenly_spaced_subset():
    assert even_sample(5, 10).tolist() == [0, 1, 2, 3, 4]
    s = even_sample(10_000, 100)
    assert len(s) == 100 and s[0] == 0 and s[-1] == 9_999 and (np.diff(s) > 0).all()
    assert np.ptp(np.diff(s)) <= 1


class DeepestSearch:
    """A VectorIndex stand-in that records the deepest search the matcher made."""

    def __init__(self, index: VectorIndex) -> None:
        self.index, self.deepest = index, 0
        self.ntotal, self.check_vectors, self.reconstruct = index.ntotal, index.check_vectors, index.reconstruct
        self.stores_exact_vectors = index.stores_exact_vectors

    def search(self, queries, k):
        self.deepest = max(self.deepest, k)
        return self.index.search(queries, k)


@pytest.mark.parametrize("low_set", [0, CSLS_LOW_SET])
@pytest.mark.parametrize("spread", [0.4, 1.5])
def test_matcher_ranks_by_csls_exactly(spread, low_set):
    """The matcher finds the SKUs of smallest adjusted distance (widening the search until no
    unseen vector can beat them; with large offsets beyond the first depth unless the few low
    offsets are in the exhaustively searched low set) and reports plain distances; an SKU
    removed from the map (a tombstone) is never returned."""
    rng = np.random.default_rng(1)
    n_skus, views, dim = 150, 3, 16
    gallery = unit(rng.normal(size=(n_skus * views, dim)))
    skus = [f"s{i // views}" for i in range(len(gallery))]
    # a few references without offset among many with: the large spread makes far ones win
    offsets = (spread * (rng.random(len(gallery)) > 0.02)).astype(np.float32)
    queries = unit(gallery[rng.choice(len(gallery), 50)] + 0.8 * rng.normal(size=(50, dim)))
    index = VectorIndex(dim)
    ids = np.arange(len(gallery), dtype=np.int64)
    index.add(ids, gallery)
    gone = {i for i in ids.tolist() if skus[i] == "s3"}
    sku_of = {i: s for i, s in zip(ids.tolist(), skus) if i not in gone}
    probe = DeepestSearch(index)
    matcher = SKUMatcher(probe, sku_of, offsets=dict(zip(ids.tolist(), offsets.tolist())), low_set=low_set)
    live = np.array(sorted(sku_of))
    want = brute_force(queries, gallery[live], [skus[i] for i in live], offsets[live])
    got = matcher.match(queries, 2.0)
    assert [(m.nearest.sku, m.runner_up.sku) for m in got] == [(w[0], w[2]) for w in want]
    np.testing.assert_allclose([(m.nearest.distance, m.runner_up.distance) for m in got],
                               [(w[1], w[3]) for w in want], atol=1e-5)
    if spread > 1 and not low_set:
        assert probe.deepest > CSLS_FIRST_K  # the first depth could not be final: widened
    if low_set:  # the ~9 vectors without offset are in the low set: the rest bound the search
        assert probe.deepest == CSLS_FIRST_K
    plain = SKUMatcher(index, sku_of).match(queries, 2.0)
    assert sum(m.nearest.sku != p.nearest.sku for m, p in zip(got, plain)) > 0  # the offsets matter here
    # equal offsets rank as plain 1-NN
    same = SKUMatcher(index, sku_of, offsets=dict.fromkeys(ids.tolist(), 0.1)).match(queries, 2.0)
    key = lambda m: (m.nearest.sku, m.nearest.distance, m.runner_up.sku, m.runner_up.distance)  # noqa: E731
    assert [key(m) for m in same] == [key(p) for p in plain]
    assert [key(m) for m in matcher.match(queries, 2.0, plain=True)] == [key(p) for p in plain]  # offsets ignored


def test_one_reference_far_from_every_store_photo_does_not_deepen_every_search():
    """A vector with an unusually low offset is in the low set: searches stay at the first depth
    (without it they widen to the whole index), with the same answers; an index that cannot
    give its vectors back (IVF without a direct map) keeps the plain bound."""
    rng = np.random.default_rng(2)
    n, dim = 2000, 16
    gallery = unit(rng.normal(size=(n, dim)))
    offsets = np.full(n, 0.6, np.float32) + 0.01 * rng.random(n).astype(np.float32)
    offsets[7] = 0.0  # far from every store photo
    # queries a little way from it: it wins for some, beyond the first search depth
    queries = unit(np.concatenate([rng.normal(size=(20, dim)), gallery[7] + 1.0 * rng.normal(size=(20, dim))]))
    index = VectorIndex(dim)
    index.add(np.arange(n, dtype=np.int64), gallery)
    sku_of = {i: f"s{i // 2}" for i in range(n)}
    off = dict(enumerate(offsets.tolist()))
    want = brute_force(queries, gallery, [sku_of[i] for i in range(n)], offsets)
    plain_rank = index.search(queries, n)[1].tolist()
    beyond = [w[0] == "s3" and r.index(7) >= CSLS_FIRST_K for w, r in zip(want, plain_rank)]
    assert 0 < sum(beyond) < len(queries)
    depths = {}
    for low_set in (0, CSLS_LOW_SET):
        probe = DeepestSearch(index)
        got = SKUMatcher(probe, sku_of, offsets=off, low_set=low_set).match(queries, 2.0)
        assert [(m.nearest.sku, m.runner_up.sku) for m in got] == [(w[0], w[2]) for w in want]
        depths[low_set] = probe.deepest
    assert depths[CSLS_LOW_SET] == CSLS_FIRST_K < depths[0]
    ivf = VectorIndex(dim, "IVF4,Flat")
    ivf.train(gallery)
    ivf.add(np.arange(n, dtype=np.int64), gallery)
    ivf.set_search_params(nprobe=4)  # every list: exact
    got = SKUMatcher(ivf, sku_of, offsets=off).match(queries, 2.0)
    assert [(m.nearest.sku, m.runner_up.sku) for m in got] == [(w[0], w[2]) for w in want]


# ---------------------------------------------------------------------------- a real catalog
@pytest.fixture(scope="module")
def photos(grocery_store):
    train = [p for p in grocery_store.photos("train")]
    unlabeled = [p.path for p in train[::40]]  # 67 photos, used unlabeled
    queries = [p for i, p in enumerate(train) if i % 40 == 20][:40]
    return unlabeled, queries


@pytest.fixture(scope="module")
def hub_catalog(tmp_path_factory, photos, grocery_store, mobilenet_weights):
    unlabeled, queries = photos
    iconic = {c.name: c.iconic for c in grocery_store.classes}
    return packshot_catalog(tmp_path_factory.mktemp("hub") / "cat", mobilenet_weights, unlabeled,
                            {c: iconic[c] for c in sorted({p.label for p in queries})})


def test_catalog_keeps_its_unlabeled_photos_and_recognises_by_csls(hub_catalog, photos):
    unlabeled, queries = photos
    cat = hub_catalog
    st = cat.settings()
    assert st["hubness_k"] == DEFAULT_HUBNESS_K and st["unlabeled_photos"] == len(unlabeled)
    hub = Catalog.open(cat.root).hubness_reference()  # stored: another connection reads the same
    enc = cat.encoder()
    np.testing.assert_allclose(hub.photos, enc.embed(unlabeled), atol=1e-5)  # the centred encoder's embeddings
    ids, skus = cat.embedding_table()
    gallery = cat.vectors(ids, enc.dim)
    q = enc.embed([p.path for p in queries])
    want = brute_force(q, gallery, skus, hub.offsets(gallery))
    rec = Recognizer(cat)
    got = [rec.recognize(p.path)[0] for p in queries]
    assert [(r.nearest_sku, r.runner_up.sku) for r in got] == [(w[0], w[2]) for w in want]
    np.testing.assert_allclose([r.distance for r in got], [w[1] for w in want], atol=1e-4)
    plain = brute_force(q, gallery, skus, np.zeros(len(gallery), np.float32))
    changed = [w[0] != p[0] for w, p in zip(want, plain)]
    assert any(changed), "CSLS changed no 1-NN on these photos"
    # the ratio is on the adjusted distances that ranked the SKUs: below 1 also where CSLS
    # picked an SKU farther than the runner-up (a ratio of plain distances would be 1 there)
    np.testing.assert_allclose([r.ratio for r in got], [w[4] / w[5] for w in want], atol=1e-4)
    assert all(r.ratio < 1 for r, c in zip(got, changed) if c)
    assert all(r.to_dict()["adjusted_distance"] == pytest.approx(w[4], abs=1e-4) for r, w in zip(got, want))
    # plain ranking on request (catalog add's confusable check): the closest SKUs
    closest = rec.match_embeddings(q, enc.identity.key, 2.0, plain=True)
    assert [(m.nearest.sku, m.runner_up.sku) for m in closest] == [(w[0], w[2]) for w in plain]
    assert all(m.nearest.adjusted is None for m in closest)
    # calibration and `catalog eval` rank as the recognizer does
    pred, dist, _ = nearest_matches(gallery, skus, q, hub)
    assert pred == [w[0] for w in want]
    truth = [p.label for p in queries]
    res = score_zero_shot(gallery, skus, q, truth, hubness=hub)
    assert res.hubness_k == DEFAULT_HUBNESS_K and res.to_dict()["hubness_k"] == DEFAULT_HUBNESS_K
    assert res.top1 == pytest.approx(np.mean([w[0] == t for w, t in zip(want, truth)]))
    # an SKU added later gets its offset too: recognised through CSLS like the rest
    extra = next(p for p in queries if p.label != want[0][0])
    cat.add(extra.path, sku="in-store-photo")
    r = rec.recognize(extra.path)[0]
    assert r.nearest_sku == "in-store-photo" and r.distance < 1e-4
    assert rec.matcher.offsets is not None and len(rec.matcher.offsets) == len(ids) + 1
    cat.remove("in-store-photo")


def test_rebuild_switches_hubness_reduction_off_and_on(hub_catalog, photos, mobilenet_weights, capsys):
    cat, (_, queries) = hub_catalog, photos
    rec = Recognizer(cat)
    first = [rec.recognize(p.path)[0].nearest_sku for p in queries]
    assert rec.matcher.offsets is not None
    cat.rebuild(hubness_k=0)
    assert cat.settings()["hubness_k"] == 0 and cat.hubness_reference() is None
    plain = [rec.recognize(p.path)[0].nearest_sku for p in queries]  # the recognizer reloads
    assert rec.matcher.offsets is None and plain != first
    enc = cat.encoder()
    ids, skus = cat.embedding_table()
    d = 1 - enc.embed([p.path for p in queries]) @ cat.vectors(ids, enc.dim).T
    assert plain == [skus[i] for i in d.argmin(1)]
    assert main(["--catalog", str(cat.root), "rebuild", "--hubness-k", "-1"]) == 1
    assert "hubness k must be an integer >= 0" in capsys.readouterr().err
    assert main(["--catalog", str(cat.root), "rebuild", "--hubness-k", str(DEFAULT_HUBNESS_K), "--json"]) == 0
    capsys.readouterr()
    assert [rec.recognize(p.path)[0].nearest_sku for p in queries] == first
    # each version keeps its k: rolling back to a plain version turns CSLS off, and on again
    assert [v.hubness_k for v in cat.versions()] == [DEFAULT_HUBNESS_K, 0, DEFAULT_HUBNESS_K]  # newest first
    assert main(["--catalog", str(cat.root), "versions"]) == 0
    head, *rows = capsys.readouterr().out.splitlines()
    column = head.split().index("hubness-k")  # "created (UTC)" is two words, as a row's date and time are
    assert [r.lstrip("* ").split()[column] for r in rows] == [str(DEFAULT_HUBNESS_K), "0", str(DEFAULT_HUBNESS_K)]
    versions = [v.id for v in cat.versions()]  # newest first
    cat.rollback(versions[1])  # the hubness_k=0 version
    assert cat.settings()["hubness_k"] == 0 and [rec.recognize(p.path)[0].nearest_sku for p in queries] == plain
    cat.rollback(versions[0])
    assert cat.settings()["hubness_k"] == DEFAULT_HUBNESS_K
    assert [rec.recognize(p.path)[0].nearest_sku for p in queries] == first
    # another encoder without new photos: the old photos' embeddings do not fit it, so off
    cat.rebuild(encoder=MOBILENET_SPEC, weights=mobilenet_weights, encoder_options={"interpolation": "bicubic"})
    assert cat.settings()["unlabeled_photos"] == 0 and cat.hubness_reference() is None
    assert main(["--catalog", str(cat.root), "info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["hubness_k"] == DEFAULT_HUBNESS_K and info["unlabeled_photos"] == 0


def test_a_rebuilt_version_stores_its_offsets_and_the_recognizer_reads_them(tmp_path, grocery_store, caplog,
                                                                            monkeypatch):
    """`catalog rebuild` stores each vector's CSLS offset with the version; a recognizer loading
    it computes only those of SKUs added since, and computes them all when the file is damaged
    or was made against other photos or another k."""
    from conftest import TINY_CLIP_OPTIONS, TINY_CLIP_SPEC

    from catalog import index_store

    train = grocery_store.photos("train")
    cat = Catalog.init(tmp_path / "cat", encoder=TINY_CLIP_SPEC, random_init=True, encoder_options=TINY_CLIP_OPTIONS,
                       center_photos=[p.path for p in train[::200]], hubness_k=3)
    iconic = [c.iconic for c in grocery_store.classes]
    for i, path in enumerate(iconic[:6]):
        cat.add(path, sku=f"s{i}")
    version = cat.rebuild()
    files = {f.name for f in (cat.root / index_store.version_relpath(version.id)).iterdir()}
    assert index_store.OFFSETS_FILE in files
    hub = cat.hubness_reference()
    ids, _ = cat.embedding_table()
    want = dict(zip(ids.tolist(), hub.offsets(cat.vectors(ids, hub.dim)).tolist()))
    computed = []
    real = HubnessReference.offsets
    monkeypatch.setattr(HubnessReference, "offsets", lambda self, v: computed.append(len(v)) or real(self, v))
    rec = Recognizer(cat)
    rec.recognize(train[3].path)
    assert sum(computed) == 0 and rec.matcher.offsets.keys() == want.keys()
    np.testing.assert_allclose([rec.matcher.offsets[i] for i in want], list(want.values()), atol=1e-6)
    cat.add(iconic[6], sku="s6")  # after the version: only its vectors are computed
    computed.clear()
    Recognizer(cat).recognize(train[3].path)
    assert sum(computed) == cat.get("s6").vectors
    assert index_store.read_offsets(cat.root, index_store.version_relpath(version.id), "another") is None
    assert check(cat).ok
    (cat.root / index_store.version_relpath(version.id) / index_store.OFFSETS_FILE).write_bytes(b"damaged")
    report = check(cat)  # reported, not repairable: the recognizer computes them instead
    assert [(f.kind, f.repairable) for f in report.findings] == [("bad_offsets", False)]
    computed.clear()
    rec = Recognizer(cat)
    rec.recognize(train[3].path)
    assert "computing the CSLS offsets instead" in caplog.text and sum(computed) == len(ids) + cat.get("s6").vectors
    np.testing.assert_allclose([rec.matcher.offsets[i] for i in want], list(want.values()), atol=1e-6)
    cat.close()


def test_init_rejects_a_bad_hubness_k_in_one_line_and_creates_nothing(tmp_path, capsys, photos):
    root = tmp_path / "cat"
    assert main(["--catalog", str(root), "init", "--random-init", "--hubness-k", "-3"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("catalog: error: ") and "\n" not in err and "hubness k" in err
    assert not root.exists() or not any(root.iterdir())
    # without unlabeled photos the k is stored but nothing is ranked by it
    cat = Catalog.init(root, encoder=MOBILENET_SPEC, random_init=True, hubness_k=5)
    assert cat.settings()["hubness_k"] == 5 and cat.hubness_reference() is None


def test_unlabeled_photos_round_trip_and_damage_is_survived_and_repaired(tmp_path, backend_url, grocery_store, caplog):
    """On SQLite and PostgreSQL: the photos' embeddings are stored and read back exactly; damaged
    ones never stop recognition (plain 1-NN, one error logged), `check` finds them and
    `check --repair` drops them."""
    from conftest import TINY_CLIP_OPTIONS, TINY_CLIP_SPEC
    from sqlalchemy import update

    from catalog.models import EncoderRow

    train = grocery_store.photos("train")
    unlabeled = [p.path for p in train[::300]]
    cat = Catalog.init(tmp_path / "cat", encoder=TINY_CLIP_SPEC, random_init=True, encoder_options=TINY_CLIP_OPTIONS,
                       db_url=backend_url, center_photos=unlabeled, hubness_k=3)
    try:
        iconic = {c.name: c.iconic for c in grocery_store.classes}
        for sku in list(iconic)[:4]:
            cat.add(iconic[sku], sku=sku)
        hub = cat.hubness_reference()
        assert hub.k == 3 and len(hub.photos) == len(unlabeled)
        np.testing.assert_array_equal(hub.photos, cat.encoder().embed(unlabeled))
        assert check(cat).ok
        photo = train[5].path
        with_csls = Recognizer(cat).recognize(photo)[0]
        enc_id = cat.snapshot().encoder_id
        with cat.sessions.begin() as s:
            s.execute(update(EncoderRow).where(EncoderRow.id == enc_id).values(unlabeled=b"\x00\x01\x02"))
        with pytest.raises(RetailKlipError, match="damaged.*catalog check --repair"):
            cat.hubness_reference()
        nan = np.full((2, cat.encoder_identity().dim), np.nan, "<f4").tobytes()  # whole vectors, not finite
        with cat.sessions.begin() as s:
            s.execute(update(EncoderRow).where(EncoderRow.id == enc_id).values(unlabeled=nan))
        with pytest.raises(RetailKlipError, match="damaged.*finite.*catalog check --repair"):
            cat.hubness_reference()
        assert [f.kind for f in check(cat).findings] == ["bad_unlabeled"]
        rec = Recognizer(cat)
        r = rec.recognize(photo)[0]  # recognition goes on, by plain 1-NN
        assert rec.matcher.offsets is None and "plain 1-NN until it is repaired" in caplog.text
        assert r.distance <= with_csls.distance + 1e-6  # plain 1-NN: the smallest distance
        # an add goes on too, saying its store-photo check was skipped
        added = cat.add(iconic[list(iconic)[4]], sku=list(iconic)[4])
        assert added.store_photos is None and "store-photo check of the new reference image is skipped" in caplog.text
        report = check(cat)
        assert not report.ok and [f.kind for f in report.findings] == ["bad_unlabeled"]
        assert check(cat, repair=True).findings[0].repaired == 1
        assert check(cat).ok and cat.settings()["unlabeled_photos"] == 0 and cat.hubness_reference() is None
    finally:
        cat.close()


def test_photos_given_later_need_a_k_and_the_rebuild_says_so(tmp_path, grocery_store, caplog):
    """A catalog made without photos (or upgraded from before migration 0005) has k = 0: a rebuild
    with photos stores them and warns that they are unused; `--hubness-k` then turns CSLS on
    without new photos (the encoder, centre included, is unchanged)."""
    from conftest import TINY_CLIP_OPTIONS, TINY_CLIP_SPEC

    cat = Catalog.init(tmp_path / "cat", encoder=TINY_CLIP_SPEC, random_init=True, encoder_options=TINY_CLIP_OPTIONS)
    assert cat.settings()["hubness_k"] == 0  # the default without photos
    iconic = [c.iconic for c in grocery_store.classes[:3]]
    for i, image in enumerate(iconic):
        cat.add(image, sku=f"s{i}")
    photos = [p.path for p in grocery_store.photos("train")[::400]]
    cat.rebuild(center_photos=photos)
    assert "pass --hubness-k 30 to use them" in caplog.text
    assert cat.settings()["unlabeled_photos"] == len(photos) and cat.hubness_reference() is None
    cat.rebuild(hubness_k=4)
    assert cat.hubness_reference().k == 4 and Recognizer(cat).matcher.offsets is not None
    cat.close()


# ------------------------------------------------------- store photos a new reference takes
def synthetic_catalog(seed: int, n_queries: int):
    """(rng, gallery (80, 12) of 40 SKUs x 2 views, their SKU ids, 60 store photos, ``n_queries``
    queries near random gallery vectors), all unit rows, for the switches_to tests."""
    rng = np.random.default_rng(seed)
    dim, views = 12, 2
    gallery = unit(rng.normal(size=(40 * views, dim)))
    skus = [f"s{i // views}" for i in range(len(gallery))]
    photos = unit(rng.normal(size=(60, dim)))
    queries = unit(gallery[rng.choice(len(gallery), n_queries)] + 0.9 * rng.normal(size=(n_queries, dim)))
    return rng, gallery, skus, photos, queries


def exact_matcher(vectors: np.ndarray, names: list[str], hub: HubnessReference | None) -> SKUMatcher:
    """The recognizer's matcher over ``vectors`` (SKU ``names[i]`` each), CSLS-ranked against
    ``hub`` (None: plain 1-NN)."""
    index = VectorIndex(vectors.shape[1])
    index.add(np.arange(len(vectors), dtype=np.int64), vectors)
    offsets = None if hub is None else dict(enumerate(hub.offsets(vectors).tolist()))
    return SKUMatcher(index, dict(enumerate(names)), offsets=offsets)


def test_switches_to_is_what_the_matcher_says_after_the_vectors_are_added():
    """switches_to predicts, from the current matches only, exactly which queries a new
    reference's vectors take from another SKU: plain and CSLS, new SKU and appended views."""
    rng, gallery, skus, photos, queries = synthetic_catalog(3, 80)
    dim = gallery.shape[1]
    new = unit(queries[:3] + 0.2 * rng.normal(size=(3, dim)))  # near some queries: it takes a few
    for hub in (None, HubnessReference(photos, k=5)):
        for sku in ("s7", "new-sku"):
            current = exact_matcher(gallery, skus, hub).match(queries, 2.0)
            after = exact_matcher(np.concatenate([gallery, new]), skus + [sku] * len(new), hub).match(queries, 2.0)
            want = [a.nearest.sku == sku != c.nearest.sku for a, c in zip(after, current)]
            got = switches_to(current, queries, new, None if hub is None else hub.offsets(new), sku)
            assert got.tolist() == want and 0 < sum(want) < len(queries)
    with pytest.raises(ValueError, match="offsets"):
        switches_to(current, queries, new, np.zeros(2), "s1")
    with pytest.raises(ValueError, match="queries"):
        switches_to(current[:3], queries, new, None, "s1")


def test_switched_to_is_what_the_matcher_says_after_all_new_vectors_are_added_together(monkeypatch):
    """switched_to predicts, from the current matches only, the SKU each query's nearest SKU
    becomes once new vectors of several SKUs (appended to existing ones, and a new one) are in
    the index together: plain and CSLS.  Judged together, not one SKU at a time: a query that
    two new references would each take alone goes to the nearer one, and one whose own SKU
    gains a nearer vector stays."""
    rng, gallery, skus, photos, queries = synthetic_catalog(11, 120)
    dim = gallery.shape[1]
    new = unit(queries[:12] + 0.3 * rng.normal(size=(12, dim)))  # near some queries
    new_skus = [f"s{i % 5}" for i in range(10)] + ["new-sku"] * 2
    for hub in (None, HubnessReference(photos, k=5)):
        current = exact_matcher(gallery, skus, hub).match(queries, 2.0)
        after = exact_matcher(np.concatenate([gallery, new]), skus + new_skus, hub).match(queries, 2.0)
        want = [a.nearest.sku if a.nearest.sku != c.nearest.sku else None for a, c in zip(after, current)]
        got = switched_to(current, queries, new, new_skus, None if hub is None else hub.offsets(new))
        assert got.tolist() == want and 0 < sum(w is not None for w in want) < len(queries)
        with monkeypatch.context() as mp:  # the new vectors compared in chunks: the same answer
            mp.setattr(matching, "SWITCH_CHUNK", 5)
            assert switched_to(current, queries, new, new_skus, None if hub is None else hub.offsets(new)).tolist() == want
        alone = {sku: switches_to(current, queries, new[[i for i, n in enumerate(new_skus) if n == sku]],
                                  None if hub is None else hub.offsets(new)[[i for i, n in enumerate(new_skus) if n == sku]],
                                  sku) for sku in set(new_skus)}
        # judged alone, the SKUs' takes overlap or include photos that stay: not the joint effect
        assert sum(a.sum() for a in alone.values()) > sum(w is not None for w in want)
    with pytest.raises(ValueError, match="SKUs"):
        switched_to(current, queries, new, new_skus[:-1], None)


def test_an_exact_copy_of_another_skus_reference_counts_as_taken_and_the_limit_has_a_floor():
    """switches_to counts a tie (a copy of another SKU's vector) as taken, as the index then
    returns the newer vector; the hub limit is twice an SKU's share, at least 1 % of the photos."""
    rng = np.random.default_rng(5)
    gallery = unit(rng.normal(size=(6, 8)))
    index = VectorIndex(8)
    index.add(np.arange(6, dtype=np.int64), gallery)
    matcher = SKUMatcher(index, {i: f"s{i}" for i in range(6)})
    queries = gallery[:2]
    current = matcher.match(queries, 2.0)
    assert switches_to(current, queries, gallery[:1], None, "copy").tolist() == [True, False]
    index.add(np.array([6]), gallery[:1])
    after = SKUMatcher(index, {**{i: f"s{i}" for i in range(6)}, 6: "copy"}).match(queries, 2.0)
    assert after[0].nearest.sku == "copy" and after[1].nearest.sku == "s1"
    assert hub_limit(351, 81) == pytest.approx(2 * 351 / 81)
    assert hub_limit(512, 2500) == pytest.approx(5.12)  # an SKU's share is under one photo here


def store_sample(grocery_store):
    """(train photos, every 8th class, every 50th train photo as the unlabeled store photos,
    class -> iconic packshot) of the add / import hub-check tests."""
    train = grocery_store.photos("train")
    return (train, sorted({p.label for p in train})[::8], [p.path for p in train[::50]],
            {c.name: c.iconic for c in grocery_store.classes})


def packshot_catalog(root, weights, unlabeled, packshots: dict) -> Catalog:
    """A catalog keeping ``unlabeled`` as its store photos, with ``packshots`` (SKU -> image) imported."""
    cat = Catalog.init(root, encoder=MOBILENET_SPEC, weights=weights, encoder_options=MOBILENET_OPTIONS,
                       center_photos=unlabeled)
    csv = root.parent / f"{root.name}-packshots.csv"
    csv.write_text("image,sku,name\n" + "".join(f"{img},{sku},\n" for sku, img in packshots.items()))
    cat.import_csv(csv, progress=False)
    return cat


def store_photo_skus(cat: Catalog, rec: Recognizer) -> list[str]:
    """The nearest SKU recognition names now for each of ``cat``'s stored unlabeled photos."""
    photos, key = cat.hubness_reference().photos, cat.encoder().identity.key
    return [m.nearest.sku for m in rec.match_embeddings(photos, key, 2.0)]


def taken_by(sku: str, before: list[str], after: list[str]) -> int:
    """Photos whose nearest SKU became ``sku`` between ``before`` and ``after``."""
    return sum(a == sku != b for a, b in zip(after, before))


def test_add_counts_the_store_photos_it_takes_and_refuses_to_append_a_hub(tmp_path, grocery_store, mobilenet_weights,
                                                                          capsys):
    """catalog add reports how many of the catalog's unlabeled store photos a new reference image
    takes from other SKUs (exactly what recognition then does to them); an in-store photo
    appended to one SKU takes many (docs/evaluation.md, "More references per SKU") and is refused,
    nothing written, unless --force."""
    train, classes, unlabeled, iconic = store_sample(grocery_store)
    root = tmp_path / "cat"
    cat = packshot_catalog(root, mobilenet_weights, unlabeled, {c: iconic[c] for c in classes[:-1]})
    rec = Recognizer(cat)

    def nearest() -> list[str]:
        return store_photo_skus(cat, rec)

    def taken_since(before: list[str], sku: str) -> int:
        return taken_by(sku, before, nearest())

    before = nearest()
    added = cat.add(iconic[classes[-1]], sku=classes[-1])  # a new SKU's packshot
    assert added.store_photos.photos == len(unlabeled)
    assert added.store_photos.limit == pytest.approx(hub_limit(len(unlabeled), len(classes)))
    assert added.store_photos.taken == taken_since(before, classes[-1])
    # in-store photos (not among the unlabeled ones) appended to their own SKU
    unlabeled_set = set(unlabeled)
    others = {c: [p for p in train if p.label == c and p.path not in unlabeled_set] for c in classes}
    in_store = [others[c][len(others[c]) // 2] for c in classes[:6]]
    refused = 0
    for p in in_store:
        before, refs = nearest(), cat.get(p.label).references
        capsys.readouterr()
        rc = main(["--catalog", str(root), "add", str(p.path), "--sku", p.label, "--append", "--json"])
        out, err = capsys.readouterr()
        if rc == 0:
            taken = json.loads(out)["store_photos"]
            assert not taken["hub"] and taken["taken"] == taken_since(before, p.label)
            continue
        assert rc == 1 and err.count("\n") == 1 and err.startswith("catalog: error: not appended")
        assert cat.get(p.label).references == refs and nearest() == before  # nothing written
        if not refused:  # the library raises the same; --force appends it and reports it a hub
            with pytest.raises(HubReferenceError, match="--force"):
                cat.add(p.path, sku=p.label, append=True)
            assert main(["--catalog", str(root), "add", str(p.path), "--sku", p.label, "--append", "--force"]) == 0
            err = capsys.readouterr().err  # appended, with a warning naming what it takes
            n = taken_since(before, p.label)
            assert f"{p.label}'s new reference image takes {n} of the catalog's {len(unlabeled)} unlabeled" in err
            assert n > hub_limit(len(unlabeled), len(classes)) and cat.get(p.label).references == refs + 1
        refused += 1
    assert refused, "no in-store photo was a hub on these photos"
    assert main(["--catalog", str(root), "add", str(iconic[classes[0]]), "--sku", "x", "--force"]) == 1
    assert capsys.readouterr().err.startswith("catalog: error: --force applies to --append only")
    # in-store photos as new SKUs are added, with a warning where they take more than the limit
    for i, c in enumerate(classes[1:6]):
        sku, before = f"shelf-photo-{i}", nearest()
        assert main(["--catalog", str(root), "add", str(others[c][0].path), "--sku", sku]) == 0
        err = capsys.readouterr().err
        hub = taken_since(before, sku) > hub_limit(len(unlabeled), len(cat.list_skus()))
        assert (f"{sku}'s new reference image takes" in err) == hub and cat.get(sku).references == 1


def test_import_warns_of_each_hub_as_importing_it_alone_would(tmp_path, grocery_store, mobilenet_weights, caplog):
    """catalog import checks each new reference image against the catalog's unlabeled store
    photos as add checks a new SKU's: each is counted against the catalog as it was before the
    import (exactly what importing it alone does to the photos' recognition), an SKU over the
    limit of the SKUs after the import is warned about, and every SKU is still written."""
    import shutil

    train, classes, unlabeled, iconic = store_sample(grocery_store)
    base = tmp_path / "base"
    cat = packshot_catalog(base, mobilenet_weights, unlabeled, {c: iconic[c] for c in classes})
    unlabeled_set = set(unlabeled)
    # in-store photos imported as new SKUs (the measured hub case) and one more packshot
    rows = [(p.path, f"shelf-{i}") for i, c in enumerate(classes[:6])
            for p in [[q for q in train if q.label == c and q.path not in unlabeled_set][0]]]
    extra = sorted({c.name for c in grocery_store.classes} - set(classes))[0]
    rows.append((iconic[extra], extra))

    def warned(log: str) -> set[str]:
        return {sku for _img, sku in rows if f"SKU {sku!r}: its reference image takes" in log}

    taken = {}
    for img, sku in rows:  # each row imported alone into a copy of the catalog: its real effect
        root = tmp_path / f"alone-{sku}"
        shutil.copytree(base, root)
        one = Catalog.open(root)
        before = store_photo_skus(one, Recognizer(one))
        csv = tmp_path / f"{sku}.csv"
        csv.write_text(f"image,sku,name\n{img},{sku},\n")
        caplog.clear()
        with caplog.at_level("WARNING", logger="catalog"):
            assert len(one.import_csv(csv, progress=False)) == 1
        taken[sku] = taken_by(sku, before, store_photo_skus(one, Recognizer(one)))
        hub = taken[sku] > hub_limit(len(unlabeled), len(classes) + 1)
        assert warned(caplog.text) == ({sku} if hub else set())
        if hub:
            assert f"takes {taken[sku]} of the catalog's {len(unlabeled)} unlabeled store photos" in caplog.text
    limit = hub_limit(len(unlabeled), len(classes) + len(rows))  # the SKUs there will be after the import
    expected = {sku for sku, n in taken.items() if n > limit}
    assert expected, "no imported photo was a hub on these photos"
    assert expected != set(taken), "every imported reference image was a hub"
    # all rows in one import: each counted against the catalog before it
    together = tmp_path / "all.csv"
    together.write_text("image,sku,name\n" + "".join(f"{img},{sku},\n" for img, sku in rows))
    caplog.clear()
    with caplog.at_level("WARNING", logger="catalog"):
        imported = cat.import_csv(together, progress=False)
        assert [r.sku for r in imported] == [sku for _img, sku in rows]
    assert {r.sku: r.store_photos.taken for r in imported} == taken  # the report: each row's own effect
    assert warned(caplog.text) == expected
    for sku in expected:
        assert f"SKU {sku!r}: its reference image takes {taken[sku]} of the catalog's {len(unlabeled)} unlabeled " \
               f"store photos from other SKUs (limit {limit:.1f})" in caplog.text
    assert len(cat.list_skus()) == len(classes) + len(rows)


def test_import_append_counts_every_skus_new_images_together_and_refuses_hubs(tmp_path, grocery_store, mobilenet_weights,
                                                                               capsys):
    """catalog import --append counts what all its rows take together, against the catalog the
    import makes (exactly what recognition then does to the stored photos): two in-store photos
    appended to *every* SKU, the documented way to use in-store references, are judged as a
    whole; the same two photos appended to one SKU alone can be a hub, and are then refused,
    nothing written, unless --force."""
    import shutil

    train, classes, unlabeled, iconic = store_sample(grocery_store)
    base = tmp_path / "base"
    packshot_catalog(base, mobilenet_weights, unlabeled, {c: iconic[c] for c in classes}).close()
    unlabeled_set = set(unlabeled)
    others = {c: [p.path for p in train if p.label == c and p.path not in unlabeled_set] for c in classes}
    rows = {c: [others[c][len(others[c]) // 3], others[c][2 * len(others[c]) // 3]] for c in classes}
    limit = hub_limit(len(unlabeled), len(classes))

    def csv_of(skus, name) -> Path:
        path = tmp_path / f"{name}.csv"
        path.write_text("image,sku,name\n" + "".join(f"{img},{c},\n" for c in skus for img in rows[c]))
        return path

    def appended(skus, name, *args) -> tuple[dict, dict, int]:
        """Import --append the rows of ``skus`` into a copy of the catalog: (report, real takes, rc)."""
        root = tmp_path / name
        shutil.copytree(base, root)
        cat = Catalog.open(root)
        before = store_photo_skus(cat, Recognizer(cat))
        capsys.readouterr()
        rc = main(["--catalog", str(root), "import", str(csv_of(skus, name)), "--append", "--json", *args])
        out = capsys.readouterr().out
        cat = Catalog.open(root)
        after = store_photo_skus(cat, Recognizer(cat))
        report = {r["sku"]: r for r in json.loads(out)} if rc == 0 else {}
        for c in report:
            assert report[c]["references"] == 2 and cat.get(c).references == 3
        return report, {c: taken_by(c, before, after) for c in skus}, rc

    # every SKU at once: the report is the real joint effect
    report, real, rc = appended(classes, "every", "--force")
    assert rc == 0 and set(report) == set(classes)
    assert {c: r["store_photos"]["taken"] for c, r in report.items()} == real
    assert all(r["store_photos"]["limit"] == round(limit, 3) and r["store_photos"]["photos"] == len(unlabeled)
               for r in report.values())
    hubs_together = {c for c, n in real.items() if n > limit}
    # one SKU at a time: a hub is refused, nothing written; --force appends it
    refused = 0
    for c in classes:
        alone, real_alone, _ = appended([c], f"alone-{c}", "--force")
        assert alone[c]["store_photos"]["taken"] == real_alone[c]
        if real_alone[c] <= limit:
            continue
        refused += 1
        root = tmp_path / f"refused-{c}"
        shutil.copytree(base, root)
        cat = Catalog.open(root)
        before = store_photo_skus(cat, Recognizer(cat))
        capsys.readouterr()
        assert main(["--catalog", str(root), "import", str(csv_of([c], f"r-{c}")), "--append"]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "not appended" in err and f"{c!r} {real_alone[c]}" in err and "--force" in err
        cat = Catalog.open(root)
        assert cat.get(c).references == 1 and store_photo_skus(cat, Recognizer(cat)) == before
        with pytest.raises(HubReferenceError, match="--force"):
            cat.import_csv(csv_of([c], f"r-{c}"), append=True, progress=False)
    assert refused, "no SKU's in-store photos were a hub on these photos"
    assert refused > len(hubs_together), "appending to every SKU at once flagged as many SKUs as one at a time"
    # without --force the every-SKU import goes through exactly when no SKU is a hub together
    rc = main(["--catalog", str(base), "import", str(csv_of(classes, "every-base")), "--append"])
    assert rc == (1 if hubs_together else 0)
    assert capsys.readouterr().out.startswith("appended 22 reference images to 11 SKUs") or hubs_together
    # refused rows: an unknown SKU names its line; --force needs --append
    (tmp_path / "unknown.csv").write_text(f"image,sku,name\n{rows[classes[0]][0]},{classes[0]},\n{iconic[classes[0]]},nope,\n")
    assert main(["--catalog", str(base), "import", str(tmp_path / "unknown.csv"), "--append"]) == 1
    assert "unknown.csv:3: unknown SKU 'nope'" in capsys.readouterr().err
    assert main(["--catalog", str(base), "import", str(tmp_path / "unknown.csv"), "--force"]) == 1
    assert capsys.readouterr().err.startswith("catalog: error: --force applies to --append only")
    # two names for one SKU: refused, naming the line
    (tmp_path / "names.csv").write_text(f"image,sku,name\n{rows[classes[0]][0]},{classes[0]},A\n"
                                        f"{rows[classes[0]][1]},{classes[0]},B\n")
    assert main(["--catalog", str(base), "import", str(tmp_path / "names.csv"), "--append"]) == 1
    assert "names.csv:3: SKU" in capsys.readouterr().err


def test_remove_reference_undoes_a_forced_append(tmp_path, grocery_store, mobilenet_weights, capsys):
    """catalog remove SKU --reference IMAGE takes one appended reference image back out (found
    by list --references, whose stored copy identifies it): the stored photos are recognised as
    before the append, its file leaves the image store; the SKU's only reference image, an image
    that is not its reference and an unknown SKU are refused with one line, nothing changed."""
    train, classes, unlabeled, iconic = store_sample(grocery_store)
    root = tmp_path / "cat"
    cat = packshot_catalog(root, mobilenet_weights, unlabeled, {c: iconic[c] for c in classes})
    rec = Recognizer(cat)
    before = store_photo_skus(cat, rec)
    files_before = {p for p in (root / "images").rglob("*") if p.is_file()}
    unlabeled_set = set(unlabeled)
    c = classes[0]
    photo = next(p.path for p in train if p.label == c and p.path not in unlabeled_set)
    assert main(["--catalog", str(root), "add", str(photo), "--sku", c, "--append", "--force"]) == 0
    assert cat.get(c).references == 2 and store_photo_skus(cat, rec) != before
    capsys.readouterr()
    for args, message in (([c, "--reference", str(iconic[classes[1]])], "is not a reference image of SKU"),
                          (["nope", "--reference", str(photo)], "unknown SKU 'nope'")):
        assert main(["--catalog", str(root), "remove", *args]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err
        assert cat.get(c).references == 2
    # the stored copy, as list --references shows it, identifies the appended photo too
    assert main(["--catalog", str(root), "list", "--references", c, "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    digest = hashlib.sha256(Path(photo).read_bytes()).hexdigest()
    assert [r["sha256"] for r in listed] == [hashlib.sha256(Path(iconic[c]).read_bytes()).hexdigest(), digest]
    assert len(cat.reference_images()) == len(classes) + 1
    assert main(["--catalog", str(root), "list", "--references"]) == 0
    out, err = capsys.readouterr()
    assert f"{c}\t{digest[:12]}\t" in out and out.count("\n") == len(classes) + 1
    assert err.startswith(f"{len(classes) + 1} reference image(s)")
    stored = Path(listed[1]["path"])
    assert stored.read_bytes() == Path(photo).read_bytes()
    assert main(["--catalog", str(root), "remove", c, "--reference", str(stored)]) == 0
    assert capsys.readouterr().out.startswith(f"removed a reference image of {c} (1 left)")
    assert not stored.exists()
    assert cat.get(c).references == 1 and store_photo_skus(cat, rec) == before
    assert {p for p in (root / "images").rglob("*") if p.is_file()} == files_before
    assert main(["--catalog", str(root), "remove", c, "--reference", str(iconic[c])]) == 1
    assert "the only reference image of SKU" in capsys.readouterr().err and cat.get(c).references == 1
