#!/usr/bin/env python3
"""Unknown rejection for sibling products (issue 14, item 3): which open-set score separates
photos of catalog SKUs from photos of their unknown siblings, by cross-validation on
GroceryStore's *train* split.  Produces the tables of docs/threshold.md, "Unknown rejection for
siblings (issue 14)".

    flock /tmp/retailklip-heavy.lock python benchmarks/bench_open_set.py --cache /tmp/openset-cache

Protocol (docs/evaluation.md, :mod:`retailklip.protocol`):

* encoder: ImageNet MobileNetV2 (``timm:mobilenetv2_100``, bilinear), features centred on every
  6th train photo used unlabeled (the shipped catalog setup, examples/grocery_store.py);
* those unlabeled photos are never queries; the queries are the other train photos (2200);
* a *split* = a random known/unknown halving of the 81 fine classes **within each coarse group**
  (a group of n classes gets ceil(n/2) or floor(n/2) known, at random; groups of one class
  alternate known/unknown over the splits), so an unknown photo is usually a sibling of a known
  SKU; ``--splits`` seeded splits are the folds;
* catalog = the iconic packshot of each known class, K views via
  :func:`retailklip.references.embed_reference` (the catalog default K);
* thresholds are calibrated on split s (target known precision) and applied to split s+1
  (other known classes, other unknown classes, other half of the photos), so every reported
  operating point is held out; the photos are halved by capture session (``--folds session``,
  the default since 2026-12-07: :func:`retailklip.protocol.session_folds` over
  :func:`~retailklip.protocol.capture_groups` of the raw features, so no near-copy of a
  calibration photo is judged) or by stratified photo folds (``--folds photo``, the tables of
  docs/threshold.md before 2026-12-07).

Scores (higher = more likely unknown), :mod:`retailklip.open_set` where shipped:

* ``distance``: 1-NN cosine distance d1 (before this study the only one);
* ``ratio``: d1 / d2, d2 = distance to the nearest *other* SKU (Lowe 2004, §7.1);
* ``margin``: -(d2 - d1);
* ``sku-scale``: d1 / s(nearest SKU), s = distance from that SKU's vector to its nearest other
  SKU in the catalog (no photos needed);
* ``unlabeled-scale``: d1 / u(nearest SKU), u = mean distance of the SKU's 5 nearest unlabeled
  photos (the centering photos);
* ``tta-*``: the query embedding averaged over the photo, its mirror image and a central 80 %
  zoom (renormalised), with the distance and the ratio.

Embeddings are cached under ``--cache`` (raw features, before centering), so each image is
embedded once.  ``--val`` adds the one final val measurement of ``--val-score``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
ENCODER = "timm:mobilenetv2_100"
OPTIONS = {"interpolation": "bilinear"}
CENTER_STRIDE = 6
ZOOM = 0.8


def views(im: Image.Image) -> list[Image.Image]:
    """The test-time views of a photo: itself, its mirror image, its central ZOOM crop."""
    w, h = im.size
    dw, dh = round(w * (1 - ZOOM) / 2), round(h * (1 - ZOOM) / 2)
    return [im, ImageOps.mirror(im), im.crop((dw, dh, w - dw, h - dh))]


def raw_features(encoder, paths: list[Path], cache: Path, name: str) -> np.ndarray:
    """float32 (N, 3, D) raw (uncentred) features of each photo's three :func:`views`, cached."""
    import torch

    from retailklip.images import load_image

    f = cache / f"{name}-raw.npy"
    if f.exists():
        out = np.load(f)
        if len(out) == len(paths):
            return out
    out = np.zeros((len(paths), 3, encoder.dim), np.float32)
    start, b = time.perf_counter(), 16
    for s in range(0, len(paths), b):
        ims = [v for p in paths[s : s + b] for v in views(load_image(p))]
        batch = torch.stack([encoder.prepare(v, decoded=True) for v in ims])
        out[s : s + b] = encoder.features(batch).numpy().reshape(-1, 3, encoder.dim)
        if s % 320 == 0:
            print(f"{name}: {s + len(ims) // 3}/{len(paths)} ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
    np.save(f, out)
    return out


def normalise(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def split_classes(store, seed: int) -> set[str]:
    """Known classes of one split: a random half of each coarse group (module docstring)."""
    rng = np.random.default_rng(seed)
    groups: dict[str, list[str]] = {}
    for c in store.classes:
        groups.setdefault(c.coarse_name, []).append(c.name)
    known: set[str] = set()
    for members in groups.values():
        n_known = len(members) // 2 + (len(members) % 2) * int(rng.integers(2))
        known |= {members[i] for i in rng.permutation(len(members))[:n_known]}
    return known


def neighbours(gallery: np.ndarray, skus: np.ndarray, queries: np.ndarray, n: int = 4):
    """Per query: nearest SKU index into ``skus``' distinct SKUs and cosine distances to the n
    nearest distinct SKUs, float64 (M, n) ascending (the min over each SKU's K vectors)."""
    names = np.unique(skus)
    d = 1.0 - queries.astype(np.float64) @ gallery.T.astype(np.float64)
    per_sku = np.stack([d[:, skus == s].min(1) for s in names], 1)
    order = np.argsort(per_sku, 1, kind="stable")[:, :n]
    return names[order[:, 0]], np.take_along_axis(per_sku, order, 1)


def scores_of(dist: np.ndarray, nearest: np.ndarray, sku_scale: dict, unl_scale: dict) -> dict[str, np.ndarray]:
    """Every candidate score (higher = more likely unknown) of one query set."""
    from retailklip.open_set import distance_ratio

    d1, d2 = dist[:, 0], dist[:, 1]
    return {
        "distance": d1,
        "ratio": distance_ratio(d1, d2),
        "margin": d1 - d2,
        "ratio-3": d1 / dist[:, 1:4].mean(1),
        "sku-scale": d1 / np.array([sku_scale[s] for s in nearest]),
        "unlabeled-scale": d1 / np.array([unl_scale[s] for s in nearest]),
        "ratio x unlabeled-scale": distance_ratio(d1, d2) * d1 / np.array([unl_scale[s] for s in nearest]),
    }


def operating_point(score, correct, known, thr) -> dict:
    acc = score <= thr
    return {
        "known_precision": float((acc & correct).sum() / acc.sum()) if acc.sum() else float("nan"),
        "known_accepted": float((acc & known).sum() / known.sum()),
        "known_accuracy": float((acc & correct).sum() / known.sum()),
        "unknown_rejection": float((~acc & ~known).sum() / (~known).sum()),
    }


def study(args, store, Q: dict, G: np.ndarray, U: np.ndarray, labels: np.ndarray, groups: np.ndarray | None = None) -> dict:
    """The CV study over ``args.splits`` known/unknown splits (module docstring); ``groups``: the
    queries' capture groups (session halves), None for stratified photo halves."""
    from retailklip.calibration import CalibrationError, auroc, threshold_for_precision, threshold_for_unknown_rejection
    from retailklip.protocol import bootstrap_ci, mcnemar, photo_folds, session_folds

    names = np.array([c.name for c in store.classes])
    per_split = []
    for s in range(args.splits):
        known_cls = split_classes(store, s)
        kmask = np.array([n in known_cls for n in names])
        g, gs = G[kmask], names[kmask]
        # per-SKU scales from the catalog alone, and from the unlabeled (centering) photos
        dg = 1.0 - g.astype(np.float64) @ g.T
        np.fill_diagonal(dg, np.inf)
        sku_scale = dict(zip(gs, dg.min(1)))
        du = 1.0 - U.astype(np.float64) @ g.T
        unl_scale = dict(zip(gs, np.sort(du, 0)[:5].mean(0)))
        known = np.array([t in known_cls for t in labels])
        rows = {}
        for qname, qv in Q.items():
            nearest, dist = neighbours(g, gs, qv)
            correct = known & (nearest == labels)
            for sname, sc in scores_of(dist, nearest, sku_scale, unl_scale).items():
                if qname != "photo" and sname not in ("distance", "ratio"):
                    continue
                rows[sname if qname == "photo" else f"tta {sname}"] = (sc, correct)
        per_split.append((known, rows))
    halves = [photo_folds(list(labels), k=2, seed=s) if groups is None else session_folds(list(labels), groups, k=2, seed=s)
              for s in range(args.splits)]
    out: dict = {"splits": args.splits, "queries": len(labels), "folds": "photo" if groups is None else "session",
                 "known_per_split": [int(k.sum()) for k, _ in per_split], "scores": {}}
    decisions: dict[str, dict[str, list]] = {}
    for sname in per_split[0][1]:
        au, au_c, top1 = [], [], []
        ops: dict[str, list] = {}
        for s, (known, rows) in enumerate(per_split):
            sc, correct = rows[sname]
            au.append(auroc(-sc[known], -sc[~known]))
            au_c.append(auroc(-sc[correct], -sc[~correct]))
            top1.append(float(correct[known].mean()))
            # calibrate on half 0 of split s, apply to half 1 of split s+1
            t = (s + 1) % args.splits
            cal = halves[s][0].test
            known_t, rows_t = per_split[t]
            sc_t, correct_t = rows_t[sname]
            app = halves[t][1].test
            for op, (choose, target) in {
                "precision 0.9": (threshold_for_precision, 0.9),
                "precision 0.7": (threshold_for_precision, 0.7),
                "unknown rejection 0.9": (threshold_for_unknown_rejection, 0.9),
            }.items():
                try:
                    thr = choose(sc[cal], (correct if choose is threshold_for_precision else known)[cal], target)
                except CalibrationError:
                    ops.setdefault(op, []).append(None)
                    decisions.setdefault(op, {}).setdefault(sname, []).append(None)
                    continue
                m = operating_point(sc_t[app], correct_t[app], known_t[app], thr)
                ops.setdefault(op, []).append(m)
                # per photo: the decision is right (known photo named right, unknown rejected)
                acc = sc_t[app] <= thr
                right = np.where(known_t[app], acc & correct_t[app], ~acc)
                decisions.setdefault(op, {}).setdefault(sname, []).append(right)
        res = {"auroc": bootstrap_ci(au).__dict__, "auroc_folds": [round(a, 4) for a in au],
               "auroc_correct": bootstrap_ci(au_c).__dict__,
               "closed_set_top1": bootstrap_ci(top1).__dict__, "operating_points": {}}
        for op, ms in ops.items():
            ok = [m for m in ms if m is not None]
            res["operating_points"][op] = {"reached": len(ok), **({k: bootstrap_ci(
                [m[k] for m in ok if not np.isnan(m[k])]).__dict__ for k in ok[0]} if ok else {})}
        out["scores"][sname] = res
    # paired comparisons with distance: AUROC per split (sign), decisions per photo (McNemar)
    base = out["scores"]["distance"]["auroc_folds"]
    for sname, res in out["scores"].items():
        diff = np.array(res["auroc_folds"]) - np.array(base)
        res["auroc_minus_distance"] = bootstrap_ci(diff).__dict__
        res["auroc_wins_vs_distance"] = int((diff > 0).sum())
        res["mcnemar_vs_distance"] = {}
        for op, by in decisions.items():
            both = [(a, b) for a, b in zip(by[sname], by["distance"]) if a is not None and b is not None]
            if sname != "distance" and both:  # on the splits where both reached the target
                m = mcnemar(np.concatenate([a for a, _ in both]), np.concatenate([b for _, b in both]))
                res["mcnemar_vs_distance"][op] = dict(m.__dict__, splits=len(both))
    return out


def auroc_interval(known_scores: np.ndarray, unknown_scores: np.ndarray, n_boot: int = 2000, seed: int = 0) -> dict:
    """AUROC (higher score = known) with a percentile bootstrap interval, photos resampled
    within each side (Efron & Tibshirani 1993, ch. 13)."""
    from retailklip.calibration import auroc

    rng = np.random.default_rng(seed)
    boot = [auroc(rng.choice(known_scores, known_scores.size), rng.choice(unknown_scores, unknown_scores.size))
            for _ in range(n_boot)]
    lo, hi = np.quantile(boot, [0.025, 0.975])
    return {"mean": auroc(known_scores, unknown_scores), "low": float(lo), "high": float(hi)}


def val_result(args, store, G, cenc, center, train, labels_train, train_queries) -> dict:
    """The one val measurement: catalog = the even-position classes (split_known_unknown's
    "alternate" rule), thresholds calibrated on the train queries with the library's
    :func:`retailklip.calibration.calibrate`, applied to the val photos."""
    from retailklip.calibration import CalibrationError, calibrate, nearest_matches
    from retailklip.datasets import split_known_unknown
    from retailklip.open_set import open_set_score
    from retailklip.protocol import bootstrap_ci

    names = [c.name for c in store.classes]
    known_cls, _ = split_known_unknown(names)
    keep = np.array([n in set(known_cls) for n in names])
    g, gs = G[keep].reshape(-1, G.shape[-1]), [n for n, k in zip(names, keep) for _ in range(G.shape[1]) if k]
    val = store.photos("val")
    V = normalise(raw_features(cenc, [q.path for q in val], args.cache, "val")[:, 0] - center)
    truth = np.array([q.label for q in val])
    known = np.array([t in set(known_cls) for t in truth])
    pred, d1, d2 = nearest_matches(g, gs, V)
    correct = known & (np.array(pred) == truth)
    out: dict = {"photos": len(val), "known": int(known.sum()), "unknown": int((~known).sum()), "catalog_skus": len(known_cls),
                 "closed_set_top1": bootstrap_ci(correct[known]).__dict__}
    for score in (args.val_score, "distance"):
        sc = open_set_score(score, d1, d2)
        res = {"auroc": auroc_interval(-sc[known], -sc[~known]),
               "auroc_correct": auroc_interval(-sc[correct], -sc[~correct])}
        for op, kw in [("precision 0.9", {"target_precision": 0.9}), ("precision 0.7", {"target_precision": 0.7})]:
            try:
                rep = calibrate(g, gs, train_queries, list(labels_train), score=score, **kw)
            except CalibrationError as e:
                res[op] = {"error": str(e)}
                continue
            acc = sc <= rep.threshold
            res[op] = {"threshold": rep.threshold, "accepted": int(acc.sum()),
                       "known_precision": bootstrap_ci(correct[acc]).__dict__ if acc.any() else None,
                       "known_accepted": bootstrap_ci(acc[known]).__dict__,
                       "known_accuracy": bootstrap_ci((acc & correct)[known]).__dict__,
                       "unknown_rejection": bootstrap_ci(~acc[~known]).__dict__}
        out[score] = res
    return out


def embeddings(args, store):
    """Centred unit embeddings: gallery (81, K, D) via embed_reference, train photo views
    (2640, 3, D), the unlabeled centering photo indices, and the centred encoder."""
    from retailklip.augment import DEFAULT_AUGMENTATIONS
    from retailklip.encoders import create_encoder
    from retailklip.references import embed_reference

    enc = create_encoder(ENCODER, weights=args.weights, **OPTIONS)
    train = store.photos("train")
    raw_features(enc, [c.iconic for c in store.classes], args.cache, "iconic")
    raw = raw_features(enc, [q.path for q in train], args.cache, "train")
    unl = np.arange(0, len(train), CENTER_STRIDE)
    center = raw[unl, 0].astype(np.float64).mean(0).astype(np.float32)
    cenc = enc.with_center(center)
    key = hashlib.sha256(cenc.identity.key.encode()).hexdigest()[:12]
    gfile = args.cache / f"gallery-K{DEFAULT_AUGMENTATIONS}-{key}.npy"
    if gfile.exists():
        G = np.load(gfile)
    else:
        G = np.stack([embed_reference(cenc, c.iconic, DEFAULT_AUGMENTATIONS) for c in store.classes])
        np.save(gfile, G)
    return G, normalise(raw - center), unl, cenc, center


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=SHARED / "data" / "grocery-store")
    p.add_argument("--weights", type=Path, default=SHARED / "models" / "mobilenetv2_100.imagenet.safetensors")
    p.add_argument("--cache", type=Path, default=Path("/tmp/openset-cache"))
    p.add_argument("--splits", type=int, default=10, help="random known/unknown splits (the folds)")
    p.add_argument("--embed-only", action="store_true", help="fill the cache (train and val) and stop")
    p.add_argument("--folds", choices=("session", "photo"), default="session",
                   help="halve the photos for calibration / application by capture session or by photo (module docstring)")
    p.add_argument("--val", action="store_true", help="also the one final val measurement of --val-score")
    p.add_argument("--val-score", default="ratio")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    args.cache.mkdir(parents=True, exist_ok=True)
    from retailklip.datasets import read_grocery_store

    store = read_grocery_store(args.data)
    G, T, unl, cenc, center = embeddings(args, store)
    if args.embed_only:
        raw_features(cenc, [q.path for q in store.photos("val")], args.cache, "val")
        return 0
    train = store.photos("train")
    qidx = np.setdiff1d(np.arange(len(train)), unl)
    labels = np.array([train[i].label for i in qidx])
    K = G.shape[1]
    Gf = G.reshape(-1, G.shape[-1])
    Q = {"photo": T[qidx, 0], "tta": normalise(T[qidx].mean(1))}
    groups = None
    if args.folds == "session":  # capture groups of the raw (uncentred) features, retailklip.protocol.SESSION_COSINE
        from retailklip.protocol import capture_groups

        groups = capture_groups(raw_features(cenc, [q.path for q in train], args.cache, "train")[qidx, 0], list(labels))
    res = study(args, store, Q, Gf, T[unl, 0], labels, groups) if K == 1 else None
    if res is None:
        raise SystemExit("the study assumes K = 1 vectors per SKU (the catalog default)")
    res.update(encoder=cenc.identity.key, k=K, unlabeled=len(unl))
    if args.val:
        res["val"] = val_result(args, store, G, cenc, center, train, labels, Q["photo"])
    text = json.dumps(res, indent=1)
    if args.out:
        args.out.write_text(text)
    print(table(res))
    return 0


def table(res: dict) -> str:
    def f(i: dict) -> str:
        return f"{i['mean']:.3f} [{i['low']:.3f}, {i['high']:.3f}]"

    lines = ["| score | AUROC known vs unknown | AUROC - distance (splits better) | AUROC right vs wrong/unknown | closed-set top-1 |",
             "|---|---|---|---|---|"]
    for s, r in res["scores"].items():
        lines.append(f"| {s} | {f(r['auroc'])} | {f(r['auroc_minus_distance'])} ({r['auroc_wins_vs_distance']}/{res['splits']}) "
                     f"| {f(r['auroc_correct'])} | {f(r['closed_set_top1'])} |")
    for op in res["scores"]["distance"]["operating_points"]:
        lines += ["", f"{op} (calibrated on split s, applied to split s+1, other photo half)", "",
                  "| score | reached | known precision | known accepted | unknown rejection | McNemar vs distance (only this / only distance, p) |",
                  "|---|---|---|---|---|---|"]
        for s, r in res["scores"].items():
            o = r["operating_points"][op]
            m = r["mcnemar_vs_distance"].get(op)
            mc = f"{m['only_a']} / {m['only_b']}, p={m['p_value']:.2g} ({m['splits']} splits)" if m else "-"
            if o["reached"]:
                lines.append(f"| {s} | {o['reached']}/{res['splits']} | {f(o['known_precision'])} | {f(o['known_accepted'])} "
                             f"| {f(o['unknown_rejection'])} | {mc} |")
            else:
                lines.append(f"| {s} | 0/{res['splits']} | - | - | - | - |")
    if "val" in res:
        lines += ["", "val: " + json.dumps(res["val"], indent=1)]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
