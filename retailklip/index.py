"""Vector index: 1-NN search over L2-normalised embeddings with FAISS.

Vectors are unit-norm float32, so the inner product is the cosine similarity and the
**cosine distance** reported everywhere is ``1 - cosine similarity``, in [0, 2] (0: same
direction).  The index is built by ``faiss.index_factory`` with ``METRIC_INNER_PRODUCT`` and
wrapped in ``IDMap2`` so each vector carries a 64-bit id (the catalog's embedding row id).
``"Flat"`` (exact search) is the default; any factory string FAISS accepts (e.g. ``"HNSW32"``,
``"IVF1024,PQ96"``) can be given.

This module is the wrapper and its file format::

    index = VectorIndex(dim, "HNSW32"); index.add(ids, vectors)
    index.save("index.faiss")                        # + "index.faiss.json" sidecar
    again = VectorIndex.load("index.faiss")          # same factory, same efSearch / nprobe

Choosing a type by size and memory is :mod:`retailklip.index_types`; building one and tuning
its search parameter to a recall target is :mod:`retailklip.index_build` (docs/index-types.md).

Removal: Flat and IVF types remove by id.  HNSW types cannot (FAISS has no ``remove_ids`` for
graph indexes): :attr:`VectorIndex.supports_remove` is False and :meth:`VectorIndex.remove`
raises :class:`IndexNotRemovableError`; the caller filters removed ids from results instead
(or rebuilds).
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from .errors import RetailKlipError

logger = logging.getLogger(__name__)

DEFAULT_FACTORY = "Flat"


class IndexTypeError(RetailKlipError, ValueError):
    """A FAISS index type (factory string), size or memory budget is invalid or cannot be used."""


class IndexNotRemovableError(RetailKlipError, ValueError):
    """Vectors were to be removed from an index type that cannot remove them (HNSW graphs)."""


def _make_inner(dim: int, factory: str) -> faiss.Index:
    if not isinstance(factory, str) or not factory.strip():
        raise IndexTypeError(f"index type must be a non-empty FAISS factory string, got {factory!r}")
    if "IDMap" in factory:
        raise IndexTypeError(f"index type {factory!r}: leave out IDMap, every index is wrapped in IDMap2")
    try:
        index = faiss.index_factory(int(dim), factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else "unknown error"
        msg = re.sub(r"^Error in .*? at .*?:\d+: ", "", msg)
        raise IndexTypeError(
            f"invalid index type {factory!r} for dimension {dim} (a FAISS index_factory string such as "
            f"'Flat', 'HNSW32' or 'IVF1024,PQ64' is expected): {msg}"
        ) from None
    base = _base(index)
    if not _searches_by_inner_product(index):
        raise IndexTypeError(
            f"index type {factory!r} cannot search by inner product in FAISS (it would rank by L2 distance); "
            f"use e.g. 'HNSW32', 'HNSW32,SQ8' or 'IVF1024,PQ64'"
        )
    if getattr(base, "do_polysemous_training", False):
        # index_factory turns on polysemous training for PQ types: a code reordering for
        # Hamming-distance filtering that this package never uses, and it makes training ~30x
        # slower (150 s instead of 5 s for PQ96 on 20k x 768).
        base.do_polysemous_training = False
    return index


def _base(index: faiss.Index) -> faiss.Index:
    """The innermost index that holds the search parameter (below IDMap / pre-transforms / refine)."""
    idx = faiss.downcast_index(index)
    while True:
        if isinstance(idx, (faiss.IndexIDMap, faiss.IndexIDMap2, faiss.IndexPreTransform)):
            idx = faiss.downcast_index(idx.index)
        elif isinstance(idx, faiss.IndexRefine):
            idx = faiss.downcast_index(idx.base_index)
        else:
            return idx


def _searches_by_inner_product(index: faiss.Index) -> bool:
    """Whether the index ranks by inner product, i.e. its distances are cosine distances: FAISS
    builds some types with L2 whatever metric is asked for (HNSW over PQ codes)."""
    return _base(index).metric_type == faiss.METRIC_INNER_PRODUCT


def _is_hnsw(base: faiss.Index) -> bool:
    return hasattr(base, "hnsw")


def _is_ivf(base: faiss.Index) -> bool:
    return isinstance(base, faiss.IndexIVF)


def describe_index(index: faiss.Index) -> str:
    """A factory string for an existing FAISS index (used when no sidecar names the factory).

    Exact for the types :func:`retailklip.index_types.choose_index_type` picks (``Flat``, ``HNSW{M}``,
    ``IVF{nlist},SQ8|SQ4|PQ{m}``) and for IVF Flat / SQfp16; other types get their FAISS class name.
    """
    base = _base(index)
    if isinstance(base, faiss.IndexFlat):
        return "Flat"
    if isinstance(base, faiss.IndexHNSWFlat):
        return f"HNSW{base.hnsw.nb_neighbors(1)}"
    if isinstance(base, faiss.IndexIVFPQ):
        nbits = "" if base.pq.nbits == 8 else f"x{base.pq.nbits}"
        return f"IVF{base.nlist},PQ{base.pq.M}{nbits}"
    if isinstance(base, faiss.IndexIVFFlat):
        return f"IVF{base.nlist},Flat"
    if isinstance(base, faiss.IndexIVFScalarQuantizer):
        names = {faiss.ScalarQuantizer.QT_8bit: "SQ8", faiss.ScalarQuantizer.QT_4bit: "SQ4", faiss.ScalarQuantizer.QT_fp16: "SQfp16"}
        if base.sq.qtype in names:
            return f"IVF{base.nlist},{names[base.sq.qtype]}"
    return type(base).__name__


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


class VectorIndex:
    """A FAISS inner-product index of (id, unit vector) pairs.

    Args:
        dim: vector dimension D.
        factory: a FAISS ``index_factory`` description of the inner index (default ``"Flat"``).

    Attributes:
        factory: the factory string (kept across :meth:`save` / :meth:`load`).
        recall_at_1: recall@1 against exact search measured by
            :func:`retailklip.index_build.build_index` (1.0 for Flat), or None when not measured.

    Raises:
        IndexTypeError (a ValueError): ``dim < 1`` or a factory string FAISS cannot parse.

    Thread safety: searches may run concurrently with each other; :meth:`add`, :meth:`remove`
    and :meth:`set_search_params` take an internal lock and must not overlap with searches
    (callers such as the recognizer serialise them; FAISS indexes are not safe for concurrent
    mutation).
    """

    def __init__(self, dim: int, factory: str = DEFAULT_FACTORY) -> None:
        if int(dim) < 1:
            raise IndexTypeError(f"dimension must be >= 1, got {dim}")
        self.dim = int(dim)
        self.factory = factory
        self._index = faiss.IndexIDMap2(_make_inner(self.dim, factory))
        self._lock = threading.Lock()
        self.recall_at_1: float | None = 1.0 if factory == "Flat" else None

    @property
    def faiss_index(self) -> faiss.Index:
        """The wrapped FAISS index (``IndexIDMap2`` around the ``index_factory`` index), e.g. for
        ``faiss.serialize_index``; changing it directly bypasses this wrapper's checks."""
        return self._index

    @property
    def ntotal(self) -> int:
        """Number of vectors in the index."""
        return int(self._index.ntotal)

    def __len__(self) -> int:
        return self.ntotal

    def __repr__(self) -> str:
        return f"VectorIndex(dim={self.dim}, factory={self.factory!r}, ntotal={self.ntotal}, search_params={self.search_params})"

    @property
    def is_trained(self) -> bool:
        """False for IVF / PQ types until :meth:`train` ran."""
        return bool(self._index.is_trained)

    @property
    def supports_remove(self) -> bool:
        """Whether :meth:`remove` works: True for Flat and IVF types, False for HNSW graphs."""
        return not _is_hnsw(_base(self._index))

    @property
    def stores_exact_vectors(self) -> bool:
        """Whether the index keeps the float32 vectors themselves (Flat, HNSW-Flat, IVF-Flat),
        as opposed to lossy codes (SQ, PQ).  :meth:`reconstruct` returns exact vectors only
        when this is True (IVF types also need a direct map, which is not kept)."""
        return isinstance(_base(self._index), (faiss.IndexFlat, faiss.IndexHNSWFlat, faiss.IndexIVFFlat))

    @property
    def search_params(self) -> dict[str, int]:
        """The tunable search parameter: ``{"efSearch": n}`` (HNSW), ``{"nprobe": n}`` (IVF) or ``{}``."""
        base = _base(self._index)
        if _is_hnsw(base):
            return {"efSearch": int(base.hnsw.efSearch)}
        if _is_ivf(base):
            return {"nprobe": int(base.nprobe)}
        return {}

    @property
    def nlist(self) -> int | None:
        """The IVF inverted-list count (the ``nprobe`` ceiling), or None for non-IVF types."""
        base = _base(self._index)
        return int(base.nlist) if _is_ivf(base) else None

    def set_search_params(self, **params: int) -> None:
        """Set ``efSearch=`` (HNSW) or ``nprobe=`` (IVF; capped at nlist).

        Raises:
            ValueError: a parameter this index type does not have, or a value < 1.
        """
        base = _base(self._index)
        for name, value in params.items():
            v = int(value)
            if v < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
            if name == "efSearch" and _is_hnsw(base):
                with self._lock:
                    base.hnsw.efSearch = v
            elif name == "nprobe" and _is_ivf(base):
                with self._lock:
                    base.nprobe = min(v, int(base.nlist))
            else:
                raise ValueError(f"index type {self.factory!r} has no search parameter {name!r} (has: {sorted(self.search_params) or 'none'})")

    def ids(self) -> np.ndarray:
        """All ids, int64 array of shape (ntotal,)."""
        return faiss.vector_to_array(self._index.id_map).astype(np.int64, copy=False)

    def check_vectors(self, vectors: np.ndarray) -> np.ndarray:
        """``vectors`` as a C-contiguous float32 (N, D) array (a copy only when needed).

        Raises:
            ValueError: not two-dimensional, or not ``D = self.dim`` columns.
        """
        v = np.ascontiguousarray(vectors, dtype=np.float32)
        if v.ndim != 2 or v.shape[1] != self.dim:
            raise ValueError(f"vectors must have shape (N, {self.dim}), got {v.shape}")
        return v

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Add vectors (N, D) float32 (unit norm) with int64 ids (N,).

        Raises:
            ValueError: wrong shapes or an untrained index (IVF types need :meth:`train` first).
        """
        v = self.check_vectors(vectors)
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
            self._index.train(self.check_vectors(vectors))

    def remove(self, ids: np.ndarray) -> int:
        """Remove vectors by id; returns how many were removed (ids not present are ignored).

        Raises:
            IndexNotRemovableError (a ValueError): non-empty ``ids`` on a type that cannot
                remove (HNSW; see :attr:`supports_remove`).  An empty ``ids`` always returns 0.
        """
        i = np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)
        if i.size == 0:
            return 0
        if not self.supports_remove:
            raise IndexNotRemovableError(
                f"index type {self.factory!r} cannot remove vectors (FAISS HNSW graphs have no remove_ids); "
                "filter removed ids from search results or rebuild the index"
            )
        with self._lock:
            return int(self._index.remove_ids(faiss.IDSelectorBatch(i)))

    def search(self, queries: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """k-NN search.

        Args:
            queries: float32 (M, D), unit norm.
            k: neighbours per query (capped at ``ntotal``).

        Returns:
            ``(distances, ids)``: float32 (M, k) cosine distances in [0, 2], ascending, and
            int64 (M, k) ids.  With an empty index both have k = 0 columns.  Approximate types
            may return fewer than k hits (IVF: the probed lists hold fewer vectors); missing
            hits have id -1 and distance 2.0.  PQ types report approximate distances.
        """
        q = self.check_vectors(queries)
        k = min(int(k), self.ntotal)
        if k <= 0:
            return np.zeros((q.shape[0], 0), np.float32), np.zeros((q.shape[0], 0), np.int64)
        sims, ids = self._index.search(q, k)
        return np.clip(1.0 - sims, 0.0, 2.0).astype(np.float32, copy=False), ids

    def reconstruct(self, ids: np.ndarray) -> np.ndarray:
        """The stored vectors of ``ids`` as float32 (N, D) (exact for Flat and HNSW-Flat
        storage, decoded codes for PQ).

        Raises:
            RuntimeError: an id is not in the index, or the type cannot reconstruct.
        """
        i = np.asarray(ids, dtype=np.int64).reshape(-1)
        if i.size == 0:
            return np.zeros((0, self.dim), np.float32)
        return np.stack([self._index.reconstruct(int(x)) for x in i]).astype(np.float32, copy=False)

    def save(self, path: str | os.PathLike) -> None:
        """Write the index to ``path`` atomically (temporary file + rename), and a sidecar
        ``<path>.json`` with the factory string, search parameters and measured recall@1.

        The search parameter (efSearch / nprobe) is also stored in the FAISS file itself.
        """
        p = Path(path)
        meta = {
            "format": 1,
            "factory": self.factory,
            "dim": self.dim,
            "ntotal": self.ntotal,
            "search_params": self.search_params,
            "recall_at_1": self.recall_at_1,
        }
        tmp = p.with_name(p.name + f".tmp{os.getpid()}")
        side = _sidecar(p)
        stmp = side.with_name(side.name + f".tmp{os.getpid()}")
        faiss.write_index(self._index, str(tmp))
        stmp.write_text(json.dumps(meta, indent=1, sort_keys=True))
        os.replace(stmp, side)
        os.replace(tmp, p)

    @classmethod
    def load(cls, path: str | os.PathLike, factory: str | None = None) -> VectorIndex:
        """Read an index written by :meth:`save` (or any ``faiss.write_index`` of an IDMap2).

        Args:
            factory: the factory string; default: the sidecar's, else derived from the index
                structure (:func:`describe_index`).

        Raises:
            RuntimeError: FAISS cannot read the file, or the index does not search by inner
                product (e.g. ``HNSW32,PQ8``, which FAISS builds with L2).
        """
        p = Path(path)
        raw = faiss.read_index(str(p))
        if not isinstance(raw, faiss.IndexIDMap2):
            raw = faiss.downcast_index(raw)
        if not isinstance(raw, faiss.IndexIDMap2):
            raise RuntimeError(f"{p}: expected an IndexIDMap2, found {type(raw).__name__}")  # noqa: TRY004 (callers catch RuntimeError for unreadable files)
        if not _searches_by_inner_product(raw):
            # e.g. HNSW over PQ codes, built before such types were refused: callers treat it
            # like an unreadable file (rebuild it)
            raise RuntimeError(f"{p}: this index type searches by L2 distance, not by inner product; rebuild it")
        meta: dict[str, Any] = {}
        side = _sidecar(p)
        if side.is_file():
            try:
                meta = json.loads(side.read_text())
                if meta.get("dim") != raw.d:
                    logger.warning("%s does not describe %s (dim %s != %s); ignored", side, p, meta.get("dim"), raw.d)
                    meta = {}
            except (OSError, ValueError) as e:
                logger.warning("unreadable index sidecar %s (%s); factory derived from the index", side, e)
                meta = {}
        self = cls.__new__(cls)
        self.dim = int(raw.d)
        self.factory = factory or meta.get("factory") or describe_index(raw)
        self._index = raw
        self._lock = threading.Lock()
        rec = meta.get("recall_at_1")
        self.recall_at_1 = float(rec) if rec is not None else (1.0 if self.factory == "Flat" else None)
        return self
