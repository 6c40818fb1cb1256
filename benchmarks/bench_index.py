"""Index types: exact Flat vs the approximate types ``choose_index_type`` picks, on catalog-like
synthetic embeddings; every figure is also given as a ratio to Flat measured in the same run.

    flock /tmp/retailklip-bench.lock python3 benchmarks/bench_index.py \\
        [--sizes 100000,1000000] [--dim 768] [--threads 2] [--types auto,HNSW32,auto:0.35,auto:0.06]

Per size N and index type: build time (train + add + recall tuning), memory (the
``estimate_memory`` figure and the measured RSS growth of this process while the index was
built and kept — the input vectors excluded), single-query latency (median over 200 queries
searched one at a time, k=1), batch throughput (all queries in one call, k=1), and recall@1
against exact search on held-out queries (plus the recall ``build_index`` measured on its own
default tuning queries).  Single-query latency runs with one FAISS thread (a 1-query search
gains nothing from OpenMP, and on a shared machine the thread wake-ups cost ~8 ms); batch
throughput and building use ``--threads``.
Goal (issue 5): approximate >= 10x faster than Flat at recall@1 >= 0.99.

Types: ``auto`` = ``choose_index_type(N, dim)`` with the default budget (half of RAM);
``auto:F`` = ``choose_index_type`` under a budget of F x Flat's estimated memory (``auto:0.35``
gives IVF-SQ8, ``auto:0.06`` IVF-PQ at dim 768); any other token is used as a factory string.
Recall@1 is by vector id (the approximate 1-NN is the exact 1-NN, or ties it); "SKU recall" counts
a hit when the approximate 1-NN belongs to the same SKU as the exact 1-NN (what recognition needs).

Data (catalog-like, synthetic; seeded):
* SKU centres live in a low intrinsic dimension: ``z ~ N(0, I_64)`` mapped to ``dim`` by a random
  orthonormal (dim x 64) matrix, plus small isotropic noise (norm 0.15), renormalised;
* each SKU has K views (``--views``, default 8: the reference + augmentations) = centre + noise
  (in-subspace norm 0.25 + isotropic norm 0.2), renormalised — cosine distance ~0.05 to the centre;
* queries (shelf photos) are other noisy draws of random SKUs' centres with a noise norm drawn
  in [0.75, 1.3] (half in-subspace, half isotropic) — cosine distance ~0.2-0.4 to their centre.
"""

from __future__ import annotations

import argparse
import gc
import logging
import math
import os
import sys
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retailklip.index_build import build_index, recall_at_1
from retailklip.index_types import choose_index_type, default_memory_budget, estimate_memory

INTRINSIC = 64


def _unit(x: np.ndarray) -> np.ndarray:
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def _noise(rng, n, basis, in_norm, iso_norm):
    """Noise of expected norm ``in_norm`` inside span(basis) plus ``iso_norm`` isotropic."""
    dim, k = basis.shape
    in_norm = np.broadcast_to(np.asarray(in_norm, np.float32).reshape(-1, 1), (n, 1))
    iso_norm = np.broadcast_to(np.asarray(iso_norm, np.float32).reshape(-1, 1), (n, 1))
    e = (rng.standard_normal((n, k), dtype=np.float32) * (in_norm / math.sqrt(k))) @ basis.T
    e += rng.standard_normal((n, dim), dtype=np.float32) * (iso_norm / math.sqrt(dim))
    return e


def catalog_like(n_vectors: int, dim: int, views: int, n_queries: int, seed: int = 0):
    """(ids, vectors (N, dim), queries (M, dim), query SKU) — see the module docstring."""
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.standard_normal((dim, INTRINSIC)))
    basis = basis.astype(np.float32)
    n_sku = -(-n_vectors // views)
    centres = _unit(rng.standard_normal((n_sku, INTRINSIC), dtype=np.float32) @ basis.T
                    + _noise(rng, n_sku, basis, 0.0, 0.15))
    vectors = np.empty((n_vectors, dim), np.float32)
    sku = np.arange(n_vectors) // views
    for s in range(0, n_vectors, 65536):  # chunked: no second full-size temporary
        e = slice(s, min(s + 65536, n_vectors))
        vectors[e] = _unit(centres[sku[e]] + _noise(rng, e.stop - e.start, basis, 0.25, 0.2))
    q_sku = rng.integers(0, n_sku, n_queries)
    scale = rng.uniform(0.75, 1.3, n_queries).astype(np.float32)
    queries = _unit(centres[q_sku] + _noise(rng, n_queries, basis, scale / math.sqrt(2), scale / math.sqrt(2)))
    return np.arange(n_vectors, dtype=np.int64), vectors, queries, q_sku


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def latency(index, queries: np.ndarray) -> tuple[float, float]:
    """(median single-query ms with one FAISS thread, batch queries/s with --threads), k=1."""
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)  # one query per call: OpenMP only adds wake-up latency
    for q in queries[:10]:  # warm-up
        index.search(q[None], 1)
    times = []
    for q in queries:
        t = time.perf_counter()
        index.search(q[None], 1)
        times.append(time.perf_counter() - t)
    faiss.omp_set_num_threads(threads)
    index.search(queries[:10], 1)
    t = time.perf_counter()
    index.search(queries, 1)
    tb = time.perf_counter() - t
    return 1e3 * float(np.median(times)), len(queries) / tb


def resolve(token: str, n: int, dim: int) -> str:
    if token == "auto":
        return choose_index_type(n, dim)
    if token.startswith("auto:"):
        return choose_index_type(n, dim, memory_budget_bytes=int(float(token[5:]) * estimate_memory("Flat", n, dim)))
    return token


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="100000,1000000")
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--views", type=int, default=8)
    p.add_argument("--queries", type=int, default=200, help="held-out queries for latency and recall")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--types", default="auto,HNSW32,auto:0.35,auto:0.06")
    p.add_argument("--target-recall", type=float, default=0.99)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="  %(message)s")  # build_index's tuning trace
    faiss.omp_set_num_threads(args.threads)
    head = ("N", "type", "params", "build s", "mem est MiB", "RSS +MiB", "1-query ms", "batch q/s",
            "recall@1", "SKU recall", "tune recall", "speed-up 1q", "speed-up batch", "build x", "mem x")
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        ids, vecs, queries, _ = catalog_like(n, args.dim, args.views, args.queries, seed=n)
        types, seen = [], set()
        for tok in ["Flat"] + [t for t in args.types.split(",") if t]:
            f = resolve(tok, n, args.dim)
            if f not in seen:
                seen.add(f)
                types.append((tok, f))
        flat_ref = None
        exact = None
        for tok, f in types:
            gc.collect()
            r0 = rss_bytes()
            t = time.perf_counter()
            index, tune_rec = build_index(ids, vecs, f, target_recall=args.target_recall, seed=0)
            t_build = time.perf_counter() - t
            gc.collect()
            rss = rss_bytes() - r0
            ms, qps = latency(index, queries)
            if f == "Flat":
                exact = index
                rec = 1.0
                exact_sku = index.search(queries, 1)[1][:, 0] // args.views
            else:
                rec = recall_at_1(index, exact, queries)
            sku_rec = float(np.mean(index.search(queries, 1)[1][:, 0] // args.views == exact_sku))
            fig = {"build": t_build, "mem": rss, "ms": ms, "qps": qps}
            if f == "Flat":
                flat_ref = fig
            label = f if tok in ("Flat", f) else f"{f} ({tok})"
            params = ",".join(f"{k}={v}" for k, v in index.search_params.items()) or "-"
            rows.append((f"{n:,}", label, params, f"{t_build:.1f}", f"{estimate_memory(f, n, args.dim) / 2**20:.0f}",
                         f"{rss / 2**20:.0f}", f"{ms:.3f}", f"{qps:.0f}", f"{rec:.3f}", f"{sku_rec:.3f}", f"{tune_rec:.3f}",
                         f"{flat_ref['ms'] / ms:.1f}x", f"{qps / flat_ref['qps']:.1f}x",
                         f"{t_build / flat_ref['build']:.1f}", f"{rss / max(flat_ref['mem'], 1):.2f}"))
            print(" | ".join(rows[-1]), flush=True)
            if f != "Flat":
                del index
        del exact, vecs
        gc.collect()
    w = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
    print()
    print("| " + " | ".join(h.ljust(w[i]) for i, h in enumerate(head)) + " |")
    print("|" + "|".join("-" * (x + 2) for x in w) + "|")
    for r in rows:
        print("| " + " | ".join(str(c).ljust(w[i]) for i, c in enumerate(r)) + " |")
    print(f"\nfaiss {faiss.__version__}, threads {faiss.omp_get_max_threads()}, dim {args.dim}, K={args.views} views/SKU, "
          f"{args.queries} held-out queries, target recall@1 {args.target_recall}, default budget "
          f"{default_memory_budget() / 2**30:.1f} GiB; ratios vs Flat of the same N in this run")


if __name__ == "__main__":
    main()
