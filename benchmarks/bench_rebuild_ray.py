"""Benchmark of the embedding step of ``catalog rebuild``: in-process vs Ray Data; every figure
is a ratio against the in-process baseline measured in the same run, on the same machine.

    python3 benchmarks/bench_rebuild_ray.py [--shared ../shared] [--images 81] [--augmentations 1] [--batch-size 16]

Rows (MobileNetV2, real GroceryStore iconic packshots, K views each):
1. ``embed_local`` (this process, torch on all cores): the baseline, ratio 1.00;
2. Ray cluster start-up (``ray.init`` of a local cluster with every core), reported apart;
3. ``embed_ray`` with 1 actor (1 torch thread), 1 actor (all cores' threads) and 2 actors
   (1 thread each), on that local cluster.  Each Ray figure is end to end, as a rebuild pays it:
   actor start (Python + torch + timm import, encoder build) included; "first result" says
   how much of it came before the first batch arrived.
4. ``--ray local`` as a rebuild of a catalog with outlier references runs it: two ``embed_ray``
   calls (the first ``--split`` packshots as reference images, the rest as outlier references),
   each connecting on its own (a cluster started and stopped per call, as before 2026-12-07) or
   sharing one :class:`catalog.embedding.RayConnection` (one cluster, as ``catalog rebuild``
   now does); ``--repeats`` interleaved runs of each, minimum wall time, its own ratio.

Throughput is references/s (one reference = K views).  The last column checks that the Ray
vectors are those of the baseline (max |difference|; 0 = bitwise equal).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[2] / "shared")
    p.add_argument("--images", type=int, default=81, help="iconic images (references), at most 81")
    p.add_argument("--augmentations", type=int, default=1, help="K views per reference")
    p.add_argument("--batch-size", type=int, default=16, help="references per Ray batch")
    p.add_argument("--split", type=int, default=46, help="row 4: packshots used as reference images, the rest outliers")
    p.add_argument("--repeats", type=int, default=2, help="row 4: interleaved runs of each way")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    repo = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(repo))  # the Ray workers inherit the driver's sys.path on this machine
    import ray

    from catalog.embedding import EmbedJob, RayConnection, embed_local, embed_ray
    from retailklip import create_encoder
    from retailklip.datasets import read_grocery_store

    data = args.shared / "data" / "grocery-store" / "dataset"
    weights = args.shared / "models" / "mobilenetv2_100.imagenet.safetensors"
    paths = [c.iconic for c in read_grocery_store(data).classes][: args.images]
    jobs = [EmbedJob(i + 1, str(path)) for i, path in enumerate(paths)]
    n, k, cores = len(jobs), args.augmentations, os.cpu_count() or 1
    kw = dict(spec="timm:mobilenetv2_100", weights=str(weights), interpolation="bilinear")
    torch.set_num_threads(cores)

    # 1. baseline: in-process
    enc = create_encoder(**kw)
    list(embed_local(jobs[:2], enc, k, 0))  # warm-up
    t = time.perf_counter()
    base = dict(embed_local(jobs, enc, k, 0))
    t_base = time.perf_counter() - t
    rows = [("embed_local (in-process)", f"{cores} torch threads", f"{t_base:.1f}", "-", f"{n / t_base:.2f}", "1.00",
             "baseline")]

    # 2. Ray start-up
    t = time.perf_counter()
    ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False)
    t_init = time.perf_counter() - t
    rows.append(("Ray local cluster start-up (ray.init)", f"{cores} CPUs", f"{t_init:.1f}", "-", "-", "-",
                 "not in the figures below"))

    # 3. Ray runs
    try:
        for workers, threads in ((1, 1), (1, cores), (min(2, cores), 1)):
            t = time.perf_counter()
            first, got = None, {}
            for rid, vecs in embed_ray(jobs, kw, k, 0, num_workers=workers, threads_per_worker=threads,
                                       batch_size=args.batch_size, identity=enc.identity):
                first = first or time.perf_counter() - t
                got[rid] = vecs
            wall = time.perf_counter() - t
            assert sorted(got) == sorted(base)
            diff = max(float(np.abs(got[r] - base[r]).max()) for r in base)
            plural = ("s" if workers > 1 else "", "s" if threads > 1 else "")
            rows.append((f"embed_ray, {workers} actor{plural[0]}", f"{threads} torch thread{plural[1]} each",
                         f"{wall:.1f}", f"{first:.1f}", f"{n / wall:.2f}", f"{t_base / wall:.2f}",
                         f"max |diff| {diff:.1e}"))
    finally:
        ray.shutdown()

    # 4. a rebuild's two embedding calls (reference images, then outlier references) with --ray local
    parts = (jobs[: args.split], [EmbedJob(j.reference_id, j.path, "outlier reference") for j in jobs[args.split:]])

    def two_calls(shared: bool) -> float:
        t = time.perf_counter()
        with RayConnection("local") if shared else contextlib.nullcontext() as conn:
            got = {rid: v for part in parts for rid, v in embed_ray(part, kw, k, 0, address=conn or "local",
                                                                     num_workers=1, batch_size=args.batch_size)}
        wall = time.perf_counter() - t
        assert not ray.is_initialized() and max(float(np.abs(got[r] - base[r]).max()) for r in base) <= 1e-6
        return wall

    walls: dict[bool, list[float]] = {True: [], False: []}
    for rep in range(args.repeats):
        for shared in ((False, True) if rep % 2 == 0 else (True, False)):
            walls[shared].append(two_calls(shared))
    before, after = min(walls[False]), min(walls[True])
    two = [("per-call connections (before)", f"{len(parts[0])} + {len(parts[1])} refs, 1 actor", f"{before:.1f}",
            " / ".join(f"{w:.1f}" for w in walls[False]), "1.00", "a cluster started per call"),
           ("one RayConnection (catalog rebuild)", f"{len(parts[0])} + {len(parts[1])} refs, 1 actor", f"{after:.1f}",
            " / ".join(f"{w:.1f}" for w in walls[True]), f"{before / after:.2f}", "one cluster for both calls")]

    head = ("figure", "setting", "wall s", "first result s", "refs/s", "ratio", "note")
    w = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
    print(f"{n} GroceryStore iconic references x K={k} views, MobileNetV2 (CPU), Ray batch {args.batch_size} "
          f"references, {cores} cores; ratio = baseline wall time / wall time (higher is faster)\n")
    print(" | ".join(h.ljust(w[i]) for i, h in enumerate(head)))
    print("-+-".join("-" * x for x in w))
    for r in rows:
        print(" | ".join(str(c).ljust(w[i]) for i, c in enumerate(r)))
    head2 = ("--ray local, references then outliers", "setting", "min wall s", "each run s", "ratio", "note")
    w = [max(len(str(r[i])) for r in two + [head2]) for i in range(len(head2))]
    print(f"\n{args.repeats} interleaved runs each; ratio = per-call wall / wall (min over runs)\n")
    print(" | ".join(h.ljust(w[i]) for i, h in enumerate(head2)))
    print("-+-".join("-" * x for x in w))
    for r in two:
        print(" | ".join(str(c).ljust(w[i]) for i, c in enumerate(r)))
    print(f"\npeak RSS of the driver: {peak_rss_mib():.0f} MiB; ray {ray.__version__}; torch {torch.__version__}; "
          f"load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
