"""Choosing a FAISS index type by vector count and memory (see ``docs/index-types.md``).

::

    factory = choose_index_type(n, dim)    # "Flat", "HNSW32", "IVF{nlist},SQ8|SQ4|PQ{m}"
    estimate_memory(factory, n, dim)       # resident bytes of a VectorIndex of that type

The most accurate type whose :func:`estimate_memory` fits a memory budget (default: half of
physical RAM, :func:`default_memory_budget`) is chosen; IVF types get :func:`ivf_nlist` lists.
The factory strings are those :class:`retailklip.index.VectorIndex` accepts.
"""

from __future__ import annotations

import math
import os
import re

import numpy as np

from .index import IndexTypeError

#: Flat (exact) is chosen while ``n_vectors * dim`` is at most this (2**24 floats = 64 MiB of
#: vectors, e.g. 21,845 vectors of dimension 768).  Measured on the development machine (one
#: thread, dim 768): exact search of one query takes 0.35 ms at 5k vectors, 1.2 ms at 10k,
#: 2.5 ms at 20k, 6 ms at 50k and 21 ms at 100k — it stops being "a few ms" past ~2**24 floats.
FLAT_MAX_FLOATS = 1 << 24
#: HNSW graph degree of the approximate type chosen when it fits the memory budget.
HNSW_M = 32
#: Per-vector bytes of the IDMap2 wrapper: the id array (8 B) + the reverse hash map (~48 B).
IDMAP2_BYTES_PER_VECTOR = 56

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
    ``IVF{nlist}[_HNSW{M}],{Flat|SQ8|SQ4|SQfp16|PQ{m}[x{b}]}`` (``HNSW{M},PQ{m}`` is estimated, but
    :class:`~retailklip.index.VectorIndex` refuses it: FAISS searches it by L2 only).

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
