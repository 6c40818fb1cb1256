#!/usr/bin/env python3
"""The loop's gain against every raw-encoder baseline, on the loop's own held-out photos.

    python3 benchmarks/bench_loop_baselines.py --loop OUT   # OUT of examples/retailklip_loop.py

``examples/retailklip_loop.py`` reports "before" as the raw MobileNetV2 at the catalog's own
embedding (pooled output + last stage, centred), the strongest raw baseline.  Issue 14's goal
("+20 points over the raw encoder") was set against the raw pooled output as the catalog then
embedded it: not centred.  This embeds the loop's held-out photos (``loop.json`` ``per_photo``:
every train photo of the 35 held-out classes) and their packshots (``catalog-all.csv``) with
the raw encoder in three ways and pairs each with the loop's "after" (its per-photo results):

* pooled output, not centred (the issue's baseline);
* pooled output, centred on the loop's unlabeled centring photos (``center.txt``);
* pooled output + last stage, centred (the loop's "before"; recomputed here as a check: it must
  equal ``loop.json``'s per-photo "before").

1-NN by cosine over the 35 packshots (K = 1, as the loop's closed set), 224 px, bilinear.
Intervals: 95 % bootstrap over *classes* (whole classes resampled; photos of a class share
their packshot), 4000 draws.  Nothing is chosen here; val and test are never read.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_defaults_cv import ENCODER, WEIGHTS, normalise
from bench_finetuned_input import class_bootstrap, embed

from retailklip.encoders import create_encoder

#: name -> (create_encoder options, centred)
BASELINES = {
    "raw pooled output, not centred (the issue's baseline)": ({"interpolation": "bilinear"}, False),
    "raw pooled output, centred": ({"interpolation": "bilinear"}, True),
    "raw pooled + last stage, centred (the loop's before)": (
        {"interpolation": "bilinear", "feature_stage": ["pooled", -1]}, True),
}


def groups_of(options: dict) -> int | tuple[int, ...]:
    """The encoder's ``groups`` under ``options`` (a count or part widths), to normalise as it does."""
    return create_encoder(ENCODER, weights=WEIGHTS, **options).groups


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--loop", type=Path, required=True, help="the loop's --out directory")
    p.add_argument("--cache", type=Path, default=Path("/tmp/cv-cache"), help="raw features, keyed by the photo list")
    p.add_argument("--bootstrap", type=int, default=4000)
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    loop = json.loads((args.loop / "loop.json").read_text())
    photos = loop["per_photo"]["image"]
    after = np.array(loop["per_photo"]["after_correct"], bool)
    before = np.array(loop["per_photo"]["before_correct"], bool)
    with open(args.loop / "catalog-all.csv", newline="") as f:
        gallery = [(r["image"], r["sku"]) for r in csv.DictReader(f)]
    skus = [s for _, s in gallery]
    truth = np.array([Path(q).parent.name for q in photos])
    if not set(truth) <= set(skus):
        raise SystemExit(f"photos of classes outside the catalog: {sorted(set(truth) - set(skus))[:3]}")
    centre_paths = (args.loop / "center.txt").read_text().split()
    paths = [g for g, _ in gallery] + photos + centre_paths
    ng, nq = len(gallery), len(photos)
    print(f"{nq} held-out photos, {ng} packshots, {len(centre_paths)} centring photos; "
          f"loop after: {after.mean():.3f}, loop before: {before.mean():.3f}\n")
    print("| raw-encoder baseline | top-1 | loop after minus it [95 %, class bootstrap] | photos only after / only raw |")
    print("|---|---|---|---|")
    out = {}
    prepared: dict = {}  # decoded inputs shared by the baselines of one geometry
    for name, (options, centred) in BASELINES.items():
        npy = args.cache / "loop-baselines" / f"raw-{'+'.join(map(str, options.get('feature_stage', ['pooled'])))}.npy"
        f, groups = embed(WEIGHTS, "224", paths, npy, prepared, options=options), groups_of(options)
        centre = f[ng + nq:].mean(0) if centred else None
        x = normalise(f[: ng + nq], centre, groups)
        nearest = np.argmax(x[ng:] @ x[:ng].T, axis=1)
        correct = np.array(skus)[nearest] == truth
        d = after.astype(float) - correct
        lo, hi = class_bootstrap(d, truth, args.bootstrap, 0.95)
        only_after, only_raw = int((after & ~correct).sum()), int((~after & correct).sum())
        print(f"| {name} | {correct.mean():.3f} | {d.mean():+.3f} [{lo:+.3f}, {hi:+.3f}] | {only_after} / {only_raw} |")
        out[name] = {"top1": float(correct.mean()), "gain": [float(d.mean()), lo, hi]}
        if "loop's before" in name and not np.array_equal(correct, before):
            print(f"  (differs from loop.json's before on {int((correct != before).sum())} photos)")
    print(f"\n{time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
