#!/usr/bin/env python3
"""Pseudo-references (unlabeled store photos that 1-NN names most confidently become extra
references of their SKU: :func:`select_pseudo_references`) and labelled in-store references,
measured by cross-validation over GroceryStore's *train* split only (issue 14).  Not shipped:
across capture sessions both lose (docs/evaluation.md, "Capture sessions").

Two protocols, both with the product's 1-NN (:func:`retailklip.calibration.nearest_skus`):

1. **Frozen encoder, the main job** (``photo_folds(train labels, k=5, seed=0)``, as
   bench_defaults_cv.py and bench_multiscale_cv.py): gallery = the 81 iconic packshots (K = 1);
   features centred on 1/6 of the other folds' photos (the shipped centring); the **pool** of
   unlabeled photos = all the other folds' photos (about 26 per SKU; labels never read); every
   train photo is a query once.  Encoder: the main job's (multi-scale stage embedding,
   ``examples/grocery_store.py``).  Nested against the selection effect: the candidates
   (``per_sku`` in {1, 2, 3, 5, 10, 20} x ``rounds`` in {1, 2}, fixed before this script ran) are
   ranked on the queries of folds 0-2 and the winner is confirmed on folds 3-4 against no
   pseudo-references (bootstrap intervals, exact McNemar).  Pool density: every candidate again
   with 1/2 and 1/4 of the pool.  Also 1 and 2 *labelled* other-fold photos per class as extra
   references (the "More references per SKU" rows of docs/evaluation.md).  ``--folds``: run with
   stratified photo folds (``photo``) and/or **capture-session folds** (``session``:
   :func:`retailklip.protocol.session_folds` over :func:`~retailklip.protocol.capture_groups` at
   cosine 0.87 of the raw 224-px features), which keep a query's near-copies (GroceryStore's
   train photos come in them; its val photos do not share them) out of its pool and references.
2. **Finetuned encoders** (``--finetuned RUN_OUT ...``: the replicate class-disjoint CVs of
   ``bench_loop_recipe.py --classes all --folds 3 --seed S``, which leave their fold encoders in
   ``RUN_OUT/fold*/RECIPE``): per fold, the gallery = the held-out classes' packshots, queries =
   their first ``--queries`` train photos (the CV's own), pool = their other train photos
   (about 22 per SKU, unlabeled); the raw ImageNet encoder and ``--recipe``'s encoders, each
   plain and centred (1/6 of the fold's training-class photos, as the loop's catalogs); and again
   with a pool that leaves out every photo of a query's capture group.  Pooled
   photo by photo over the replicates (each photo's right/wrong averaged over the runs), with a
   bootstrap interval of the difference to no pseudo-references.

Raw features are cached under ``--cache`` (frozen: bench_defaults_cv.py's format and cache;
finetuned: one ``.npy`` per fold encoder), so a rerun only analyses.

    python benchmarks/bench_pseudo_references.py [--finetuned /tmp/i14-cv-all /tmp/i14-cv-all-s1 ...] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_defaults_cv import ENCODER, SHARED, WEIGHTS, cached_features, cv_folds, normalise
from bench_loop_recipe import run_seed

from retailklip.calibration import nearest_skus
from retailklip.datasets import read_grocery_store
from retailklip.encoders import create_encoder
from retailklip.protocol import SESSION_COSINE, bootstrap_ci, capture_groups, class_disjoint_folds, fold_roles, mcnemar

#: The main job's encoder options (examples/grocery_store.py ENCODER_OPTIONS).
MAIN_JOB = {"interpolation": "bilinear", "crop_pct": 1.0, "scales": [224, 288, 384], "feature_stage": -1}
MAIN_JOB_CACHE = "ms-224-288-384-stage"  # bench_multiscale_cv.py's cache name for the same options
CANDIDATES = [(m, r) for m in (1, 2, 3, 5, 10, 20) for r in (1, 2)]
SELECT_FOLDS = (0, 1, 2)


def select_pseudo_references(references: np.ndarray, reference_skus: list[str], pool: np.ndarray, *, per_sku: int,
                             rounds: int) -> list[tuple[int, str]]:
    """Per SKU, the ``per_sku`` pool photos 1-NN names that SKU with the smallest cosine distance:
    ``(pool index, SKU)`` pairs.  Each later round searches again with the photos chosen so far
    among the references (a chosen photo is its own nearest vector, so it keeps its SKU; SKUs
    with fewer than ``per_sku`` photos fill up).  The per-class top-Z confident pseudo-labels of
    prototype rectification (Liu, Song, Qin, ECCV 2020, §3.2), used as extra 1-NN references."""
    chosen: dict[int, str] = {}
    for _ in range(rounds):
        ids = list(chosen)
        gallery = np.concatenate([references, pool[ids]]) if ids else references
        named, dist = nearest_skus(gallery, reference_skus + [chosen[i] for i in ids], pool)
        have: dict[str, int] = defaultdict(int)
        for sku in chosen.values():
            have[sku] += 1
        for i in np.argsort(dist, kind="stable").tolist():
            if i not in chosen and have[named[i]] < per_sku:
                chosen[i] = named[i]
                have[named[i]] += 1
    return list(chosen.items())


def one_nn(gallery: np.ndarray, skus: list[str], queries: np.ndarray, truth: list[str], pool: np.ndarray | None,
           per_sku: int, rounds: int, pool_truth: list[str] | None = None, tally: list | None = None) -> np.ndarray:
    """bool (Q,): 1-NN over the gallery, plus the pool's pseudo-references when per_sku > 0
    (their labels checked against ``pool_truth`` into ``tally``: [right, chosen], when given)."""
    if per_sku:
        chosen = select_pseudo_references(gallery, skus, pool, per_sku=per_sku, rounds=rounds)
        gallery = np.concatenate([gallery, pool[[i for i, _ in chosen]]])
        skus = skus + [sku for _, sku in chosen]
        if tally is not None:
            tally[0] += sum(sku == pool_truth[i] for i, sku in chosen)
            tally[1] += len(chosen)
    named, _ = nearest_skus(gallery, skus, queries)
    return np.array([a == b for a, b in zip(named, truth)])


def frozen(store, cache: Path, log, kind: str = "photo") -> dict:
    """Protocol 1 (module docstring): per candidate, bool (2640,) right/wrong of every train photo;
    ``kind`` "session": the folds keep capture groups together (:func:`session_folds`), else
    stratified photo folds.  Also ("refs", n): 1 or 2 *labelled* other-fold photos per class as
    extra references (docs/evaluation.md's "More references per SKU", re-measured)."""
    classes = [c.name for c in store.classes]
    labels = [ph.label for ph in store.photos("train")]
    items = [(c.iconic, 0) for c in store.classes] + [(ph.path, 0) for ph in store.photos("train")]
    feats = cached_features(MAIN_JOB_CACHE, items, cache, options=MAIN_JOB, log=log).astype(np.float64)
    groups = len(MAIN_JOB["scales"])
    g_raw, x_raw = feats[: len(classes)], feats[len(classes):]
    single = cached_features("bilinear", items, cache, options={"interpolation": "bilinear"}, log=log)
    folds = cv_folds(kind, labels, single[len(classes):])
    lab = np.array(labels)
    unit = normalise(x_raw, None, groups)
    nearest = []  # each query's nearest same-class photo in the other folds (cosine of the raw parts)
    for f in folds:
        other = np.zeros(len(lab), bool)
        other[f.train] = True
        for q in f.test:
            same = other & (lab == lab[q])
            if same.any():
                nearest.append(float((unit[same] @ unit[q]).max()))
    out: dict[tuple, np.ndarray] = defaultdict(lambda: np.zeros(len(lab), bool))
    tally: dict[tuple, list[int]] = defaultdict(lambda: [0, 0])  # pseudo-labels right, chosen (full pool)
    rng = np.random.default_rng(0)
    for f in folds:
        (r,) = fold_roles(labels, [f], center_size=len(f.train) // 6, extra_references=2, seed=0)
        mu = x_raw[r.center].mean(0)
        gallery, x = normalise(g_raw, mu, groups), normalise(x_raw, mu, groups)
        queries, truth = x[r.queries], lab[r.queries].tolist()
        pool_ids = np.asarray(f.train)
        out[(0, 0)][r.queries] = one_nn(gallery, classes, queries, truth, None, 0, 0)
        for n in (1, 2):
            extra = np.concatenate([r.references[c][:n] for c in classes if c in r.references]).astype(np.int64)
            out[("refs", n)][r.queries] = one_nn(np.concatenate([gallery, x[extra]]), classes + lab[extra].tolist(),
                                                queries, truth, None, 0, 0)
        for m, rounds in CANDIDATES:
            out[(m, rounds)][r.queries] = one_nn(gallery, classes, queries, truth, x[pool_ids], m, rounds,
                                                 lab[pool_ids].tolist(), tally[(m, rounds)])
        for share in (2, 4):  # pool density: a seeded 1/share of the other folds' photos
            sub = np.sort(rng.permutation(pool_ids)[: len(pool_ids) // share])
            for m, rounds in CANDIDATES:
                out[(m, rounds, share)][r.queries] = one_nn(gallery, classes, queries, truth, x[sub], m, rounds)
        log(f"frozen ({kind} folds): fold {f.index} done")
    fold_of = np.zeros(len(lab), int)
    for f in folds:
        fold_of[f.test] = f.index
    return {"correct": dict(out), "select": np.isin(fold_of, SELECT_FOLDS), "precision": {k: a / b for k, (a, b) in tally.items()},
            "nearest_median": float(np.median(nearest)), "fold_sizes": [len(f.test) for f in folds]}


_PREPARED: dict[tuple, torch.Tensor] = {}


def fold_features(run: Path, fold: int, recipe: str, paths: list[Path], cache: Path, log=print,
                  feature_stage: int | None = None) -> np.ndarray:
    """float64 (N, D) raw features of ``paths`` (every packshot, then every train photo, in the
    store's order) under the fold encoder ``RUN/foldF/RECIPE/encoder.safetensors`` of a
    ``bench_loop_recipe.py --classes all`` run, cached as ``CACHE/finetuned/RUN-foldF-RECIPE.npy``
    (with ``feature_stage`` S: that stage's pooled features, the encoder option of that name,
    cached as ``...-RECIPE-stageS.npy``)."""
    tail = "" if feature_stage is None else f"-stage{feature_stage}"
    npy = cache / "finetuned" / f"{run.name}-fold{fold}-{recipe}{tail}.npy"
    if not npy.is_file():
        key = tuple(paths)
        if key not in _PREPARED:  # the fold encoders share the preprocessing: decode and resize once per process
            enc = create_encoder(ENCODER, weights=WEIGHTS, interpolation="bilinear")
            _PREPARED.clear()
            _PREPARED[key] = torch.stack([enc.prepare(p) for p in paths])
        prepared = _PREPARED[key]
        enc = create_encoder(ENCODER, weights=run / f"fold{fold}" / recipe / "encoder.safetensors", interpolation="bilinear",
                             **({} if feature_stage is None else {"feature_stage": feature_stage}))
        feats = [enc.features(prepared[i: i + 64]) for i in range(0, len(paths), 64)]
        npy.parent.mkdir(parents=True, exist_ok=True)
        np.save(npy, torch.cat(feats).numpy())
        log(f"finetuned: {npy.name} embedded")
    feats = np.load(npy)
    if len(feats) != len(paths):
        raise SystemExit(f"{npy}: {len(feats)} rows cached, {len(paths)} images asked")
    return feats.astype(np.float64)


def finetuned(store, runs: list[Path], recipe: str, queries_per_class: int, cache: Path, log) -> dict:
    """Protocol 2 (module docstring): {(encoder, centred, per_sku, rounds): bool (runs, Q)}."""
    names = [c.name for c in store.classes]
    groups = [c.coarse_name for c in store.classes]
    photos: dict[str, list[Path]] = defaultdict(list)
    for ph in store.photos("train"):
        photos[ph.label].append(ph.path)
    iconic = {c.name: c.iconic for c in store.classes}
    items = [(iconic[c], 0) for c in names] + [(p, 0) for c in names for p in photos[c]]
    index = {p: i for i, (p, _) in enumerate(items)}  # the store's own Path objects, as photos[c] and iconic[c] hold them
    raw_feats = cached_features("bilinear", items, cache, options={"interpolation": "bilinear"}, log=log).astype(np.float64)
    session = capture_groups(raw_feats[len(names):], [c for c in names for _ in photos[c]], SESSION_COSINE)
    group_of = {p: int(g) for (p, _), g in zip(items[len(names):], session)}
    pool_sizes: list[tuple[int, int, int]] = []
    out: dict[tuple, list[np.ndarray]] = defaultdict(list)
    for run in runs:
        seed = run_seed(run) or 0
        folds = class_disjoint_folds(names, k=3, seed=seed, groups=groups)
        rows: dict[tuple, list[np.ndarray]] = defaultdict(list)
        for f in folds:
            test, train = [names[i] for i in f.test], [names[i] for i in f.train]
            encs = {"raw": raw_feats}
            encs[recipe] = fold_features(run, f.index, recipe, [p for p, _ in items], cache, log)
            q_ids = [index[p] for c in test for p in photos[c][:queries_per_class]]
            truth = [c for c in test for _ in photos[c][:queries_per_class]]
            u_ids = [index[p] for c in test for p in photos[c][queries_per_class:]]
            taken = {group_of[p] for c in test for p in photos[c][:queries_per_class]}
            u_session = [index[p] for c in test for p in photos[c][queries_per_class:]
                         if group_of[p] not in taken]  # no photo of a query's capture group
            g_ids = [index[iconic[c]] for c in test]
            centre_ids = [index[p] for c in train for p in photos[c]][::6]
            for name, F in encs.items():
                for centred in (False, True):
                    x = normalise(F, F[centre_ids].mean(0) if centred else None)
                    for m, rounds in [(0, 0), *CANDIDATES]:
                        rows[(name, centred, m, rounds)].append(one_nn(x[g_ids], test, x[q_ids], truth, x[u_ids], m, rounds))
                        if m:
                            rows[(name, centred, m, rounds, "session")].append(
                                one_nn(x[g_ids], test, x[q_ids], truth, x[u_session], m, rounds))
            pool_sizes.append((len(u_ids), len(u_session), len(test)))
        for k, v in rows.items():
            out[k].append(np.concatenate(v))
        log(f"finetuned: {run} done")
    log("finetuned: pool photos per SKU, all / outside the queries' capture groups: "
        f"{sum(a for a, _, _ in pool_sizes) / sum(c for _, _, c in pool_sizes):.1f} / "
        f"{sum(b for _, b, _ in pool_sizes) / sum(c for _, _, c in pool_sizes):.1f}")
    return {k: np.stack(v) for k, v in out.items()}


def report_frozen(fz: dict, kind: str) -> dict:
    """Print protocol 1's tables; returns what --json keeps."""
    corr, select, prec = fz["correct"], fz["select"], fz["precision"]
    base = corr[(0, 0)]
    print(f"## 1. Frozen encoder (main job's), {kind} folds {fz['fold_sizes']}: a query's nearest same-class photo in "
          f"the other folds has median cosine {fz['nearest_median']:.3f}; selection on folds {SELECT_FOLDS} "
          f"({select.sum()} photos), confirmation on the others ({(~select).sum()})\n")
    print("| per_sku, rounds | top-1 selection folds | top-1 confirmation folds | all folds | pseudo-labels right |")
    print("|---|---|---|---|---|")
    print(f"| none | {base[select].mean():.3f} | {base[~select].mean():.3f} | {base.mean():.3f} | - |")
    for k in CANDIDATES:
        print(f"| {k[0]}, {k[1]} | {corr[k][select].mean():.3f} | {corr[k][~select].mean():.3f} | {corr[k].mean():.3f} | "
              f"{prec[k]:.3f} |")
    best = max(CANDIDATES, key=lambda k: (corr[k][select].mean(), -k[0], -k[1]))
    m = mcnemar(corr[best][~select], base[~select])
    cb, cn = bootstrap_ci(corr[best][~select]), bootstrap_ci(base[~select])
    print(f"\nchosen on the selection folds: per_sku {best[0]}, rounds {best[1]}")
    print(f"confirmation folds: {cb.mean:.3f} [{cb.low:.3f}, {cb.high:.3f}] vs none {cn.mean:.3f} [{cn.low:.3f}, "
          f"{cn.high:.3f}]; McNemar only chosen / only none {m.only_a} / {m.only_b}, p = {m.p_value:.3g}")
    print("pool density (all folds; pool = all / 1/2 / 1/4 of the other folds' photos): " + "; ".join(
        f"{k[0]},{k[1]}: " + " / ".join(f"{(corr[k] if s == 1 else corr[(*k, s)]).mean():.3f}" for s in (1, 2, 4))
        for k in CANDIDATES if k[1] == best[1]))
    ma = mcnemar(corr[best], base)
    print(f"all folds: {corr[best].mean():.3f} vs none {base.mean():.3f}; McNemar {ma.only_a} / {ma.only_b}, "
          f"p = {ma.p_value:.3g}")
    refs = {}
    for n in (1, 2):
        r, mr = bootstrap_ci(corr[("refs", n)]), mcnemar(corr[("refs", n)], base)
        print(f"packshot + {n} labelled other-fold photo(s) per class as references: {r.mean:.3f} [{r.low:.3f}, "
              f"{r.high:.3f}] vs {base.mean():.3f}; McNemar {mr.only_a} / {mr.only_b}, p = {mr.p_value:.3g}")
        refs[n] = {"top1": vars(r), "mcnemar": vars(mr)}
    print()
    return {"chosen": best, "precision": {f"{k}": v for k, v in prec.items()}, "all_folds_mcnemar": vars(ma),
            "confirmation": {"chosen": vars(cb), "none": vars(cn), "mcnemar": vars(m)}, "references": refs,
            "nearest_median": fz["nearest_median"], "top1": {f"{k}": float(v.mean()) for k, v in corr.items()}}


def report_finetuned(ft: dict, args) -> dict:
    """Print protocol 2's table; returns what --json keeps."""
    print(f"## 2. Finetuned encoders ({args.recipe}), class-disjoint CV, {len(args.finetuned)} replicates pooled\n")
    print("| encoder | per_sku, rounds | top-1 per replicate | pooled | minus none [95 % CI] |\n|---|---|---|---|---|")
    table = {}
    for key, v in ft.items():
        name, centred, m_, r_ = key[:4]
        if (m_, r_) not in ((0, 0), (10, 1), (10, 2), (5, 1), (3, 1)):
            continue
        none = ft[(name, centred, 0, 0)]
        d = bootstrap_ci((v.astype(float) - none).mean(0))
        label = f"{name}{' centred' if centred else ''}"
        how = "none" if not m_ else f"{m_}, {r_}" + (", pool outside the queries' groups" if len(key) > 4 else "")
        print(f"| {label} | {how} | {' / '.join(f'{a:.3f}' for a in v.mean(1))} | "
              f"{v.mean():.3f} | {d.mean:+.3f} [{d.low:+.3f}, {d.high:+.3f}] |")
        table[f"{label} {how}"] = {"per_run": v.mean(1).tolist(), "pooled": float(v.mean()), "minus_none": vars(d)}
    return table


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=SHARED / "data" / "grocery-store")
    p.add_argument("--cache", type=Path, default=Path("/tmp/cv-cache"))
    p.add_argument("--folds", nargs="+", choices=("photo", "session"), default=["photo", "session"],
                   help="protocol 1's folds: stratified photo folds and/or capture-session folds (module docstring)")
    p.add_argument("--finetuned", type=Path, nargs="*", default=[], metavar="RUN_OUT")
    p.add_argument("--recipe", default="iconic12-decay0.9", help="the finetune recipe's folder in RUN_OUT/fold*")
    p.add_argument("--queries", type=int, default=10, help="train photos per class the CV scored (bench_loop_recipe)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    store = read_grocery_store(args.data)
    log = lambda s: print(s, file=sys.stderr, flush=True)
    result: dict = {}
    for kind in args.folds:
        result[f"frozen-{kind}"] = report_frozen(frozen(store, args.cache, log, kind), kind)
    if args.finetuned:
        result["finetuned"] = report_finetuned(finetuned(store, args.finetuned, args.recipe, args.queries, args.cache,
                                                         log), args)
    print(f"\n{time.perf_counter() - t0:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
