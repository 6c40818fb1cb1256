"""SKU-level 1-NN matching with a distance threshold (the open-set cutoff).

The index holds several vectors per SKU (K augmented views of each reference image), so the
nearest *SKU* is the SKU of the nearest vector, and the runner-up is the nearest vector of a
*different* SKU.  A query whose nearest SKU is farther than the threshold is "unknown": this
replaces a softmax classification head and its confidence cutoff (0.78 in the system this
replaces), and needs no retraining when SKUs are added (RetailKLIP §3, 1-NN zero-shot
recognition).

With hubness reduction (:mod:`retailklip.hubness`, CSLS) each vector's cosine distance gets an
offset for the *ranking*: the nearest SKU is then the one of smallest adjusted distance, which
need not be the closest, and the runner-up may be closer than it; reported distances stay plain
cosine distances (``distance`` and ``outlier-ratio`` scores are on them), the ``ratio`` score is on
the adjusted ones (:attr:`Neighbour.adjusted`).

Outlier references (reference images of products *not* in the catalog) live in a second index:
they are never a match, only the denominator of the ``outlier-ratio`` score
(:func:`retailklip.open_set.outlier_ratio`): each query's distance to the nearest of them is
:attr:`Match.outlier_distance`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .index import VectorIndex
from .open_set import OUTLIER_SCORE, check_score, no_outliers_error, open_set_score

#: First search depth with CSLS offsets: the README main job's offsets spread 0.13, and at that
#: spread most queries need 32 to 128 neighbours (benchmarks/bench_hubness.py).
CSLS_FIRST_K = 128

#: With CSLS offsets, this many vectors of lowest offset are also searched exhaustively for every
#: query, so the search depth follows the offsets above them, not the single lowest one: one
#: reference far from every store photo no longer deepens every search (benchmarks/bench_hubness.py
#: ``--low-offset``).
CSLS_LOW_SET = 256


@dataclass(frozen=True)
class Neighbour:
    """A neighbouring SKU and its cosine distance (in [0, 2]) to the query.

    Attributes:
        sku: the SKU id.
        distance: cosine distance in [0, 2] of the SKU's vector the ranking chose.
        adjusted: with hubness reduction (:mod:`retailklip.hubness`), the distance plus that
            vector's CSLS offset: the value the SKUs were ranked by (the ``ratio`` score is on
            it); None with plain 1-NN.
    """

    sku: str
    distance: float
    adjusted: float | None = None


@dataclass(frozen=True)
class Match:
    """The result of matching one embedding.

    Attributes:
        nearest: the 1-NN SKU and its cosine distance (with hubness reduction: the SKU of
            smallest adjusted distance, which need not be the closest).
        runner_up: the nearest *other* SKU (likewise), or None when the index holds a single SKU.
        known: the open-set score is ``<= threshold`` (``nearest.distance`` for the default
            score ``"distance"``, :attr:`ratio` for ``"ratio"``, :attr:`outlier_ratio` for
            ``"outlier-ratio"``).
        outlier_distance: cosine distance in [0, 2] to the nearest outlier reference; None when
            the matcher has no outlier index (or an empty one).
    """

    nearest: Neighbour
    runner_up: Neighbour | None
    known: bool
    outlier_distance: float | None = None

    @property
    def ratio(self) -> float:
        """Lowe's distance ratio nearest / runner-up distance in [0, 1]
        (:func:`retailklip.open_set.distance_ratio`; runner-up distance 2 when there is none;
        adjusted distances under hubness reduction)."""
        return score_of(self, "ratio")

    @property
    def outlier_ratio(self) -> float | None:
        """nearest distance / :attr:`outlier_distance` in [0, inf)
        (:func:`retailklip.open_set.outlier_ratio`); None without outlier references."""
        return None if self.outlier_distance is None else score_of(self, OUTLIER_SCORE)


def score_of(match: Match, score: str) -> float:
    """The open-set score (:mod:`retailklip.open_set`) of one match: its nearest distance in
    [0, 2], its distance ratio in [0, 1] (of the adjusted distances when the match was ranked by
    hubness reduction), or its outlier ratio in [0, inf).

    Raises:
        RetailKlipError: unknown score; ``outlier-ratio`` of a match without outlier distance.
    """
    nearest, runner_up = match.nearest, match.runner_up
    if score == "ratio" and nearest.adjusted is not None:
        # ranked by adjusted distances: the ratio of the two that decided it (a ratio of plain
        # distances would exceed 1 wherever hubness reduction changed the nearest SKU)
        d2 = runner_up.adjusted if runner_up is not None else None
        return float(open_set_score(score, nearest.adjusted, d2))
    d2 = runner_up.distance if runner_up is not None else None
    return float(open_set_score(score, nearest.distance, d2, match.outlier_distance))


class SKUMatcher:
    """1-NN search over a :class:`VectorIndex` whose vector ids map to SKUs.

    Args:
        index: the vector index.
        sku_of: vector id -> SKU id, for every id in the index.
        outliers: index of the outlier references' vectors (products not in the catalog; never
            matched, see module docstring), or None.
        offsets: hubness reduction (CSLS, :mod:`retailklip.hubness`): vector id -> the amount
            ``r(g) / 2`` added to its cosine distance *for ranking* (ids without one are skipped,
            like ids without an SKU: e.g. an SKU removed while the offsets were computed); None:
            plain 1-NN.  The nearest SKU and the runner-up are then those of smallest
            adjusted distance, exactly (the search widens until no unseen vector can beat
            them), and the distances reported are their plain cosine distances.
        low_set: with ``offsets``, the vectors of the ``low_set`` lowest offsets are kept in a
            small exact index (their vectors read back with :meth:`VectorIndex.reconstruct`)
            and searched exhaustively with every query, so an unseen vector's offset is at least
            the next one's (:data:`CSLS_LOW_SET`; 0, an index of lossy codes (PQ, SQ) or one that
            cannot give vectors back (IVF without a direct map): the lowest offset bounds them all).
    """

    def __init__(self, index: VectorIndex, sku_of: dict[int, str], outliers: VectorIndex | None = None,
                 offsets: dict[int, float] | None = None, low_set: int = CSLS_LOW_SET) -> None:
        self.index = index
        self.sku_of = sku_of
        self.outliers = outliers
        self.offsets = offsets
        # the smallest offset among vectors not in the low set bounds what an unseen vector's
        # adjusted distance can be; the low set: its exact index (ids: positions in _low_ids),
        # its vector ids and their offsets (float64, as _match_row_adjusted adds them)
        self._min_offset, self._low, self._low_ids, self._low_offsets = 0.0, None, None, None
        if offsets:
            self._min_offset, self._low, self._low_ids, self._low_offsets = self._low_set(offsets, low_set)

    def _low_set(self, offsets: dict[int, float], size: int) -> tuple:
        """``(smallest offset outside the low set, the low set's exact index, vector ids and
        offsets)``; the last three None where there is no low set (the bound: the lowest offset)."""
        ids = np.fromiter(offsets.keys(), np.int64, len(offsets))
        values = np.fromiter(offsets.values(), np.float64, len(offsets))
        none = (float(values.min()), None, None, None)
        if size <= 0 or len(values) <= size or not getattr(self.index, "stores_exact_vectors", False):
            return none  # lossy codes (PQ, SQ) are ranked by the index's own approximate distances only
        part = np.argpartition(values, size)
        low = ids[part[:size]]
        try:
            vectors = self.index.reconstruct(low)
        except (RuntimeError, AttributeError):  # e.g. IVF without a direct map
            return none
        side = VectorIndex(vectors.shape[1])
        side.add(np.arange(size, dtype=np.int64), vectors)
        return float(values[part[size]]), side, low, values[part[:size]]

    def _low_candidates(self, queries: np.ndarray) -> list[list[tuple[float, int]]]:
        """Per query, ``(cosine distance, vector id)`` of the low set's vectors of its two best
        live SKUs by adjusted distance (the only ones of the low set that can be a match's)."""
        dist, pos = self._low.search(queries, self._low.ntotal)
        order = np.argsort(dist.astype(np.float64) + self._low_offsets[pos], axis=1, kind="stable")
        out = []
        for d_row, p_row, o_row in zip(dist, pos, order):
            picked, skus = [], set()
            for j in o_row:
                i = int(self._low_ids[p_row[j]])
                sku = self.sku_of.get(i)
                if sku is None or sku in skus:
                    continue
                picked.append((float(d_row[j]), i))
                skus.add(sku)
                if len(skus) == 2:
                    break
            out.append(picked)
        return out

    @property
    def has_outliers(self) -> bool:
        """Whether an outlier index with at least one vector is attached."""
        return self.outliers is not None and self.outliers.ntotal > 0

    def outlier_distances(self, queries: np.ndarray) -> np.ndarray | None:
        """float32 (M,) cosine distances in [0, 2] from each query (float32 (M, D), unit norm) to
        its nearest outlier vector; None when :attr:`has_outliers` is False."""
        if not self.has_outliers:
            return None
        dist, _ids = self.outliers.search(queries, 1)
        return dist[:, 0]

    def match(self, queries: np.ndarray, threshold: float, k: int = 32, score: str = "distance",
              plain: bool = False) -> list[Match]:
        """Match embeddings against the index.

        Vectors whose id is not in ``sku_of`` are skipped: an index snapshot may still hold
        vectors of SKUs removed since it was built (index types such as HNSW cannot delete).
        With ``offsets`` the ranking is CSLS's (class docstring).

        Args:
            queries: float32 (M, D), unit norm.
            threshold: on ``score``; matches whose score is above it are unknown.
            k: initial neighbours per query (with ``offsets`` at least
                :data:`CSLS_FIRST_K`); doubled until a second SKU appears (with ``offsets``:
                until no unseen vector can outrank the nearest two SKUs) or the whole index was
                searched.
            score: the open-set score the threshold is on, ``"distance"`` (cosine distance in
                [0, 2]), ``"ratio"`` or ``"outlier-ratio"`` (:mod:`retailklip.open_set`).
            plain: rank by plain cosine distance even when the matcher has offsets (e.g. to
                find the SKUs closest to a new reference image).

        Returns:
            M :class:`Match` objects, with :attr:`Match.outlier_distance` set when the matcher
            has outlier vectors (whatever the score).

        Raises:
            ValueError: no live vector in the index, or wrong query shape.
            RetailKlipError: unknown score; ``"outlier-ratio"`` without outlier vectors (one
                line, :func:`retailklip.open_set.no_outliers_error`).
        """
        check_score(score)
        n = self.index.ntotal
        if n == 0 or not self.sku_of:
            raise ValueError("cannot match against an empty index")
        if score == OUTLIER_SCORE and not self.has_outliers:
            raise no_outliers_error()
        queries = self.index.check_vectors(queries)
        d_out = self.outlier_distances(queries)
        out: list[Match | None] = [None] * len(queries)
        todo = np.arange(len(queries))
        adjusted = self.offsets is not None and not plain
        if adjusted:
            k = max(k, CSLS_FIRST_K)  # one search, not a re-search at twice the depth, for most queries
        k = max(2, min(k, n))
        low = self._low_candidates(queries) if adjusted and self._low is not None else None
        while len(todo):
            dist, ids = self.index.search(queries[todo], k)
            again = []
            for row, q in enumerate(todo):
                if low is not None:
                    m = self._match_row_adjusted(dist[row], ids[row], k >= n, low[q])
                else:
                    m = self._match_row(dist[row], ids[row], complete=k >= n, adjusted=adjusted)
                if m is None:
                    again.append(q)
                else:
                    m = Match(m.nearest, m.runner_up, False, None if d_out is None else float(d_out[q]))
                    out[q] = Match(m.nearest, m.runner_up, score_of(m, score) <= threshold, m.outlier_distance)
            todo = np.array(again, dtype=np.int64)
            k = min(2 * k, n)
        return out  # type: ignore[return-value]

    def _match_row(self, dist: Sequence[float], ids: Sequence[int], complete: bool, adjusted: bool) -> Match | None:
        """The nearest SKU and the nearest other SKU among one query's neighbours; None when
        more neighbours are needed to find a runner-up (or any live vector), or, with offsets,
        to be sure no unseen vector outranks them.  ``known`` is filled in by the caller."""
        if adjusted:
            return self._match_row_adjusted(dist, ids, complete)
        first: Neighbour | None = None
        for d, i in zip(dist, ids):
            if i < 0:
                break
            sku = self.sku_of.get(int(i))
            if sku is None:
                continue
            if first is None:
                first = Neighbour(sku, float(d))
            elif sku != first.sku:
                return Match(first, Neighbour(sku, float(d)), False)
        if not complete:
            return None
        if first is None:
            raise ValueError("no live vector in the index")
        return Match(first, None, False)

    def _match_row_adjusted(self, dist: Sequence[float], ids: Sequence[int], complete: bool,
                            low: Sequence[tuple[float, int]] = ()) -> Match | None:
        """:meth:`_match_row` ranked by adjusted distance ``d + offset``.  Neighbours come in
        ascending ``d``, so an unseen vector's adjusted distance is at least the last one's ``d``
        plus the smallest offset outside the low set (whose best candidates, ``low``, were
        found by searching all of it): once the best two SKUs are below that bound they are
        final."""
        best: dict[str, tuple[float, float]] = {}  # sku -> (adjusted, plain) of its best vector
        last = None

        def see(d: float, i: int) -> None:
            sku, offset = self.sku_of.get(i), self.offsets.get(i)
            if sku is not None and offset is not None:
                a = d + offset
                if sku not in best or a < best[sku][0]:
                    best[sku] = (a, d)

        for d, i in low:
            see(d, i)
        for d, i in zip(dist, ids):
            if i < 0:
                complete = True  # the index holds fewer vectors than asked for: all were seen
                break
            last = float(d)
            see(last, int(i))
        ranked = sorted(best.items(), key=lambda item: item[1][0])[:2]
        if not complete:
            bound = last + self._min_offset if last is not None else -np.inf
            if len(ranked) < 2 or ranked[1][1][0] > bound:
                return None
        if not ranked:
            raise ValueError("no live vector in the index")
        (s1, (a1, d1)), second = ranked[0], ranked[1] if len(ranked) > 1 else None
        runner_up = None if second is None else Neighbour(second[0], second[1][1], second[1][0])
        return Match(Neighbour(s1, d1, a1), runner_up, False)


def ranking_distance(neighbour: Neighbour) -> float:
    """The value a neighbour was ranked by: its adjusted distance under hubness reduction
    (:attr:`Neighbour.adjusted`), else its cosine distance in [0, 2]."""
    return neighbour.distance if neighbour.adjusted is None else neighbour.adjusted


#: New vectors compared with the queries at a time in :func:`switched_to`.
SWITCH_CHUNK = 4096


def switches_to(current: Sequence[Match], queries: np.ndarray, vectors: np.ndarray, offsets: np.ndarray | None,
                sku: str) -> np.ndarray:
    """Which queries new vectors of SKU ``sku`` would take from another SKU: their nearest SKU
    is another one now, and would be ``sku`` once the vectors are in the index
    (:func:`switched_to` with every vector ``sku``'s).

    Args:
        current: the queries' M matches now (:meth:`SKUMatcher.match`).
        queries: float32 (M, D) unit rows, the embeddings ``current`` was matched for.
        vectors: float32 (V, D) unit rows, the new vectors (e.g. a reference image's K views).
        offsets: float (V,) the new vectors' CSLS offsets (:meth:`HubnessReference.offsets`)
            when ``current`` was ranked with hubness reduction; None for plain 1-NN.
        sku: the SKU the new vectors belong to.

    Returns:
        bool (M,).

    Raises:
        ValueError: shapes that do not match.
    """
    return switched_to(current, queries, vectors, [sku] * len(vectors), offsets) == sku


def switched_to(current: Sequence[Match], queries: np.ndarray, vectors: np.ndarray, skus: Sequence[str],
                offsets: np.ndarray | None) -> np.ndarray:
    """The SKU each query's nearest SKU would change to once all the new ``vectors`` (of several
    SKUs, new or existing) are in the index together, or None where it stays.

    Exact for the matcher that made ``current``: a query's nearest SKU changes iff a new vector
    ranks before its current nearest, i.e. its distance plus offset is at most the current
    nearest's :func:`ranking_distance` (an exact tie, a copy of another SKU's reference, counts
    as a change: the index returns the newer vector first among equals), and the best-ranked
    new vector belongs to another SKU than the current nearest.  Existing vectors keep their
    offsets (a CSLS offset is measured against store photos, not against other references).

    Args:
        current: the queries' M matches now (:meth:`SKUMatcher.match`).
        queries: float32 (M, D) unit rows, the embeddings ``current`` was matched for.
        vectors: float32 (V, D) unit rows, the new vectors.
        skus: the SKU of each new vector (V items).
        offsets: float (V,) the new vectors' CSLS offsets when ``current`` was ranked with
            hubness reduction; None for plain 1-NN.

    Returns:
        object (M,): an SKU id of ``skus`` or None per query.

    Raises:
        ValueError: shapes that do not match.
    """
    queries, vectors = np.asarray(queries, np.float32), np.asarray(vectors, np.float32)
    if queries.ndim != 2 or vectors.ndim != 2 or queries.shape[1] != vectors.shape[1] or len(queries) != len(current):
        raise ValueError(f"switched_to: {len(current)} matches, queries {queries.shape}, vectors {vectors.shape}")
    if len(skus) != len(vectors):
        raise ValueError(f"switched_to: {len(vectors)} vectors but {len(skus)} SKUs")
    if offsets is not None and np.shape(offsets) != (len(vectors),):
        raise ValueError(f"switched_to: {len(vectors)} vectors but offsets of shape {np.shape(offsets)}")
    out = np.full(len(queries), None, object)
    if not len(vectors) or not len(queries):
        return out
    offsets = None if offsets is None else np.asarray(offsets, np.float32)
    best_new = np.full(len(queries), np.inf, np.float32)
    best = np.zeros(len(queries), np.int64)
    rows = np.arange(len(queries))
    for start in range(0, len(vectors), SWITCH_CHUNK):  # memory bounded by M x SWITCH_CHUNK distances
        new = 1.0 - queries @ vectors[start: start + SWITCH_CHUNK].T  # cosine distances, as the index computes them
        if offsets is not None:
            new += offsets[None, start: start + SWITCH_CHUNK]
        j = new.argmin(axis=1)
        d = new[rows, j]
        better = d < best_new  # the first of equal ones, as argmin over all of them
        best_new[better], best[better] = d[better], j[better] + start
    now = np.array([ranking_distance(m.nearest) for m in current], np.float32)
    owner = np.asarray(list(skus), object)[best]
    changed = (best_new <= now) & np.array([o != m.nearest.sku for o, m in zip(owner, current)], bool)
    out[changed] = owner[changed]
    return out
