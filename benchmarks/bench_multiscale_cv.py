#!/usr/bin/env python3
"""Multi-scale, intermediate-stage embeddings of the frozen encoder (issue 14, goal "frozen
encoder >= 0.42 on unseen photos"), chosen by a nested cross-validation over GroceryStore's
*train* split only, and their cost on this CPU.

The protocol is bench_defaults_cv.py's (``photo_folds(train labels, k=5, seed=0)``; gallery =
the 81 iconic packshots, K = 1; features centred on 1/6 of the other folds' photos, used
unlabeled; every train photo a query once), with one more step against the selection effect of
trying many options on the same photos:

1. **Candidates** (fixed before any number was seen by this script): every set of 1 to 3 input
   sizes from {224, 288, 320, 384} px (timm preprocessing with ``crop_pct`` 1.0), plus the
   shipped 224 px / ``crop_pct`` 0.875, each with the model's pooled output (``head``: 1280-d for
   MobileNetV2), the last feature stage (``stage``: blocks.6, 320-d, :mod:`retailklip.encoders.multiscale`)
   or both; per-part centring and L2 normalisation, cosine = mean of the parts' cosines.
2. **Selection** on the queries of folds 0-2 only: the candidate with the highest top-1.
3. **Confirmation** on the queries of folds 3-4 (never looked at to choose): top-1 of the chosen
   candidate and of the shipped encoder on the same photos, bootstrap intervals, exact McNemar.
4. **The library path**: the chosen candidate built as the product builds it
   (``create_encoder(..., scales=[...], feature_stage=-1)``: one preprocessing at the largest
   size, smaller sizes resized from it) and scored on all 2640 photos against the shipped encoder.
5. **Cost** (``--speed``): embedding time per image and the index's vector size, shipped vs
   chosen, interleaved repeats on the same real photos, minimum and median, ``torch`` threads 2.

Raw features are cached per preprocessing under ``--cache`` (default ``/tmp/cv-cache``, shared
with bench_defaults_cv.py), so a rerun only analyses.

    python benchmarks/bench_multiscale_cv.py [--speed] [--json out.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_defaults_cv import ENCODER, K_FOLDS, SHARED, WEIGHTS, auroc_ci, cached_features  # noqa: E402

from retailklip.datasets import read_grocery_store  # noqa: E402
from retailklip.encoders.base import normalize_embeddings  # noqa: E402
from retailklip.protocol import bootstrap_ci, class_disjoint_folds, fold_roles, mcnemar, photo_folds  # noqa: E402

SHIPPED = {"interpolation": "bilinear"}  # the main job's encoder until this benchmark
SIZES = (224, 288, 320, 384)
LAYERS = ("head", "stage", "head+stage")
SELECT_FOLDS = (0, 1, 2)


def variant_options(size: int | None, layer: str) -> tuple[str, dict]:
    """Cache name and encoder options of one (size, layer) part; size None = shipped preprocessing."""
    opts = dict(SHIPPED) if size is None else {"interpolation": "bilinear", "crop_pct": 1.0, "input_size": size}
    if layer == "stage":
        opts["feature_stage"] = -1
    name = ("bilinear" if size is None else f"s{size}-crop1.0") + ("" if layer == "head" else "-stage")
    return name, opts


def similarities(feats: np.ndarray, n_classes: int, labels, folds, groups: int = 1) -> np.ndarray:
    """(Q, C) cosine similarity of every train photo (in its fold) to the C packshots: raw
    features (C + Q, D) centred on the fold's unlabeled sample and normalised per part as the
    encoder does (:func:`retailklip.encoders.base.normalize_embeddings`, in float64)."""
    g_raw, x_raw = torch.from_numpy(feats[:n_classes]).double(), torch.from_numpy(feats[n_classes:]).double()
    out = np.zeros((len(x_raw), n_classes))
    for f in folds:
        (r,) = fold_roles(labels, [f], center_size=len(f.train) // 6, seed=0)
        mu = x_raw[r.center].mean(0)
        q = normalize_embeddings(x_raw[r.queries], center=mu, groups=groups)
        out[r.queries] = (q @ normalize_embeddings(g_raw, center=mu, groups=groups).T).numpy()
    return out


def open_set(sim: np.ndarray, lab: np.ndarray, classes: np.ndarray, folds, unknown) -> dict:
    """Known-vs-unknown split of :func:`similarities`' output: in photo fold i the classes of
    ``unknown[i].test`` (whole coarse classes) leave the gallery; ``distance`` = 1 - the best
    cosine over the kept packshots, ``known`` = the photo's class was kept."""
    distance, known = np.zeros(len(lab)), np.ones(len(lab), bool)
    for f in folds:
        keep = np.ones(len(classes), bool)
        keep[unknown[f.index].test] = False
        distance[f.test] = 1 - sim[f.test][:, keep].max(1)
        known[f.test] = np.isin(lab[f.test], classes[keep])
    return {"distance": distance, "known": known}


def speed(store, chosen: dict, repeats: int) -> list[dict]:
    """Embedding seconds per image of the shipped and the chosen encoder, interleaved."""
    from retailklip import create_encoder

    torch.set_num_threads(2)
    photos = [p.path for p in store.photos("train")[:: 80]][:32]
    encs = {"shipped (224 px, head)": create_encoder(ENCODER, weights=WEIGHTS, **SHIPPED),
            "chosen": create_encoder(ENCODER, weights=WEIGHTS, **chosen)}
    times = {k: [] for k in encs}
    for e in encs.values():
        e.embed(photos[:4])  # warm-up
    for _ in range(repeats):
        for k, e in encs.items():
            t = time.perf_counter()
            e.embed(photos)
            times[k].append((time.perf_counter() - t) / len(photos))
    base = min(times["shipped (224 px, head)"])
    return [{"encoder": k, "dim": encs[k].dim, "ms_min": 1e3 * min(v), "ms_median": 1e3 * statistics.median(v),
             "ratio_min": min(v) / base} for k, v in times.items()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=SHARED / "data" / "grocery-store")
    p.add_argument("--cache", type=Path, default=Path("/tmp/cv-cache"))
    p.add_argument("--speed", action="store_true", help="also time the shipped and the chosen encoder")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    store = read_grocery_store(args.data)
    labels = [ph.label for ph in store.photos("train")]
    lab = np.array(labels)
    classes = np.array([c.name for c in store.classes])
    items = [(c.iconic, 0) for c in store.classes] + [(ph.path, 0) for ph in store.photos("train")]
    folds = photo_folds(labels, K_FOLDS, seed=0)
    fold_of = np.zeros(len(lab), int)
    for f in folds:
        fold_of[f.test] = f.index
    select = np.isin(fold_of, SELECT_FOLDS)

    sims = {}
    for size in (None, *SIZES):
        for layer in ("head", "stage"):
            name, opts = variant_options(size, layer)
            sims[(size, layer)] = similarities(cached_features(name, items, args.cache, options=opts),
                                               len(classes), labels, folds)
    shipped = classes[sims[(None, "head")].argmax(1)] == lab

    candidates = {}
    for n in (1, 2, 3):
        for sizes in itertools.combinations((None, *SIZES), n):
            for layer in LAYERS:
                s = sum(sims[(z, part)] for z in sizes for part in layer.split("+"))
                candidates[(sizes, layer)] = classes[s.argmax(1)] == lab
    ranked = sorted(candidates, key=lambda k: (-candidates[k][select].mean(), len(k[0]), k[1]))

    def label(k):
        return "+".join("224/0.875" if z is None else str(z) for z in k[0]) + f" {k[1]}"

    print(f"{len(candidates)} candidates; selection on folds {SELECT_FOLDS} ({select.sum()} photos), "
          f"confirmation on the others ({(~select).sum()} photos)\n")
    print("| candidate (top 10 by selection) | top-1 selection folds | top-1 confirmation folds |")
    print("|---|---|---|")
    for k in ranked[:10]:
        print(f"| {label(k)} | {candidates[k][select].mean():.3f} | {candidates[k][~select].mean():.3f} |")
    best = ranked[0]
    conf_best, conf_ship = candidates[best][~select], shipped[~select]
    m = mcnemar(conf_best, conf_ship)
    print(f"\nchosen on the selection folds: {label(best)}")
    print(f"confirmation folds: chosen {bootstrap_ci(conf_best)} vs shipped {bootstrap_ci(conf_ship)}; "
          f"McNemar only chosen / only shipped {m.only_a} / {m.only_b}, p = {m.p_value:.3g}")

    result = {"chosen": label(best), "confirmation": {"chosen": vars(bootstrap_ci(conf_best)),
              "shipped": vars(bootstrap_ci(conf_ship)), "mcnemar": vars(m)}}
    sizes = [z for z in best[0] if z is not None]
    if best[1] == "stage" and len(sizes) == len(best[0]):
        chosen = {"interpolation": "bilinear", "crop_pct": 1.0, "scales": sorted(sizes), "feature_stage": -1}
        name = "ms-" + "-".join(map(str, sorted(sizes))) + "-stage"
        lib_sim = similarities(cached_features(name, items, args.cache, options=chosen), len(classes), labels, folds,
                               groups=len(sizes))
        lib = classes[lib_sim.argmax(1)] == lab
        m = mcnemar(lib, shipped)
        print(f"\nlibrary path ({chosen}), all {len(lab)} photos: {bootstrap_ci(lib)} vs shipped "
              f"{bootstrap_ci(shipped)}; McNemar {m.only_a} / {m.only_b}, p = {m.p_value:.3g}; "
              f"confirmation folds only: {lib[~select].mean():.3f}")
        result["library"] = {"options": chosen, "top1": vars(bootstrap_ci(lib)), "shipped": vars(bootstrap_ci(shipped)),
                             "mcnemar": vars(m)}
        unknown = class_disjoint_folds(list(classes), K_FOLDS, seed=0, groups=[c.coarse_name for c in store.classes])
        aurocs = {name: auroc_ci(open_set(sim, lab, classes, folds, unknown))
                  for name, sim in (("shipped", sims[(None, "head")]), ("chosen", lib_sim))}
        print("known-vs-unknown AUROC of the nearest distance (whole coarse classes out of the gallery, "
              "bench_defaults_cv's protocol): " + "; ".join(f"{k} {v:.3f} [{lo:.3f}, {hi:.3f}]" for k, (v, lo, hi) in aurocs.items()))
        result["auroc"] = aurocs
        if args.speed:
            rows = speed(store, chosen, args.repeats)
            print("\n| encoder | D | ms / image (min) | median | ratio to shipped (min) |\n|---|---|---|---|---|")
            for r in rows:
                print(f"| {r['encoder']} | {r['dim']} | {r['ms_min']:.1f} | {r['ms_median']:.1f} | {r['ratio_min']:.2f} |")
            result["speed"] = rows
    else:
        print("\n(the chosen candidate is not a pure multi-scale stage embedding: no library path to check)")
    print(f"\n{time.perf_counter() - t0:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
