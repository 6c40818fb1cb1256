import numpy as np
import pytest

from retailklip.index import VectorIndex
from retailklip.matching import SKUMatcher


def _unit(rng, n, d):
    v = rng.standard_normal((n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


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
    d2, ids2 = again.search(q, 3)
    np.testing.assert_array_equal(ids2, ids)


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
    d, i = empty.search(v[:2], 1)
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
