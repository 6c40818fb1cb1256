"""Building a FAISS index and tuning its search parameter to a recall target.

::

    index, recall = build_index(ids, vectors, factory, target_recall=0.99)
    recall_at_1(index, (ids, vectors), default_queries(vectors))   # the same figure again

:func:`build_index` trains (IVF types, on a sample), adds, then raises the search parameter
(HNSW ``efSearch`` / IVF ``nprobe``) until recall@1 against exact search reaches the target,
and returns the measured recall@1.  The factory string usually comes from
:func:`retailklip.index_types.choose_index_type` (see ``docs/index-types.md``).
"""

from __future__ import annotations

import logging
from typing import Any

import faiss
import numpy as np

from .index import VectorIndex

logger = logging.getLogger(__name__)

#: Search-parameter ceilings for the recall tuning of :func:`build_index`.
MAX_EF_SEARCH = 4096
#: Default number of tuning queries and the norm of the displacement applied to them (see
#: :func:`default_queries`): a displacement of norm 1.0 (half in-distribution, half isotropic
#: direction) puts a query at cosine distance ~0.29 from the stored vector it was drawn from.
DEFAULT_TUNING_QUERIES = 1000
DEFAULT_QUERY_NOISE = 1.0
#: When the target recall is out of reach, :func:`build_index` keeps the smallest search
#: parameter whose recall is within this of the best one measured.
PLATEAU = 0.002
#: Two distances closer than this count as a tie in :func:`recall_at_1`.
TIE_TOLERANCE = 1e-5


def default_queries(vectors: np.ndarray, n: int = DEFAULT_TUNING_QUERIES, noise: float = DEFAULT_QUERY_NOISE,
                    seed: int = 0) -> np.ndarray:
    """Tuning queries: ``n`` stored vectors drawn without replacement, each moved by ``noise``
    (norm) along a random direction, renormalised.

    The direction is half *in-distribution* — the normalised difference of two random stored
    vectors, so it lies in the span the embeddings occupy — and half isotropic Gaussian.  With
    the default norm 1.0 a query lies at cosine distance ~0.29 from the vector it was drawn
    from, like a shelf photo from its reference views (~0.2-0.4).  A query is never identical
    to a stored vector in practice, and purely isotropic noise would be too easy: it lowers
    every similarity alike and keeps the source vector's rank, so a graph search finds it
    trivially (measured in docs/index-types.md: isotropic queries report recall@1 1.000 at
    efSearch 16 where held-out catalog-like queries get 0.957; these get 0.944).
    """
    rng = np.random.default_rng(seed)
    v = np.asarray(vectors, dtype=np.float32)
    m, d = min(int(n), len(v)), v.shape[1]
    x = v[np.sort(rng.choice(len(v), size=m, replace=False))]
    iso = rng.standard_normal((m, d), dtype=np.float32)
    iso /= np.maximum(np.linalg.norm(iso, axis=1, keepdims=True), 1e-12)
    diff = v[rng.integers(0, len(v), m)] - v[rng.integers(0, len(v), m)]
    norm = np.linalg.norm(diff, axis=1, keepdims=True)
    diff = np.where(norm > 1e-6, diff / np.maximum(norm, 1e-12), iso)  # a pair of equal vectors: isotropic
    e = iso + diff
    e /= np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
    q = x + float(noise) * e
    q /= np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    return np.ascontiguousarray(q, dtype=np.float32)


def _exact_top1(exact: Any, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray, Any]:
    """(best similarity, best id, vector lookup id->vector or None) of exact search."""
    if isinstance(exact, VectorIndex):
        d, i = exact.search(queries, 1)
        return 1.0 - d[:, 0].astype(np.float64), i[:, 0], exact.reconstruct
    if isinstance(exact, faiss.Index):
        s, i = exact.search(queries, 1)
        return s[:, 0].astype(np.float64), i[:, 0], None
    if isinstance(exact, tuple):
        ids, vecs = exact
        ids = np.asarray(ids, dtype=np.int64)
    else:
        vecs = exact
        ids = np.arange(len(vecs), dtype=np.int64)
    vecs = np.ascontiguousarray(vecs, dtype=np.float32)
    if vecs.ndim != 2 or vecs.shape[1] != queries.shape[1] or ids.shape != (len(vecs),):
        raise ValueError(f"exact vectors must be (N, {queries.shape[1]}) with N ids, got {vecs.shape} and {ids.shape}")
    s, pos = faiss.knn(queries, vecs, 1, metric=faiss.METRIC_INNER_PRODUCT)
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]

    def lookup(want: np.ndarray) -> np.ndarray:
        at = np.searchsorted(sorted_ids, want)
        at = np.minimum(at, len(sorted_ids) - 1)
        ok = sorted_ids[at] == want
        out = np.full((len(want), vecs.shape[1]), np.nan, np.float32)
        out[ok] = vecs[order[at[ok]]]
        return out

    return s[:, 0].astype(np.float64), ids[pos[:, 0]], lookup


def recall_at_1(index: VectorIndex, exact: Any, queries: np.ndarray) -> float:
    """Fraction of queries whose approximate 1-NN is the exact 1-NN.

    Args:
        index: the (approximate) index to judge.
        exact: the ground truth: an exact :class:`VectorIndex` (Flat), a raw FAISS inner-product
            index, an ``(ids, vectors)`` pair, or a bare (N, D) array (ids 0..N-1).
        queries: float32 (M, D) unit vectors.

    A returned neighbour whose true cosine distance ties the exact 1-NN's (within
    ``TIE_TOLERANCE``, e.g. a duplicated vector) counts as a hit.

    Raises:
        ValueError: no queries or shape mismatch.
    """
    q = index.check_vectors(queries)
    if len(q) == 0:
        raise ValueError("recall@1 needs at least one query")
    return _recall_given(index, q, _exact_top1(exact, q))


def _train_sample(n: int, nlist: int | None) -> int:
    """Training-sample size: 40 points per IVF centroid (FAISS warns below 39), at least
    256·39 for 8-bit PQ / SQ codebooks, at most 2**18 and n."""
    want = 1 << 14
    if nlist is not None:
        want = max(want, 40 * nlist)
    return int(min(n, max(want, 256 * 39), 1 << 18))


def build_index(
    ids: np.ndarray,
    vectors: np.ndarray,
    factory: str,
    *,
    target_recall: float = 0.99,
    queries: np.ndarray | None = None,
    seed: int = 0,
) -> tuple[VectorIndex, float]:
    """Build a :class:`VectorIndex` of ``factory`` and tune it to ``target_recall``.

    Trains when needed (IVF/PQ: on a random sample, see :func:`_train_sample`), adds every
    vector, then raises the search parameter — HNSW ``efSearch`` from 16, IVF ``nprobe`` from
    1, doubling, then a binary search down to the smallest value that reaches the target —
    until recall@1 against exact search on ``queries`` is ``>= target_recall``.  If the
    parameter maxes out (efSearch 4096, nprobe = nlist) without reaching it, the smallest value
    whose recall is within ``PLATEAU`` (0.002) of the best measured is kept.  Flat is exact: recall 1.0, nothing measured.

    Args:
        ids: int64 (N,) vector ids; ``vectors``: float32 (N, D) unit vectors (N >= 1).
        factory: a FAISS factory string (see :func:`choose_index_type`).
        target_recall: in (0, 1].
        queries: float32 (M, D) tuning queries; default :func:`default_queries` (1000 stored
            vectors moved to cosine distance ~0.29, half along in-distribution directions).
        seed: seeds the training sample and the default queries.

    Returns:
        ``(index, recall_at_1)``; the recall is also stored as ``index.recall_at_1``.

    Raises:
        IndexTypeError (a ValueError): invalid factory; ValueError: bad shapes, empty input,
            target outside (0, 1], or too few vectors to train the type.
    """
    v = np.ascontiguousarray(vectors, dtype=np.float32)
    if v.ndim != 2 or v.shape[0] == 0:
        raise ValueError(f"vectors must be a non-empty (N, D) array, got shape {v.shape}")
    n, d = v.shape
    i = np.ascontiguousarray(ids, dtype=np.int64)
    if i.shape != (n,):
        raise ValueError(f"ids must have shape ({n},), got {i.shape}")
    if not 0.0 < float(target_recall) <= 1.0:
        raise ValueError(f"target_recall must be in (0, 1], got {target_recall}")
    index = VectorIndex(d, factory)
    nlist = index.nlist
    if not index.is_trained:
        ns = _train_sample(n, nlist)
        min_needed = nlist if nlist is not None else 256
        if n < min_needed:
            raise ValueError(f"index type {factory!r} needs at least {min_needed} vectors to train, got {n}")
        rng = np.random.default_rng(seed)
        sample = v if ns >= n else v[np.sort(rng.choice(n, size=ns, replace=False))]
        index.train(sample)
    index.add(i, v)
    if factory == "Flat" or not index.search_params:
        rec = 1.0 if factory == "Flat" else recall_at_1(index, (i, v), queries if queries is not None else default_queries(v, seed=seed))
        index.recall_at_1 = rec
        return index, rec
    q = index.check_vectors(queries) if queries is not None else default_queries(v, seed=seed)
    exact = _exact_top1((i, v), q)  # computed once, reused for every parameter value
    name = next(iter(index.search_params))
    top = MAX_EF_SEARCH if nlist is None else nlist  # efSearch (HNSW) or nprobe (IVF) ceiling
    measured: dict[int, float] = {}

    def measure(p: int) -> float:
        if p not in measured:
            index.set_search_params(**{name: p})
            measured[p] = _recall_given(index, q, exact)
        return measured[p]

    p = lo = 16 if name == "efSearch" else 1
    while measure(p) < target_recall and p < top:
        lo, p = p, min(2 * p, top)
    if measured[p] >= target_recall:
        hi = p
        while hi - lo > max(1, lo // 8):  # smallest value reaching the target, to ~12%
            mid = (lo + hi) // 2
            if measure(mid) >= target_recall:
                hi = mid
            else:
                lo = mid
        best = hi
    else:  # the target is out of reach: the smallest value on the recall plateau
        top_rec = max(measured.values())
        best = min(k for k, r in measured.items() if r >= top_rec - PLATEAU)
    index.set_search_params(**{name: best})
    rec = measured[best]
    index.recall_at_1 = rec
    logger.info("built %s over %d vectors: %s=%d, recall@1 %.4f (tried %s)", factory, n, name, best, rec,
                {k: round(r, 4) for k, r in sorted(measured.items())})
    return index, rec


def _recall_given(index: VectorIndex, q: np.ndarray, exact: tuple[np.ndarray, np.ndarray, Any]) -> float:
    best_sim, best_id, lookup = exact
    _, got = index.search(q, 1)
    got = got[:, 0] if got.shape[1] else np.full(len(q), -1, np.int64)
    hit = got == best_id
    miss = np.flatnonzero(~hit & (got >= 0))
    if len(miss) and lookup is not None:
        vv = lookup(got[miss])
        sims = np.einsum("ij,ij->i", vv.astype(np.float64), q[miss].astype(np.float64))
        hit[miss] = np.nan_to_num(sims, nan=-np.inf) >= best_sim[miss] - TIE_TOLERANCE
    return float(hit.mean())
