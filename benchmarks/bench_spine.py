"""Benchmarks of the recognizer spine; every figure is a ratio against a baseline measured in
the same run, on the same machine.

    python3 benchmarks/bench_spine.py [--shared ../shared] [--vectors 100000] [--dim 768]

Rows:
1. encoder throughput: ``Encoder.embed`` (decode + preprocess + forward + normalise) vs the raw
   timm forward with the same preprocessing, MobileNetV2 on real GroceryStore photos
   (ratio of images/s; goal >= 1/1.05, i.e. time ratio <= 1.05);
2. 1-NN search: ``VectorIndex.search(k=1)`` and ``SKUMatcher.match`` (with runner-up) vs raw
   ``faiss.IndexFlatIP.search(k=1)`` on random unit vectors (time ratio; goal <= 1.10);
3. ``catalog add`` of one SKU with MobileNetV2: in-process ``Catalog.add`` vs embedding its K
   views alone, and the ``catalog add`` command's wall time vs the Python + torch start-up.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
import torch


def best_of(fn, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[2] / "shared")
    p.add_argument("--vectors", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--queries", type=int, default=256)
    p.add_argument("--images", type=int, default=64)
    args = p.parse_args()
    from PIL import Image

    from catalog import Catalog
    from retailklip import create_encoder
    from retailklip.augment import augment_reference
    from retailklip.images import load_image
    from retailklip.index import VectorIndex
    from retailklip.matching import SKUMatcher

    rows = []
    weights = args.shared / "models" / "mobilenetv2_100.imagenet.safetensors"
    data = args.shared / "data" / "grocery-store" / "dataset"
    photos = sorted(data.glob("val/*/*/*.jpg"))[: args.images] or sorted(data.glob("val/*/*/*/*.jpg"))[: args.images]
    torch.set_num_threads(os.cpu_count() or 1)

    # 1. encoder throughput
    enc = create_encoder("timm:mobilenetv2_100", weights=weights, interpolation="bilinear", batch_size=32)
    model, tf = enc.model, enc.preprocess

    @torch.inference_mode()
    def raw():
        for s in range(0, len(photos), 32):
            x = torch.stack([tf(Image.open(f).convert("RGB")) for f in photos[s : s + 32]])
            model(x)

    raw()
    t_raw = best_of(raw)
    t_wrap = best_of(lambda: enc.embed(photos))
    rows.append(("encoder images/s (MobileNetV2, CPU)", f"{len(photos) / t_wrap:.1f}", f"{len(photos) / t_raw:.1f} raw timm forward",
                 f"{t_wrap / t_raw:.3f}", "<= 1.05"))

    # 2. 1-NN search
    rng = np.random.default_rng(0)
    base = rng.standard_normal((args.vectors, args.dim), dtype=np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    q = rng.standard_normal((args.queries, args.dim), dtype=np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    flat = faiss.IndexFlatIP(args.dim)
    flat.add(base)
    idx = VectorIndex(args.dim)
    idx.add(np.arange(args.vectors), base)
    matcher = SKUMatcher(idx, {i: f"sku{i // 16}" for i in range(args.vectors)})
    flat.search(q, 1)
    t_flat = best_of(lambda: flat.search(q, 1), 5)
    t_idx = best_of(lambda: idx.search(q, 1), 5)
    t_match = best_of(lambda: matcher.match(q, 0.5), 5)
    per_q = 1e3 * t_flat / args.queries
    rows.append((f"1-NN search {args.vectors}x{args.dim}, ms/query", f"{1e3 * t_idx / args.queries:.3f}",
                 f"{per_q:.3f} raw IndexFlatIP", f"{t_idx / t_flat:.3f}", "<= 1.10"))
    rows.append(("SKU match with runner-up, ms/query", f"{1e3 * t_match / args.queries:.3f}",
                 f"{per_q:.3f} raw IndexFlatIP", f"{t_match / t_flat:.3f}", "(k=32 search)"))
    del base, flat, idx, matcher

    # 3. catalog add
    ref = (sorted(data.glob("iconic-images-and-descriptions/*/*/*_Iconic.jpg"))
           + sorted(data.glob("iconic-images-and-descriptions/*/*/*/*_Iconic.jpg")))[:6]
    with tempfile.TemporaryDirectory() as tmp:
        cat = Catalog.init(Path(tmp) / "c", encoder="timm:mobilenetv2_100", weights=weights,
                           encoder_options={"interpolation": "bilinear"})
        cat.add(ref[0], sku="warm")
        k = cat.settings()["augmentations"]
        adds = []
        for n in (1, 2, 3):
            t = time.perf_counter()
            cat.add(ref[n], sku=f"sku{n}")
            adds.append(time.perf_counter() - t)
        t_add = float(np.median(adds))
        ims = [load_image(r) for r in ref[1:4]]
        t_views = float(np.median([best_of(lambda: enc.embed(augment_reference(im, k)), 1) for im in ims]))
        rows.append((f"Catalog.add one SKU (K={k}), s, median of 3", f"{t_add:.3f}", f"{t_views:.3f} augment+embed only",
                     f"{t_add / t_views:.3f}", ""))
        env = dict(os.environ, HF_HUB_OFFLINE="1")
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "catalog", "--catalog", str(Path(tmp) / "c"), "add", str(ref[4]), "--sku", "cli"],
                       check=True, env=env, capture_output=True)
        t_cli = time.perf_counter() - t
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import torch, timm, faiss, open_clip"], check=True, env=env)
        t_imp = time.perf_counter() - t
        rows.append(("`catalog add` command wall time, s", f"{t_cli:.2f}", f"{t_imp:.2f} python+imports only",
                     f"{t_cli / t_imp:.2f}", ""))

    w = [max(len(str(r[i])) for r in rows + [("figure", "value", "baseline", "ratio", "goal")]) for i in range(5)]
    head = ("figure", "value", "baseline", "ratio", "goal")
    print(" | ".join(h.ljust(w[i]) for i, h in enumerate(head)))
    print("-+-".join("-" * x for x in w))
    for r in rows:
        print(" | ".join(str(c).ljust(w[i]) for i, c in enumerate(r)))
    print(f"\npeak RSS of this process: {peak_rss_mib():.0f} MiB; torch threads: {torch.get_num_threads()}; faiss threads: {faiss.omp_get_max_threads()}")


if __name__ == "__main__":
    main()
