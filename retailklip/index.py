"""Vector index: 1-NN search over L2-normalised embeddings with FAISS.

Vectors are unit-norm float32, so the inner product is the cosine similarity and the
**cosine distance** reported everywhere is ``1 - cosine similarity``, in [0, 2] (0: same
direction).  The index is built by ``faiss.index_factory`` with ``METRIC_INNER_PRODUCT`` and
wrapped in ``IDMap2`` so each vector carries a 64-bit id (the catalog's embedding row id).
``"Flat"`` (exact search) is the default; any factory string FAISS accepts (e.g. ``"HNSW32"``,
``"IVF1024,PQ96"``) can be given.

Choosing and building an index type (see ``docs/index-types.md``)::

    factory = choose_index_type(n, dim)    # "Flat", "HNSW32", "IVF{nlist},SQ8|SQ4|PQ{m}"
    index, recall = build_index(ids, vectors, factory, target_recall=0.99)
    index.save("index.faiss")                        # + "index.faiss.json" sidecar
    again = VectorIndex.load("index.faiss")          # same factory, same efSearch / nprobe

:func:`build_index` trains (IVF types, on a sample), adds, then raises the search parameter
(HNSW ``efSearch`` / IVF ``nprobe``) until recall@1 against exact search reaches the target,
and returns the measured recall@1.

Removal: Flat and IVF types remove by id.  HNSW types cannot (FAISS has no ``remove_ids`` for
graph indexes): :attr:`VectorIndex.supports_remove` is False and :meth:`VectorIndex.remove`
raises :class:`IndexNotRemovableError`; the caller filters removed ids from results instead
(or rebuilds).
"""

from __future__ import annotations

import json
import logging
import math
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

#: Flat (exact) is chosen while ``n_vectors * dim`` is at most this (2**24 floats = 64 MiB of
#: vectors, e.g. 21,845 vectors of dimension 768).  Measured on the development machine (one
#: thread, dim 768): exact search of one query takes 0.35 ms at 5k vectors, 1.2 ms at 10k,
#: 2.5 ms at 20k, 6 ms at 50k and 21 ms at 100k — it stops being "a few ms" past ~2**24 floats.
FLAT_MAX_FLOATS = 1 << 24
#: HNSW graph degree of the approximate type chosen when it fits the memory budget.
HNSW_M = 32
#: Per-vector bytes of the IDMap2 wrapper: the id array (8 B) + the reverse hash map (~48 B).
IDMAP2_BYTES_PER_VECTOR = 56
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


def _is_hnsw(base: faiss.Index) -> bool:
    return hasattr(base, "hnsw")


def _is_ivf(base: faiss.Index) -> bool:
    return isinstance(base, faiss.IndexIVF)


def describe_index(index: faiss.Index) -> str:
    """A factory string for an existing FAISS index (used when no sidecar names the factory).

    Exact for the types :func:`choose_index_type` picks (``Flat``, ``HNSW{M}``,
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
        recall_at_1: recall@1 against exact search measured by :func:`build_index` (1.0 for
            Flat), or None when not measured.

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
        q = self._check(queries)
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

    def memory_bytes(self) -> int:
        """Estimated memory of the index as it is now (see :func:`estimate_memory`)."""
        return estimate_memory(self.factory, self.ntotal, self.dim)

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
            RuntimeError: FAISS cannot read the file.
        """
        p = Path(path)
        raw = faiss.read_index(str(p))
        if not isinstance(raw, faiss.IndexIDMap2):
            raw = faiss.downcast_index(raw)
        if not isinstance(raw, faiss.IndexIDMap2):
            raise RuntimeError(f"{p}: expected an IndexIDMap2, found {type(raw).__name__}")  # noqa: TRY004 (callers catch RuntimeError for unreadable files)
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


# --------------------------------------------------------------------------- choosing a type

_HNSW_RE = re.compile(r"^HNSW(\d+)(?:,(Flat|SQ8|SQ4|SQfp16|PQ(\d+)(?:x(\d+))?))?$")
_IVF_RE = re.compile(r"^IVF(\d+)(?:_HNSW(\d+))?,(Flat|SQ8|SQ4|SQfp16|PQ(\d+)(?:x(\d+))?)$")


def _check_size(n_vectors: int, dim: int) -> None:
    if isinstance(n_vectors, bool) or not isinstance(n_vectors, (int, np.integer)) or n_vectors < 0:
        raise IndexTypeError(f"number of vectors must be an integer >= 0, got {n_vectors!r}")
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
        raise IndexTypeError(f"dimension must be an integer >= 1, got {dim!r}")


def _storage_bytes(kind: str, dim: int, pq_m: str | None, pq_bits: str | None) -> tuple[float, int]:
    """(bytes per vector, fixed bytes) of a vector storage: Flat, SQ8, SQfp16 or PQ{m}x{b}."""
    if kind == "Flat":
        return 4.0 * dim, 0
    if kind == "SQ8":
        return float(dim), 8 * dim
    if kind == "SQfp16":
        return 2.0 * dim, 0
    if kind == "SQ4":
        return math.ceil(dim / 2), 8 * dim
    m, bits = int(pq_m), int(pq_bits or 8)
    return math.ceil(m * bits / 8), 4 * dim * (1 << bits)


def estimate_memory(factory: str, n: int, dim: int) -> int:
    """Estimated resident bytes of a :class:`VectorIndex` of ``factory`` holding ``n`` vectors.

    Counted: the vectors or codes, the HNSW graph (level 0: 2M int32 links per vector, upper
    levels ~M/(M-1) more, plus 12 B of offsets and levels), IVF inverted-list ids (8 B per
    vector) and centroids, PQ / SQ codebooks, and the IDMap2 id map (~56 B per vector).  Not
    counted: allocator slack (IVF lists grow like std::vector, up to +1x of their codes
    transiently) and the search-time buffers.

    Supported: ``Flat``, ``HNSW{M}[,Flat|,SQ8|,SQ4|,SQfp16|,PQ{m}[x{b}]]``,
    ``IVF{nlist}[_HNSW{M}],{Flat|SQ8|SQ4|SQfp16|PQ{m}[x{b}]}``.

    Raises:
        IndexTypeError (a ValueError): bad sizes or a factory string outside that list.
    """
    _check_size(n, dim)
    f = factory.replace(" ", "") if isinstance(factory, str) else factory
    ids = IDMAP2_BYTES_PER_VECTOR * n
    if f == "Flat":
        return int(4 * dim * n + ids)
    m = _HNSW_RE.match(f or "")
    if m:
        M = int(m.group(1))
        per, fixed = _storage_bytes(m.group(2) or "Flat", dim, m.group(3), m.group(4))
        graph = 4 * (2 * M + M / max(M - 1, 1)) + 12
        return int(n * (per + graph) + fixed + ids)
    m = _IVF_RE.match(f or "")
    if m:
        nlist = int(m.group(1))
        per, fixed = _storage_bytes(m.group(3), dim, m.group(4), m.group(5))
        centroids = 4 * dim * nlist
        if m.group(2):
            M = int(m.group(2))
            centroids += nlist * (4 * (2 * M + 1) + 12)
        return int(n * (per + 8) + fixed + centroids + ids)
    raise IndexTypeError(
        f"cannot estimate the memory of index type {factory!r}; supported: Flat, HNSW{{M}}[,Flat|SQ8|SQ4|SQfp16|PQ{{m}}], "
        "IVF{nlist}[_HNSW{M}],{Flat|SQ8|SQ4|SQfp16|PQ{m}}"
    )


def default_memory_budget() -> int:
    """Half of the machine's physical RAM (``os.sysconf``); 8 GiB where that is unknown."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")) // 2
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def ivf_nlist(n_vectors: int) -> int:
    """IVF list count: ~4·sqrt(n) rounded to a power of two, within [16, 65536] and at most
    n/39 (FAISS wants >= 39 training points per centroid)."""
    target = 4.0 * math.sqrt(max(n_vectors, 1))
    nlist = 1 << max(0, round(math.log2(target)))
    nlist = min(max(nlist, 16), 65536)
    while nlist > 1 and nlist * 39 > n_vectors:
        nlist //= 2
    return max(nlist, 1)


def choose_index_type(n_vectors: int, dim: int, memory_budget_bytes: int | None = None) -> str:
    """Pick a FAISS factory string for ``n_vectors`` unit vectors of dimension ``dim``.

    The autofaiss idea, simplified — the most accurate type whose :func:`estimate_memory`
    fits the budget:

    1. ``"Flat"`` (exact) while ``n_vectors * dim <= FLAT_MAX_FLOATS`` (2**24: ~21.8k vectors
       at dim 768, where one exact query stops taking "a few ms");
    2. ``"HNSW32"``: full vectors + graph, the fastest at recall@1 >= 0.99;
    3. ``"IVF{nlist},SQ8"``: 1 byte per dimension (4x smaller than the vectors), recall@1 still
       ~0.98-0.99 (measured, docs/index-types.md); nlist from :func:`ivf_nlist` (~4·sqrt(n));
    4. ``"IVF{nlist},SQ4"``: half a byte per dimension;
    5. ``"IVF{nlist},PQ{m}"``: ``m`` the largest divisor of ``dim`` not above ``dim // 8``
       whose 8-bit codes fit (bigger codes, better recall; the cap keeps PQ training fast).

    Coarse codes (SQ4, PQ) confuse near-duplicate vectors — a SKU's K views — so their
    recall@1 *by vector id* is low on catalogs (0.76 for SQ4, 0.35-0.39 for PQ96 at dim 768) while
    the nearest *SKU* stays right (1.00 in the benchmark): a last resort for tight budgets.

    Args:
        memory_budget_bytes: memory the index may use; default :func:`default_memory_budget`
            (half of physical RAM).

    Raises:
        IndexTypeError (a ValueError): bad sizes or budget, or no type fits the budget.
    """
    _check_size(n_vectors, dim)
    if memory_budget_bytes is None:
        budget = default_memory_budget()
    elif isinstance(memory_budget_bytes, bool) or not isinstance(memory_budget_bytes, (int, np.integer)) or memory_budget_bytes <= 0:
        raise IndexTypeError(f"memory budget must be a positive number of bytes, got {memory_budget_bytes!r}")
    else:
        budget = int(memory_budget_bytes)
    n, d = int(n_vectors), int(dim)
    if n * d <= FLAT_MAX_FLOATS and estimate_memory("Flat", n, d) <= budget:
        return "Flat"
    nlist = ivf_nlist(n)
    ladder = [f"HNSW{HNSW_M}", f"IVF{nlist},SQ8", f"IVF{nlist},SQ4"]
    ladder += [f"IVF{nlist},PQ{m}" for m in range(max(d // 8, 1), 0, -1) if d % m == 0]
    for f in ladder:
        if estimate_memory(f, n, d) <= budget:
            return f
    raise IndexTypeError(
        f"no index type fits {n} vectors of dimension {d} in {budget} bytes "
        f"(the smallest, {ladder[-1]}, needs ~{estimate_memory(ladder[-1], n, d)} bytes); raise the memory budget"
    )


# --------------------------------------------------------------------------- recall and building


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
        raw = exact._index

        def lookup(ids: np.ndarray) -> np.ndarray:
            return np.stack([raw.reconstruct(int(x)) for x in ids]) if len(ids) else np.zeros((0, queries.shape[1]), np.float32)

        return 1.0 - d[:, 0].astype(np.float64), i[:, 0], lookup
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
    q = index._check(queries)
    if len(q) == 0:
        raise ValueError("recall@1 needs at least one query")
    return _recall_given(index, q, _exact_top1(exact, q))


def _train_sample(factory: str, n: int, base: faiss.Index) -> int:
    """Training-sample size: 40 points per IVF centroid (FAISS warns below 39), at least
    256·39 for 8-bit PQ / SQ codebooks, at most 2**18 and n."""
    want = 1 << 14
    if _is_ivf(base):
        want = max(want, 40 * int(base.nlist))
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
    base = _base(index._index)
    if not index.is_trained:
        ns = _train_sample(factory, n, base)
        min_needed = int(base.nlist) if _is_ivf(base) else 256
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
    q = index._check(queries) if queries is not None else default_queries(v, seed=seed)
    exact = _exact_top1((i, v), q)  # computed once, reused for every parameter value
    name = next(iter(index.search_params))
    top = MAX_EF_SEARCH if name == "efSearch" else int(base.nlist)
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
