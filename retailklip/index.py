"""Vector index: 1-NN search over L2-normalised embeddings with FAISS.

Vectors are unit-norm float32, so the inner product is the cosine similarity and the
**cosine distance** reported everywhere is ``1 - cosine similarity``, in [0, 2] (0: same
direction).  The index is built by ``faiss.index_factory`` with ``METRIC_INNER_PRODUCT`` and
wrapped in ``IDMap2`` so each vector carries a 64-bit id (the catalog's embedding row id) and can
be removed by id.  ``"Flat"`` (exact search) is the default; any factory string FAISS accepts
(e.g. ``"HNSW32"``) can be given.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import faiss
import numpy as np

DEFAULT_FACTORY = "Flat"


class VectorIndex:
    """A FAISS inner-product index of (id, unit vector) pairs.

    Args:
        dim: vector dimension D.
        factory: a FAISS ``index_factory`` description of the inner index (default ``"Flat"``).

    Thread safety: searches may run concurrently with each other; :meth:`add` and :meth:`remove`
    take an internal lock and must not overlap with searches (callers such as the recognizer
    serialise them; FAISS indexes are not safe for concurrent mutation).
    """

    def __init__(self, dim: int, factory: str = DEFAULT_FACTORY) -> None:
        if dim < 1:
            raise ValueError(f"dimension must be >= 1, got {dim}")
        self.dim = int(dim)
        self.factory = factory
        self._index = faiss.IndexIDMap2(faiss.index_factory(self.dim, factory, faiss.METRIC_INNER_PRODUCT))
        self._lock = threading.Lock()

    @property
    def ntotal(self) -> int:
        """Number of vectors in the index."""
        return int(self._index.ntotal)

    def __len__(self) -> int:
        return self.ntotal

    def ids(self) -> np.ndarray:
        """All ids, int64 array of shape (ntotal,)."""
        return faiss.vector_to_array(self._index.id_map).astype(np.int64, copy=False)

    def _check(self, vectors: np.ndarray) -> np.ndarray:
        v = np.ascontiguousarray(vectors, dtype=np.float32)
        if v.ndim != 2 or v.shape[1] != self.dim:
            raise ValueError(f"vectors must have shape (N, {self.dim}), got {v.shape}")
        return v

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Add vectors (N, D) float32 (unit norm) with int64 ids (N,).

        Raises:
            ValueError: wrong shapes or an untrained index (IVF types need :meth:`train` first).
        """
        v = self._check(vectors)
        i = np.ascontiguousarray(ids, dtype=np.int64)
        if i.shape != (v.shape[0],):
            raise ValueError(f"ids must have shape ({v.shape[0]},), got {i.shape}")
        if not self._index.is_trained:
            raise ValueError(f"index {self.factory} must be trained before vectors are added")
        with self._lock:
            self._index.add_with_ids(v, i)

    def train(self, vectors: np.ndarray) -> None:
        """Train an approximate index (IVF, PQ) on sample vectors (N, D); a no-op for Flat/HNSW."""
        if not self._index.is_trained:
            self._index.train(self._check(vectors))

    def remove(self, ids: np.ndarray) -> int:
        """Remove vectors by id; returns how many were removed."""
        i = np.ascontiguousarray(ids, dtype=np.int64)
        if i.size == 0:
            return 0
        with self._lock:
            return int(self._index.remove_ids(faiss.IDSelectorBatch(i)))

    def search(self, queries: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """k-NN search.

        Args:
            queries: float32 (M, D), unit norm.
            k: neighbours per query (capped at ``ntotal``).

        Returns:
            ``(distances, ids)``: float32 (M, k) cosine distances in [0, 2], ascending, and
            int64 (M, k) ids.  With an empty index both have k = 0 columns.
        """
        q = self._check(queries)
        k = min(int(k), self.ntotal)
        if k <= 0:
            return np.zeros((q.shape[0], 0), np.float32), np.zeros((q.shape[0], 0), np.int64)
        sims, ids = self._index.search(q, k)
        return np.clip(1.0 - sims, 0.0, 2.0).astype(np.float32, copy=False), ids

    def save(self, path: str | os.PathLike) -> None:
        """Write the index to ``path`` atomically (temporary file + rename)."""
        p = Path(path)
        tmp = p.with_name(p.name + f".tmp{os.getpid()}")
        faiss.write_index(self._index, str(tmp))
        os.replace(tmp, p)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "VectorIndex":
        """Read an index written by :meth:`save`."""
        raw = faiss.read_index(str(path))
        if not isinstance(raw, faiss.IndexIDMap2):
            raw = faiss.downcast_index(raw)
        self = cls.__new__(cls)
        self.dim = raw.d
        self.factory = "loaded"
        self._index = raw
        self._lock = threading.Lock()
        return self
