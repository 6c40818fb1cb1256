"""SKU-level 1-NN matching with a distance threshold (the open-set cutoff).

The index holds several vectors per SKU (K augmented views of each reference image), so the
nearest *SKU* is the SKU of the nearest vector, and the runner-up is the nearest vector of a
*different* SKU.  A query whose nearest SKU is farther than the threshold is "unknown": this
replaces a softmax classification head and its confidence cutoff (0.78 in the system this
replaces), and needs no retraining when SKUs are added (RetailKLIP §3, 1-NN zero-shot
recognition).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .index import VectorIndex
from .open_set import check_score, open_set_score


@dataclass(frozen=True)
class Neighbour:
    """A neighbouring SKU and its cosine distance (in [0, 2]) to the query."""

    sku: str
    distance: float


@dataclass(frozen=True)
class Match:
    """The result of matching one embedding.

    Attributes:
        nearest: the 1-NN SKU and its cosine distance.
        runner_up: the nearest *other* SKU, or None when the index holds a single SKU.
        known: the open-set score is ``<= threshold`` (``nearest.distance`` for the default
            score ``"distance"``, :attr:`ratio` for ``"ratio"``).
    """

    nearest: Neighbour
    runner_up: Neighbour | None
    known: bool

    @property
    def ratio(self) -> float:
        """Lowe's distance ratio nearest / runner-up distance in [0, 1]
        (:func:`retailklip.open_set.distance_ratio`; runner-up distance 2 when there is none)."""
        return score_of(self, "ratio")


def score_of(match: Match, score: str) -> float:
    """The open-set score (:mod:`retailklip.open_set`) of one match: its nearest distance in
    [0, 2], or its distance ratio in [0, 1]."""
    d2 = match.runner_up.distance if match.runner_up is not None else None
    return float(open_set_score(score, match.nearest.distance, d2))


class SKUMatcher:
    """1-NN search over a :class:`VectorIndex` whose vector ids map to SKUs.

    Args:
        index: the vector index.
        sku_of: vector id -> SKU id, for every id in the index.
    """

    def __init__(self, index: VectorIndex, sku_of: dict[int, str]) -> None:
        self.index = index
        self.sku_of = sku_of

    def match(self, queries: np.ndarray, threshold: float, k: int = 32, score: str = "distance") -> list[Match]:
        """Match embeddings against the index.

        Vectors whose id is not in ``sku_of`` are skipped: an index snapshot may still hold
        vectors of SKUs removed since it was built (index types such as HNSW cannot delete).

        Args:
            queries: float32 (M, D), unit norm.
            threshold: on ``score``; matches whose score is above it are unknown.
            k: initial neighbours per query; doubled until a second SKU appears or the whole
                index was searched.
            score: the open-set score the threshold is on, ``"distance"`` (cosine distance in
                [0, 2]) or ``"ratio"`` (:mod:`retailklip.open_set`).

        Returns:
            M :class:`Match` objects.

        Raises:
            ValueError: no live vector in the index, or wrong query shape.
            RetailKlipError: unknown score.
        """
        check_score(score)
        n = self.index.ntotal
        if n == 0 or not self.sku_of:
            raise ValueError("cannot match against an empty index")
        out: list[Match | None] = [None] * len(queries)
        todo = np.arange(len(queries))
        k = max(2, min(k, n))
        while len(todo):
            dist, ids = self.index.search(queries[todo], k)
            again = []
            for row, q in enumerate(todo):
                m = self._match_row(dist[row], ids[row], complete=k >= n)
                if m is None:
                    again.append(q)
                else:
                    out[q] = Match(m.nearest, m.runner_up, score_of(m, score) <= threshold)
            todo = np.array(again, dtype=np.int64)
            k = min(2 * k, n)
        return out  # type: ignore[return-value]

    def _match_row(self, dist: Sequence[float], ids: Sequence[int], complete: bool) -> Match | None:
        """The nearest SKU and the nearest other SKU among one query's neighbours; None when
        more neighbours are needed to find a runner-up (or any live vector).  ``known`` is filled
        in by the caller."""
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
