#!/usr/bin/env python3
"""What hubness reduction (CSLS, retailklip/hubness.py) costs the recognizer on a 2-core CPU.

    python3 benchmarks/bench_hubness.py [--sizes 1000 10000 100000] [--repeats 5]

Per gallery size N (reference vectors, exact Flat index, D = 960: the main job's embedding):

* load: computing the N offsets ``r(g) / 2`` against P = 440 unlabeled photos (the main job's
  centring photos), what the recognizer did at every load of a catalog version, against reading
  them from the version's directory, where ``catalog rebuild`` now stores them
  (:func:`catalog.index_store.read_offsets`, into the id -> offset map the matcher takes);
* match: :meth:`SKUMatcher.match` of a batch of 32 queries (a checkout tray's segments), plain
  1-NN (the baseline, measured interleaved in the same run) and CSLS; the ratio CSLS / plain of
  the minimum over ``--repeats`` runs, and the mean search depth CSLS needed (the plain matcher
  stops at 32 neighbours when a second SKU is among them);
* memory: the offsets map (Python dict) per vector;
* low set: CSLS without the exhaustively searched low set (``SKUMatcher(low_set=0)``, the
  matcher before it), interleaved; with ``--low-offset DELTA`` one vector's offset is also set
  DELTA below the lowest (a reference far from every store photo), the case the low set is for;
* add check: what ``catalog add``'s hub check costs (``catalog.writes``: the P stored photos
  matched by CSLS, then :func:`retailklip.matching.switches_to` for a new reference's 4 views),
  interleaved with the rest, and its ratio to the plain match of one tray;
* import check: ``catalog import``'s check of ``IMPORT_ROWS`` new SKUs
  (:meth:`Recognizer.switches_to_each`: the photos matched once, then each row's offsets and
  :func:`~retailklip.matching.switches_to`) against the same rows checked one by one as ``add``
  checks them (the photos matched again per row), interleaved; the same counts asserted.

The vectors are synthetic (honest simulation: no trained CLIP weights reach this workplace):
N / 4 SKU prototypes, 4 noisy views each; photos and queries are noisy copies of random
prototypes.  Their offsets spread less than a real catalog's, and the spread sets how deep CSLS
must search, so the offsets are stretched (affinely, keeping their order) to ``--spread``:
0.130, the spread measured on the README main job's catalog (81 packshots, 440 photos; print a
catalog's own with ``--catalog DIR``).  Timing is noisy on shared cores:
say what else was running.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from catalog import index_store  # noqa: E402
from retailklip.hubness import HubnessReference  # noqa: E402
from retailklip.index import VectorIndex  # noqa: E402
from retailklip.matching import CSLS_LOW_SET, SKUMatcher, switches_to  # noqa: E402

DIM, PHOTOS, BATCH, VIEWS, IMPORT_ROWS = 960, 440, 32, 4, 20


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def synthetic(n: int, rng: np.random.Generator) -> tuple[np.ndarray, list[str], np.ndarray, np.ndarray]:
    """(gallery (n, D), SKU of each, photos (P, D), queries (BATCH, D)), unit rows."""
    protos = rng.normal(size=(n // VIEWS, DIM)).astype(np.float32)
    gallery = unit(np.repeat(protos, VIEWS, axis=0) + 0.6 * rng.normal(size=(n, DIM)).astype(np.float32))
    skus = [f"s{i // VIEWS}" for i in range(n)]
    photos = unit(protos[rng.integers(0, len(protos), PHOTOS)] + 1.0 * rng.normal(size=(PHOTOS, DIM)).astype(np.float32))
    queries = unit(protos[rng.integers(0, len(protos), BATCH)] + 1.0 * rng.normal(size=(BATCH, DIM)).astype(np.float32))
    return gallery, skus, photos, queries


class DepthProbe:
    """A :class:`VectorIndex` stand-in that records the deepest search (neighbours per query)."""

    def __init__(self, index: VectorIndex) -> None:
        self.index, self.deepest = index, 0

    @property
    def ntotal(self) -> int:
        return self.index.ntotal

    def check_vectors(self, queries: np.ndarray) -> np.ndarray:
        return self.index.check_vectors(queries)

    def search(self, queries: np.ndarray, k: int):
        self.deepest = max(self.deepest, min(k, self.index.ntotal))
        return self.index.search(queries, k)

    def reconstruct(self, ids: np.ndarray) -> np.ndarray:
        return self.index.reconstruct(ids)

    @property
    def stores_exact_vectors(self) -> bool:
        return self.index.stores_exact_vectors


def depth(index: VectorIndex, sku_of: dict, offsets: dict | None, queries: np.ndarray, low_set: int = CSLS_LOW_SET
          ) -> float:
    """Mean over queries of the deepest search the matcher needed for each (one query at a time)."""
    probe = DepthProbe(index)
    matcher = SKUMatcher(probe, sku_of, offsets=offsets, low_set=low_set)
    out = []
    for q in queries:
        probe.deepest = 0
        matcher.match(q[None], 2.0)
        out.append(probe.deepest)
    return float(np.mean(out))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--spread", type=float, default=0.130, help="stretch the offsets to this max - min (0: as simulated)")
    p.add_argument("--catalog", type=Path, default=None, help="also print a real catalog's offset spread")
    p.add_argument("--low-offset", type=float, default=0.0,
                   help="set one vector's offset this far below the lowest (module docstring)")
    args = p.parse_args(argv)
    rng = np.random.default_rng(0)
    print(f"| N vectors | load: offsets (s) | load: stored offsets (s) | match {BATCH} queries plain (ms) | CSLS (ms) | CSLS / plain | "
          f"search depth plain / CSLS | offsets memory (bytes/vector) | offset spread (max - min) | "
          f"add check, {PHOTOS} photos (ms) | add check / plain tray | CSLS without low set (ms) | "
          f"without / with low set | search depth without low set | import check, {IMPORT_ROWS} rows (ms) | "
          f"per row as add / import check |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for n in args.sizes:
        gallery, skus, photos, queries = synthetic(n, rng)
        index = VectorIndex(DIM)
        ids = np.arange(n, dtype=np.int64)
        index.add(ids, gallery)
        hub = HubnessReference(photos, 30)
        t = time.perf_counter()
        tracemalloc.start()
        o = hub.offsets(gallery)
        offsets = dict(zip(ids.tolist(), o.tolist()))
        mem = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        load = time.perf_counter() - t
        with tempfile.TemporaryDirectory() as tmp:
            index_store.write_version(Path(tmp), 1, VectorIndex(DIM), {}, offsets=(ids, o, hub.fingerprint))
            t = time.perf_counter()
            found = index_store.read_offsets(Path(tmp), index_store.version_relpath(1), hub.fingerprint)
            dict(zip(found[0].tolist(), found[1].tolist()))
            load_stored = time.perf_counter() - t
        simulated = float(np.ptp(o))
        if args.spread:
            offsets = dict(zip(ids.tolist(), (o.min() + (o - o.min()) * (args.spread / simulated)).tolist()))
        if args.low_offset:
            offsets[0] = min(offsets.values()) - args.low_offset
        sku_of = dict(zip(ids.tolist(), skus))
        plain, csls = SKUMatcher(index, sku_of), SKUMatcher(index, sku_of, offsets=offsets)
        no_low = SKUMatcher(index, sku_of, offsets=offsets, low_set=0)
        new = unit(gallery[:VIEWS] + 0.3 * rng.normal(size=(VIEWS, DIM)).astype(np.float32))  # a new reference's views
        new_offsets = hub.offsets(new)

        def add_check():
            return switches_to(csls.match(photos, np.inf), photos, new, new_offsets, "new-sku")

        rows = [unit(gallery[VIEWS * (i + 1): VIEWS * (i + 2)] + 0.3 * rng.normal(size=(VIEWS, DIM)).astype(np.float32))
                for i in range(IMPORT_ROWS)]  # new SKUs' views

        def import_check():  # as Recognizer.switches_to_each: the photos matched once
            current = csls.match(photos, np.inf)
            return [switches_to(current, photos, v, hub.offsets(v), f"new-{i}").sum() for i, v in enumerate(rows)]

        def per_row_check():  # as add checks each: matched again per row
            return [switches_to(csls.match(photos, np.inf), photos, v, hub.offsets(v), f"new-{i}").sum()
                    for i, v in enumerate(rows)]

        assert import_check() == per_row_check()
        times = {"plain": [], "csls": [], "add": [], "no_low": [], "import": [], "per_row": []}
        for _ in range(args.repeats):  # interleaved
            for name, run in (("plain", lambda: plain.match(queries, 2.0)), ("csls", lambda: csls.match(queries, 2.0)),
                              ("add", add_check), ("no_low", lambda: no_low.match(queries, 2.0)),
                              ("import", import_check), ("per_row", per_row_check)):
                t = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - t)
        tp, tc, ta, tn, ti, tr = (min(times[k]) for k in ("plain", "csls", "add", "no_low", "import", "per_row"))
        assert [m.nearest.sku for m in no_low.match(queries, 2.0)] == [m.nearest.sku for m in csls.match(queries, 2.0)]
        spread = f"{max(offsets.values()) - min(offsets.values()):.3f} (simulated {simulated:.3f})"
        print(f"| {n:,} | {load:.2f} | {load_stored:.3f} | {1e3 * tp:.1f} | {1e3 * tc:.1f} | {tc / tp:.2f} | "
              f"{depth(index, sku_of, None, queries):.0f} / {depth(index, sku_of, offsets, queries):.0f} | "
              f"{mem / n:.0f} | {spread} | {1e3 * ta:.0f} | {ta / tp:.1f} | {1e3 * tn:.1f} | {tn / tc:.2f} | "
              f"{depth(index, sku_of, offsets, queries, low_set=0):.0f} | {1e3 * ti:.0f} | {tr / ti:.1f} |")
    if args.catalog:
        from catalog import Catalog

        cat = Catalog.open(args.catalog)
        hub = cat.hubness_reference()
        if hub is None:
            print(f"{args.catalog}: no hubness reference")
        else:
            ids, _ = cat.embedding_table()
            o = hub.offsets(cat.vectors(ids, hub.dim))
            print(f"{args.catalog}: {len(ids)} vectors, offsets {o.min():.3f} .. {o.max():.3f} (spread {np.ptp(o):.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
