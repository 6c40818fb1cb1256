import json
import re

import faiss
import numpy as np
import pytest

from retailklip.index import IndexNotRemovableError, IndexTypeError, VectorIndex, describe_index
from retailklip.index_build import build_index, default_queries, recall_at_1
from retailklip.index_types import FLAT_MAX_FLOATS, choose_index_type, estimate_memory
from retailklip.matching import SKUMatcher


def _unit(rng, n, d):
    v = rng.standard_normal((n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _clustered(n=20_000, d=64, views=8, seed=0):
    """Catalog-like vectors: SKU centres in a 16-d subspace, `views` noisy views per SKU."""
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.standard_normal((d, 16)))
    centres = rng.standard_normal((n // views, 16)) @ basis.T + 0.1 * rng.standard_normal((n // views, d)) / np.sqrt(d)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    v = np.repeat(centres, views, axis=0) + 0.3 * rng.standard_normal((n, d)) / np.sqrt(d)
    v = (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)
    return np.arange(100, 100 + n, dtype=np.int64), v


@pytest.fixture(scope="module")
def clustered():
    return _clustered()


@pytest.fixture(scope="module")
def hnsw(clustered):
    ids, v = clustered
    return build_index(ids, v, "HNSW32", target_recall=0.99)


# ----------------------------------------------------------------- VectorIndex basics (Flat)


def test_search_is_exact_cosine_distance(tmp_path):
    rng = np.random.default_rng(0)
    base, q = _unit(rng, 500, 16), _unit(rng, 7, 16)
    idx = VectorIndex(16)
    idx.add(np.arange(1000, 1500), base)
    d, ids = idx.search(q, 3)
    ref = 1.0 - q @ base.T
    order = np.argsort(ref, axis=1)[:, :3]
    np.testing.assert_array_equal(ids, order + 1000)
    np.testing.assert_allclose(d, np.take_along_axis(ref, order, 1), atol=1e-5)
    assert (d >= 0).all() and (d <= 2).all()
    idx.save(tmp_path / "i.faiss")
    again = VectorIndex.load(tmp_path / "i.faiss")
    _, ids2 = again.search(q, 3)
    np.testing.assert_array_equal(ids2, ids)
    assert again.factory == "Flat" and again.recall_at_1 == 1.0 and again.supports_remove


def test_remove_and_shapes():
    rng = np.random.default_rng(1)
    idx = VectorIndex(8)
    v = _unit(rng, 10, 8)
    idx.add(np.arange(10), v)
    assert idx.remove(np.array([3, 4, 99])) == 2
    assert sorted(idx.ids().tolist()) == [0, 1, 2, 5, 6, 7, 8, 9]
    _, ids = idx.search(v[3:4], 1)
    assert ids[0, 0] != 3
    with pytest.raises(ValueError, match="shape"):
        idx.add(np.arange(2), _unit(rng, 2, 4))
    empty = VectorIndex(8)
    d, _ = empty.search(v[:2], 1)
    assert d.shape == (2, 0)


def test_matcher_runner_up_is_another_sku():
    rng = np.random.default_rng(2)
    centres = _unit(rng, 3, 32)
    vecs, sku_of = [], {}
    for c, name in enumerate(["a", "b", "c"]):
        for j in range(10):  # 10 views per SKU, close to the centre
            n = len(vecs)
            v = centres[c] + 0.05 * rng.standard_normal(32).astype(np.float32)
            vecs.append(v / np.linalg.norm(v))
            sku_of[n] = name
    idx = VectorIndex(32)
    idx.add(np.arange(len(vecs)), np.stack(vecs))
    m = SKUMatcher(idx, sku_of)
    res = m.match(centres[[0, 2]], threshold=0.5, k=2)  # k=2 forces the widening search
    assert res[0].nearest.sku == "a" and res[0].runner_up.sku in ("b", "c")
    assert res[0].known and res[0].nearest.distance < res[0].runner_up.distance
    assert res[1].nearest.sku == "c"
    far = -centres[:1]
    assert not m.match(far, threshold=0.5)[0].known
    single = SKUMatcher(idx, {i: "a" for i in range(len(vecs))})
    assert single.match(centres[:1], 0.5)[0].runner_up is None


# ----------------------------------------------------------------- choosing a type


def test_choose_flat_small_hnsw_large_ivfpq_under_tight_budget():
    gib = 1 << 30
    assert choose_index_type(0, 768) == "Flat"
    assert choose_index_type(5_000, 768, 64 * gib) == "Flat"
    assert choose_index_type(FLAT_MAX_FLOATS // 768, 768, 64 * gib) == "Flat"
    assert choose_index_type(FLAT_MAX_FLOATS // 768 + 1, 768, 64 * gib) == "HNSW32"
    assert choose_index_type(1_000_000, 768, 64 * gib) == "HNSW32"
    # 1M x 768: Flat alone is ~3 GiB, HNSW32 ~3.2 GiB: 1 GiB gives IVF-SQ8 (~0.8 GiB) ...
    assert choose_index_type(1_000_000, 768, gib) == "IVF4096,SQ8"
    # ... 0.5 GiB IVF-SQ4, and 0.15 GiB IVF-PQ with the largest code that fits
    assert choose_index_type(1_000_000, 768, gib // 2) == "IVF4096,SQ4"
    budget = 150 << 20
    f = choose_index_type(1_000_000, 768, budget)
    m = re.fullmatch(r"IVF(\d+),PQ(\d+)", f)
    assert m, f
    nlist, pq = int(m.group(1)), int(m.group(2))
    assert nlist == 4096 and 768 % pq == 0 and pq <= 96
    assert estimate_memory(f, 1_000_000, 768) <= budget
    bigger = [k for k in range(pq + 1, 97) if 768 % k == 0]  # the largest code that fits was taken
    assert not bigger or estimate_memory(f"IVF{nlist},PQ{bigger[0]}", 1_000_000, 768) > budget
    # a small catalog whose Flat does not fit the budget is not Flat
    assert choose_index_type(20_000, 64, estimate_memory("Flat", 20_000, 64) - 1).startswith("IVF")
    # the default budget (half the RAM of any machine that runs the tests) holds 1M x 768 somehow
    assert choose_index_type(1_000_000, 768) != "Flat"
    with pytest.raises(IndexTypeError, match="no index type fits"):
        choose_index_type(1_000_000, 768, 10 << 20)


@pytest.mark.parametrize(
    "args",
    [(-1, 768, None), (10, 0, None), (10, 768, 0), (10, 768, -5), (1.5, 768, None), (10, 768, 1), (10, 768, 2.0)],
)
def test_choose_rejects_bad_input(args):
    with pytest.raises(ValueError):
        choose_index_type(*args)


def test_estimate_memory_tracks_the_real_index():
    rng = np.random.default_rng(3)
    n, d = 20_000, 64
    v = _unit(rng, n, d)
    for factory in ("Flat", "HNSW32", "IVF64,SQ4", "IVF64,PQ16"):
        idx = VectorIndex(d, factory)
        idx.train(v[:10_000])
        idx.add(np.arange(n), v)
        serialized = faiss.serialize_index(idx.faiss_index).nbytes  # data without the in-memory id hash map
        est = estimate_memory(factory, n, d) - 48 * n
        assert 0.8 * serialized <= est <= 1.25 * serialized, (factory, est, serialized)
    assert estimate_memory("HNSW32", n, d) > estimate_memory("Flat", n, d) > estimate_memory("IVF64,PQ16", n, d)
    with pytest.raises(ValueError, match="estimate"):
        estimate_memory("LSH", n, d)


# ----------------------------------------------------------------- building and recall


def test_flat_recall_is_one_without_measuring(clustered):
    ids, v = clustered
    idx, rec = build_index(ids[:2000], v[:2000], "Flat")
    assert rec == 1.0 and idx.recall_at_1 == 1.0 and idx.search_params == {} and idx.ntotal == 2000
    assert recall_at_1(idx, (ids[:2000], v[:2000]), default_queries(v[:2000])) == 1.0


def test_hnsw_reaches_target_recall_and_reports_it(clustered, hnsw):
    ids, v = clustered
    idx, rec = hnsw
    assert idx.factory == "HNSW32" and idx.ntotal == len(ids)
    assert rec >= 0.99 and idx.recall_at_1 == rec
    q = default_queries(v)
    assert recall_at_1(idx, (ids, v), q) == pytest.approx(rec)  # the reported figure is reproducible
    ef = idx.search_params["efSearch"]
    exact = VectorIndex(v.shape[1])
    exact.add(ids, v)
    assert recall_at_1(idx, exact, q) == pytest.approx(rec)
    # the measurement discriminates: a crippled search parameter gives a lower recall
    idx.set_search_params(efSearch=1)
    try:
        assert recall_at_1(idx, exact, q) < rec
    finally:
        idx.set_search_params(efSearch=ef)


def test_ivf_tunes_nprobe_to_the_smallest_sufficient_value_and_removes(clustered):
    ids, v = clustered
    idx, rec = build_index(ids, v, "IVF64,SQ8", target_recall=0.95)
    nprobe = idx.search_params["nprobe"]
    assert rec >= 0.95 and rec == idx.recall_at_1 and 1 < nprobe < 64
    q = default_queries(v)
    assert recall_at_1(idx, (ids, v), q) == pytest.approx(rec)
    idx.set_search_params(nprobe=nprobe - max(1, nprobe // 8) - 1)  # below the binary search's bracket
    assert recall_at_1(idx, (ids, v), q) < 0.95
    assert idx.supports_remove and idx.remove(ids[:10]) == 10 and idx.ntotal == len(ids) - 10


def test_unreachable_target_keeps_the_plateau_start():
    ids, v = _clustered(n=6000, d=32, views=8, seed=5)
    idx, rec = build_index(ids, v, "IVF16,PQ4", target_recall=0.999)  # 4-byte codes: far below target
    nprobe = idx.search_params["nprobe"]
    assert rec < 0.999 and idx.recall_at_1 == rec
    q = default_queries(v)
    idx.set_search_params(nprobe=16)
    best = recall_at_1(idx, (ids, v), q)
    idx.set_search_params(nprobe=nprobe)
    assert best - 0.002 <= rec <= best + 1e-9
    if nprobe > 1:
        idx.set_search_params(nprobe=nprobe // 2)
        assert recall_at_1(idx, (ids, v), q) < best - 0.002


def test_recall_counts_ties_and_misses():
    rng = np.random.default_rng(4)
    v = _unit(rng, 200, 16)
    dup = np.concatenate([v, v[:1]])  # id 200 duplicates id 0
    ids = np.arange(201)
    idx = VectorIndex(16)
    idx.add(ids[::-1].copy(), dup[::-1].copy())  # so the index may return 200 where exact says 0
    assert recall_at_1(idx, (ids, dup), v[:1]) == 1.0
    wrong = VectorIndex(16)
    wrong.add(ids[:100], dup[100:200])  # ids shuffled against the truth
    assert recall_at_1(wrong, (ids[:100], dup[:100]), v[:50]) < 0.1
    with pytest.raises(ValueError):
        recall_at_1(idx, (ids, dup), np.zeros((0, 16), np.float32))


def test_build_rejects_bad_input(clustered):
    ids, v = clustered
    with pytest.raises(ValueError, match="invalid index type 'Bogus32'"):
        build_index(ids[:100], v[:100], "Bogus32")
    with pytest.raises(ValueError, match="invalid index type"):
        VectorIndex(64, "IVF,PQ")
    with pytest.raises(IndexTypeError, match="IDMap"):
        VectorIndex(64, "IDMap,Flat")
    # FAISS builds HNSW over PQ codes with L2 whatever metric is asked for: its "cosine
    # distances" were 1 - L2 and out of order (found in review)
    for factory in ("HNSW32,PQ8", "HNSW16,PQ8x4"):
        with pytest.raises(IndexTypeError, match="cannot search by inner product"):
            VectorIndex(64, factory)
    for factory in ("HNSW32,SQ8", "IVF16,PQ8", "IVF16_HNSW32,PQ8"):
        assert VectorIndex(64, factory).dim == 64


def test_an_index_of_a_refused_type_written_before_is_not_loaded(clustered, tmp_path):
    """An HNSW-over-PQ index saved before such types were refused: loading it fails like an
    unreadable file (the catalog then serves from the database and `check --repair` rebuilds)."""
    import faiss

    ids, v = clustered
    raw = faiss.IndexIDMap2(faiss.index_factory(v.shape[1], "HNSW32,PQ8", faiss.METRIC_INNER_PRODUCT))
    raw.train(v)
    raw.add_with_ids(v, ids)
    faiss.write_index(raw, str(tmp_path / "old.faiss"))
    with pytest.raises(RuntimeError, match="searches by L2 distance"):
        VectorIndex.load(tmp_path / "old.faiss")
    with pytest.raises(ValueError, match="target_recall"):
        build_index(ids[:100], v[:100], "HNSW32", target_recall=1.5)
    with pytest.raises(ValueError, match="ids"):
        build_index(ids[:99], v[:100], "Flat")
    with pytest.raises(ValueError, match="at least"):
        build_index(ids[:100], v[:100], "IVF1024,PQ8")


# ----------------------------------------------------------------- save / load, removal


def test_save_load_keeps_factory_search_parameter_and_results(hnsw, clustered, tmp_path):
    _, v = clustered
    idx, rec = hnsw
    q = default_queries(v, n=300, seed=7)
    before = idx.search(q, 5)
    path = tmp_path / "index.faiss"
    idx.save(path)
    meta = json.loads((tmp_path / "index.faiss.json").read_text())
    assert meta["factory"] == "HNSW32" and meta["search_params"] == idx.search_params
    again = VectorIndex.load(path)
    assert again.factory == "HNSW32" and again.search_params == idx.search_params and again.stores_exact_vectors
    assert again.recall_at_1 == rec and again.ntotal == idx.ntotal and not again.supports_remove
    after = again.search(q, 5)
    np.testing.assert_array_equal(after[1], before[1])
    np.testing.assert_array_equal(after[0], before[0])
    # without the sidecar: the factory comes from the index structure, efSearch from the FAISS file
    (tmp_path / "index.faiss.json").unlink()
    bare = VectorIndex.load(path)
    assert bare.factory == "HNSW32" and bare.search_params == idx.search_params and bare.recall_at_1 is None
    assert VectorIndex.load(path, factory="HNSW32,Flat").factory == "HNSW32,Flat"


def test_save_load_ivf_keeps_nprobe(clustered, tmp_path):
    ids, v = clustered
    idx = VectorIndex(64, "IVF64,Flat")
    idx.train(v)
    idx.add(ids, v)
    idx.set_search_params(nprobe=9)
    faiss.write_index(idx.faiss_index, str(tmp_path / "raw.faiss"))  # no sidecar at all
    again = VectorIndex.load(tmp_path / "raw.faiss")
    assert again.factory == "IVF64,Flat" and again.search_params == {"nprobe": 9}
    assert again.stores_exact_vectors and not VectorIndex(64, "IVF64,SQ8").stores_exact_vectors
    q = default_queries(v, n=100)
    np.testing.assert_array_equal(again.search(q, 3)[1], idx.search(q, 3)[1])
    with pytest.raises(ValueError, match="efSearch"):
        again.set_search_params(efSearch=10)


def test_hnsw_remove_is_a_clear_error(hnsw, clustered):
    ids, _ = clustered
    idx, _ = hnsw
    assert not idx.supports_remove
    assert idx.remove(np.array([], np.int64)) == 0  # nothing to remove is fine
    with pytest.raises(IndexNotRemovableError, match="cannot remove"):
        idx.remove(ids[:1])
    assert isinstance(IndexNotRemovableError("x"), ValueError)
    assert idx.ntotal == len(ids)


def test_describe_index():
    for f in ("Flat", "HNSW16", "IVF32,PQ8", "IVF32,Flat", "IVF32,SQ8", "IVF32,SQ4"):
        assert describe_index(faiss.IndexIDMap2(faiss.index_factory(32, f, faiss.METRIC_INNER_PRODUCT))) == f
