"""In-store reference images for every SKU of a finetuned catalog: closed-set top-1, AUROC known
vs unknown and the calibrated open-set operating point (issue 14, items 3 and 4), by
class-disjoint cross-validation on GroceryStore's **train** split with capture-session photo
folds.  Val and test are never read.

    python3 benchmarks/bench_store_references_open_set.py \
        --runs /tmp/i14-cv-all /tmp/i14-cv-all-s1 /tmp/i14-cv-all-s2 [--json OUT.json]

Item 4's references-per-SKU rows (docs/evaluation.md, "More references per SKU") were measured
with the frozen encoder only; the issue's open-set goal (known precision >= 0.9 while accepting
>= 30 % of the known photos) is out of reach of every score with the packshot-only catalogs of the
finetuned encoder (oracle <= 0.28, "Per-SKU open-set scores").  This measures what a store gets
by photographing each of its products R times in the store and appending the photos
(``catalog add --append``), on the shipped loop's fold encoders.

Encoders: the fold encoders of the three replicate 81-class, 3-fold class-disjoint CVs of
``benchmarks/bench_loop_recipe.py --classes all`` with the shipped recipe
(``iconic12-decay0.9-stage``) at the catalog's embedding (pooled output next to the last stage,
each part centred and normalised on its own), and the raw ImageNet MobileNetV2 at its pooled
output on the same folds (context only).  Features centred on every 6th train photo of the
fold's training classes, as the loop's catalogs are (:mod:`bench_per_sku_scores`).

Experiments, as :mod:`bench_per_sku_scores` makes them, with a third photo role: the fold's
held-out classes split by coarse class into *known* and *unknown* (both halves known in turn),
the unknown ones again into calibration and evaluation classes; the held-out classes' photos dealt
into **three** capture-session folds (:func:`retailklip.protocol.session_folds` over
:func:`~retailklip.protocol.capture_groups`, k = 3), which take the roles *reference*,
*calibration* and *evaluation* in the three cyclic rotations.  So no evaluation or calibration
photo has a near-copy among a known SKU's in-store references.  3 replicates x 3 class folds x 2
halves x 3 rotations = 54 experiments per encoder.

Catalog: each known SKU's packshot plus R in-store photos of it drawn (seeded, nested: R = 1 is a
prefix of R = 2) from the reference fold, R in {0, 1, 2} (fewer where the fold has fewer); an
SKU's distance is its nearest reference's (1-NN over reference images, as the index ranks).
Outlier references: (a) the fold's training classes' packshots, as the loop adds them (shipped);
(b) those packshots plus R train photos of each training class (drawn the same way), so that the
outliers are as "in-store" as the catalog.  Scores: ``distance`` and the shipped
``outlier-ratio`` (:func:`retailklip.open_set.outlier_ratio`).

Reported, per encoder, R and outlier variant: top-1 of the known evaluation photos (closed set),
AUROC known vs unknown on the evaluation photos, and at the threshold calibrated on the
calibration photos for known precision 0.9 (:func:`retailklip.calibration.threshold_for_precision`):
the known evaluation photos accepted and the realised known precision, with the oracle (the same
read off the evaluation photos).  Means over experiments; 95 % intervals from a bootstrap over
*classes* (2000 resamples by default; the same resamples for every row, so differences to R = 0
are paired).

Questions, fixed with this script before its first run (2026-12-08):

1. *Documentation.*  docs/evaluation.md and docs/threshold.md say that R in-store references per
   SKU reach the issue's operating point for the smallest R in {1, 2} at which, on the finetuned
   encoders, variant (a), score ``outlier-ratio``, the calibrated threshold accepts on average
   >= 0.30 of the known evaluation photos with a realised known precision >= 0.90 (means over
   the experiments).  Otherwise they say how far the best R stays from it.
2. *Product.*  The docs advise in-store photos of the finetuning classes as outlier references
   (variant (b)) only if, at R = 2, (b)'s ``outlier-ratio`` AUROC exceeds (a)'s with the 95 %
   interval of the difference above zero.
3. *Item 4.*  The lift of R = 1 and R = 2 over R = 0 in closed-set top-1 and in AUROC (both
   scores) is reported with intervals; no rule, a measurement.

Question 4, added after the first run (which showed the calibrated threshold realising a known
precision of 0.870 at R = 0 and 0.813 at R = 2 for a target of 0.9) and fixed before the second
run (2026-12-08): ``catalog calibrate`` picks the largest threshold whose precision *on the
calibration photos* reaches the target, the maximum over many thresholds of a noisy curve, so it
promises more than new photos give.  Candidate (``--confidence``): the largest threshold whose
accepted calibration photos' precision reaches the target with one-sided confidence 0.9, i.e. whose
exact (Clopper-Pearson) one-sided 90 % lower bound is >= the target (:func:`confident_threshold`;
no multiplicity correction over thresholds, so not a guarantee).  It becomes ``catalog
calibrate``'s default only if, on the finetuned encoders, variant (a), ``outlier-ratio``, at both
R = 0 and R = 2, (i) its realised known precision (mean over the experiments) is >= 0.90 and (ii)
it accepts at least half as many of the known photos as the current threshold.

Question 5, added after the third run (which showed the accepted errors of in-store catalogs to be
mostly known photos named as another SKU, nearest to an in-store reference) and fixed before the
fourth (2026-12-08): the catalogs above rank by plain 1-NN, as the loop's do (CSLS did not pass
for packshot catalogs on the finetuned encoder).  CSLS (Conneau et al., ICLR 2018, Eq. 6; the
product's ``--hubness-k 30``) pushes back references near many store photos, which an in-store
photo is.  Variant (c): (a) ranked by CSLS, k = 30, against the fold's centring photos (the
catalog's stored unlabeled photos).  The docs advise ``--hubness-k 30`` for catalogs with
in-store references only if, on the finetuned encoders at R = 2, (c) minus (a) has (i) a realised
known precision at the calibrated 0.9 threshold with its 95 % interval above zero and (ii) an
``outlier-ratio`` AUROC difference with a lower bound >= -0.01.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_defaults_cv import SHARED, normalise
from bench_loop_recipe import oracle_known_accepted, run_seed
from bench_per_sku_scores import (calibrated_threshold, known_unknown, train_split, weighted_auroc_rows,
                                  weighted_point_rows)
from bench_pseudo_references import fold_features

from retailklip.hubness import DEFAULT_HUBNESS_K, HubnessReference
from retailklip.open_set import outlier_ratio
from retailklip.protocol import class_disjoint_folds, session_folds

RECIPE = "iconic12-decay0.9-stage"
PER_SKU = (0, 1, 2)
VARIANTS = ("a", "b", "c")  # outlier references: packshots; packshots + R train photos per class; (a) ranked by CSLS
SCORES = ("distance", "outlier-ratio")
PRECISION = 0.9
GOAL_ACCEPTED = 0.30
CONFIDENCE = 0.9
HIGHER_TARGETS = (0.925, 0.95, 0.975)


def draws(rows: np.ndarray, rng: np.random.Generator, r: int) -> np.ndarray:
    """The first ``r`` of a seeded permutation of ``rows`` (nested over r)."""
    return rng.permutation(rows)[:r]


def experiment(x: np.ndarray, labels: np.ndarray, pack: dict[str, np.ndarray], known: list[str], train: list[str],
               ref_pool: dict[str, np.ndarray], out_pool: dict[str, np.ndarray], r: int, variant: str,
               cal: np.ndarray, ev: np.ndarray, store_photos: HubnessReference) -> dict[str, dict[str, np.ndarray]]:
    """One experiment's scores (module docstring).

    Args:
        x: (N, D) unit embeddings of the train photos; labels: (N,) their classes.
        pack: class -> (D,) unit packshot embedding.
        known: the catalog's SKUs; train: the fold's training classes (outlier products).
        ref_pool / out_pool: class -> photo rows in draw order (the first r become references).
        r: in-store references per SKU (and, variant "b", per outlier product).
        cal, ev: rows of the calibration and evaluation photos.
        store_photos: the unlabeled store photos CSLS measures hubness against (variant "c").

    Returns:
        {"cal" | "ev": {"known", "right", "class", "distance", "outlier-ratio", "in-store": the nearest
        reference is an in-store photo}}.
    """
    refs, owner, in_store = [], [], []
    for j, c in enumerate(known):
        rows = ref_pool[c][:r]
        refs += [pack[c], *x[rows]]
        owner += [j] * (1 + len(rows))
        in_store += [False] + [True] * len(rows)
    refs, owner, in_store = np.array(refs), np.array(owner), np.array(in_store)
    outl = [pack[c] for c in train]
    if variant == "b":
        outl += [x[i] for c in train for i in out_pool[c][:r]]
    outl = np.array(outl)
    offsets = store_photos.offsets(refs).astype(np.float64) if variant == "c" else np.zeros(len(refs))
    res = {}
    for side, idx in (("cal", cal), ("ev", ev)):
        plain = 1.0 - x[idx] @ refs.T
        best = (plain + offsets[None, :]).argmin(1)  # the reference ranked first (CSLS: by distance + offset)
        s, nearest_in_store = owner[best], in_store[best]
        d1 = plain[np.arange(len(idx)), best]  # its plain distance, as the recognizer reports it
        d_out = (1.0 - x[idx] @ outl.T).min(1)
        lab = labels[idx]
        k = np.isin(lab, known)
        res[side] = {"known": k, "right": k & (np.array(known)[s] == lab), "class": lab,
                     "distance": d1, "outlier-ratio": outlier_ratio(d1, d_out), "in-store": nearest_in_store}
    return res


def confident_threshold(score: np.ndarray, right: np.ndarray, target: float, confidence: float) -> float:
    """The largest threshold (lower score = accepted) whose accepted photos' known precision has an
    exact one-sided ``confidence`` lower bound (Clopper-Pearson: the beta quantile) >= ``target``;
    -inf when none.  Placed as :func:`retailklip.calibration.threshold_for_precision` places it."""
    from scipy.stats import beta

    order = np.argsort(score, kind="stable")
    d, c = np.asarray(score, np.float64)[order], np.asarray(right, bool)[order]
    k, n = np.cumsum(c), np.arange(1, len(d) + 1)
    with np.errstate(invalid="ignore"):
        lower = np.where(k > 0, beta.ppf(1.0 - confidence, k, n - k + 1), 0.0)
    cut = np.r_[d[1:] > d[:-1], True]
    ok = np.flatnonzero(cut & (lower >= target))
    if not ok.size:
        return -np.inf
    i = int(ok[-1])
    return float(d[i]) if i + 1 == len(d) else (float(d[i]) + float(d[i + 1])) / 2.0


def experiment_metrics(ev: dict, w: np.ndarray, threshold: float) -> dict[str, np.ndarray]:
    """Per weight row (B, n): top-1 of the known photos, AUROC of each score, and the known photos
    accepted and the known precision at the ``outlier-ratio`` threshold."""
    with np.errstate(invalid="ignore", divide="ignore"):
        out = {"top1": (w * ev["right"]).sum(1) / (w * ev["known"]).sum(1)}
    out["accepted"], out["precision"] = weighted_point_rows(ev, "outlier-ratio", threshold, w)
    for sc in SCORES:
        out[f"auroc {sc}"] = weighted_auroc_rows(ev[sc], ev["known"], w)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=SHARED / "data" / "grocery-store")
    p.add_argument("--runs", type=Path, nargs="+", required=True, help="bench_loop_recipe.py --classes all outputs")
    p.add_argument("--cache", type=Path, default=Path("/tmp/cv-cache"))
    p.add_argument("--bootstrap", type=int, default=2000)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    start = time.perf_counter()
    names, coarse, items, labels, raw, groups = train_split(args.data, args.cache)
    side_of = np.zeros(len(labels), int)
    for i, f in enumerate(session_folds(labels.tolist(), groups, k=3, seed=0)):
        side_of[f.test] = i
    rows: dict[tuple, list[dict]] = defaultdict(list)  # (encoder, r, variant) -> experiments
    for run in args.runs:
        seed = run_seed(run) or 0
        for f in class_disjoint_folds(names, k=3, seed=seed, groups=[coarse[c] for c in names]):
            test, train = [names[i] for i in f.test], [names[i] for i in f.train]
            paths = [q for q, _ in items]
            ft = fold_features(run, f.index, RECIPE, paths, args.cache)
            ft_stage = fold_features(run, f.index, RECIPE, paths, args.cache, feature_stage=-1)
            encoders = {"raw": (raw, 1), "finetuned": (np.concatenate([ft, ft_stage], 1), [ft.shape[1], ft_stage.shape[1]])}
            centre_rows = np.flatnonzero(np.isin(labels, train))[::6]
            halves = class_disjoint_folds(test, k=2, seed=seed, groups=[coarse[c] for c in test])
            for enc_name, (feats, widths) in encoders.items():
                x_all = normalise(feats, feats[len(names) + centre_rows].mean(0), widths)
                pack = {c: x_all[i] for i, c in enumerate(names)}
                x = x_all[len(names):]
                store_photos = HubnessReference(x[centre_rows], k=DEFAULT_HUBNESS_K)  # the catalog's stored photos
                for h in halves:
                    known, u_cal, u_ev = known_unknown(test, h, seed, coarse)
                    kn = np.isin(labels, known)
                    for rot in range(3):
                        ref_side, cal_side, ev_side = rot, (rot + 1) % 3, (rot + 2) % 3
                        rng = np.random.default_rng([seed, f.index, h.index, rot])
                        ref_pool = {c: draws(np.flatnonzero((labels == c) & (side_of == ref_side)), rng, max(PER_SKU))
                                    for c in known}
                        out_pool = {c: draws(np.flatnonzero(labels == c), rng, max(PER_SKU)) for c in train}
                        cal = np.flatnonzero((side_of == cal_side) & (kn | np.isin(labels, u_cal)))
                        ev = np.flatnonzero((side_of == ev_side) & (kn | np.isin(labels, u_ev)))
                        for r in PER_SKU:
                            for v in VARIANTS:
                                if r == 0 and v == "b":
                                    continue  # no photos: (b) is (a)
                                rows[(enc_name, r, v)].append(
                                    experiment(x, labels, pack, known, train, ref_pool, out_pool, r, v, cal, ev, store_photos))
        print(f"{run}: done, {time.perf_counter() - start:.0f} s", flush=True)

    cls = np.array(sorted(names))
    rng = np.random.default_rng(0)
    counts = np.array([np.bincount(rng.integers(0, len(cls), len(cls)), minlength=len(cls)) for _ in range(args.bootstrap)])
    counts = np.r_[np.ones((1, len(cls)), int), counts]  # row 0: every class once (the point estimate)
    res: dict = {"experiments": len(rows[("raw", 0, "a")]), "rows": {}}
    boot: dict[tuple, dict[str, np.ndarray]] = {}
    for key, exps in rows.items():
        per = defaultdict(list)  # metric -> (1 + B,) per experiment
        for e in exps:
            ev, w = e["ev"], counts[:, np.searchsorted(cls, e["ev"]["class"])]  # (1 + B, n)
            for m, v in experiment_metrics(ev, w, calibrated_threshold(e["cal"], "outlier-ratio")).items():
                per[m].append(v)
            confident = confident_threshold(e["cal"]["outlier-ratio"], e["cal"]["right"], PRECISION, CONFIDENCE)
            a, pr = weighted_point_rows(ev, "outlier-ratio", confident, w)
            per["accepted confident"].append(a)
            per["precision confident"].append(pr)
            for target in HIGHER_TARGETS:  # descriptive: what a store calibrating for more than 0.9 gets
                a, pr = weighted_point_rows(ev, "outlier-ratio", calibrated_threshold(e["cal"], "outlier-ratio", target), w)
                per[f"accepted target {target:g}"].append(a)
                per[f"precision target {target:g}"].append(pr)
            per["oracle"].append(np.full(len(w), oracle_known_accepted(ev["outlier-ratio"], ev["right"], ev["known"],
                                                                       PRECISION)))
        with np.errstate(all="ignore"):
            boot[key] = {m: np.nanmean(np.array(v), axis=0) for m, v in per.items()}  # (1 + B,)
        row = {m: float(v[0]) for m, v in boot[key].items()}
        for m, v in boot[key].items():
            row[f"{m} ci"] = np.nanpercentile(v[1:], [2.5, 97.5]).tolist()
        res["rows"]["{} R={} {}".format(*key)] = row
    metrics = ("top1", "auroc distance", "auroc outlier-ratio", "accepted", "precision")
    for key, row in res["rows"].items():
        enc, r, v = key.split()
        base, mine = boot[(enc, 0, "a")], boot[(enc, int(r[2:]), v)]
        for m in (*metrics, "accepted confident", "precision confident"):
            d = mine[m] - base[m]
            row[f"{m} minus R=0"] = float(d[0])
            row[f"{m} minus R=0 ci"] = np.nanpercentile(d[1:], [2.5, 97.5]).tolist()
    res["b_minus_a"] = {}
    for enc in ("raw", "finetuned"):
        for r in PER_SKU[1:]:
            d = boot[(enc, r, "b")]["auroc outlier-ratio"] - boot[(enc, r, "a")]["auroc outlier-ratio"]
            res["b_minus_a"][f"{enc} R={r}"] = {"difference": float(d[0]), "ci": np.nanpercentile(d[1:], [2.5, 97.5]).tolist()}

    def cell(key: str, row: dict, m: str, fmt: str = ".3f") -> str:
        s = f"{row[m]:{fmt}} [{row[m + ' ci'][0]:{fmt}}, {row[m + ' ci'][1]:{fmt}}]"
        if not key.endswith("R=0 a"):
            lo, hi = row[f"{m} minus R=0 ci"]
            s += f"; {row[m + ' minus R=0']:+.3f} [{lo:+.3f}, {hi:+.3f}]"
        return s

    print(f"\n{res['experiments']} experiments per row; means over experiments [95 % CI, class bootstrap]; "
          f"'; +x [lo, hi]' = minus R = 0 (same experiments and resamples). Calibrated at known precision {PRECISION} "
          f"on the calibration photos, score outlier-ratio.\n")
    print("| encoder | R | outlier refs | top-1 known | AUROC distance | AUROC outlier-ratio | known accepted | "
          "realised precision | oracle accepted |\n|---|---|---|---|---|---|---|---|---|")
    for key, row in res["rows"].items():
        enc, r, v = key.split()
        print(f"| {enc} | {r[2:]} | {dict(a='packshots', b='packshots + R photos', c='packshots, CSLS')[v]} | " + " | ".join(
            cell(key, row, m) for m in metrics) + f" | {row['oracle']:.3f} |")
    print("\n(b) minus (a), AUROC outlier-ratio: " + "; ".join(
        f"{k} {v['difference']:+.3f} [{v['ci'][0]:+.3f}, {v['ci'][1]:+.3f}]" for k, v in res["b_minus_a"].items()))
    print(f"\nquestion 4: threshold with a one-sided {CONFIDENCE:g} lower bound >= {PRECISION} (confident) vs the "
          f"current one, outlier-ratio, packshot outlier references\n")
    print("| encoder | R | current: known accepted | realised precision | confident: known accepted | realised precision |\n"
          "|---|---|---|---|---|---|")
    q4 = True
    for enc in ("raw", "finetuned"):
        for r in PER_SKU:
            row = res["rows"][f"{enc} R={r} a"]
            print(f"| {enc} | {r} | " + " | ".join(cell(f"{enc} R={r} a", row, m).split(";")[0] for m in
                                                   ("accepted", "precision", "accepted confident", "precision confident")) + " |")
            if enc == "finetuned" and r in (0, 2):
                q4 &= row["precision confident"] >= PRECISION and row["accepted confident"] >= 0.5 * row["accepted"]
    res["question_4_confident_default"] = bool(q4)
    print("\nhigher calibration targets (descriptive, no rule), finetuned encoders, outlier-ratio, packshot outlier "
          "references: known accepted / realised precision\n")
    print("| R | " + " | ".join(f"target {t:g}" for t in (PRECISION, *HIGHER_TARGETS)) + " |\n|---|" + "---|" * (1 + len(HIGHER_TARGETS)))
    for r in PER_SKU:
        row = res["rows"][f"finetuned R={r} a"]
        cells = [f"{row['accepted']:.3f} / {row['precision']:.3f}"] + [
            f"{row[f'accepted target {t:g}']:.3f} / {row[f'precision target {t:g}']:.3f} "
            f"[{row[f'precision target {t:g} ci'][0]:.3f}, {row[f'precision target {t:g} ci'][1]:.3f}]" for t in HIGHER_TARGETS]
        print(f"| {r} | " + " | ".join(cells) + " |")
    print(f"question 4 (confident threshold as calibrate's default): {'met' if q4 else 'not met'}")
    print("\nerrors among the accepted evaluation photos, finetuned encoders, variant (a), pooled over the experiments "
          "(descriptive, added after the second run)\n")
    print("| R | target | accepted | errors: known photo named wrong / unknown photo | nearest reference an in-store photo: "
          "errors / right ones |\n|---|---|---|---|---|")
    res["errors"] = {}
    for r in PER_SKU:
        for target in (PRECISION, HIGHER_TARGETS[-1]):
            n = np.zeros(6, int)
            for e in rows[("finetuned", r, "a")]:
                ev = e["ev"]
                acc = ev["outlier-ratio"] <= calibrated_threshold(e["cal"], "outlier-ratio", target)
                wrong = ~ev["right"]
                n += [acc.sum(), (acc & ev["known"] & wrong).sum(), (acc & ~ev["known"]).sum(), (acc & wrong & ev["in-store"]).sum(),
                      (acc & ~wrong & ev["in-store"]).sum(), (acc & ~wrong).sum()]
            res["errors"][f"R={r} target {target:g}"] = n.tolist()
            print(f"| {r} | {target:g} | {n[0]} | {n[1]} / {n[2]} | {n[3]} of {n[1] + n[2]} / {n[4]} of {n[5]} |")
    q1 = [r for r in PER_SKU[1:] if res["rows"][f"finetuned R={r} a"]["accepted"] >= GOAL_ACCEPTED
          and res["rows"][f"finetuned R={r} a"]["precision"] >= PRECISION]
    q2 = res["b_minus_a"]["finetuned R=2"]["ci"][0] > 0
    res["question_1_smallest_r"] = q1[0] if q1 else None
    res["question_2_b_advised"] = bool(q2)
    print(f"question 1 (operating point >= {GOAL_ACCEPTED} accepted at realised precision >= {PRECISION}): "
          + (f"reached at R = {q1[0]}" if q1 else "not reached at R = 1 or 2"))
    print(f"question 2 (in-store outlier references): {'advised' if q2 else 'not advised'}")
    q5 = {}
    for m in ("precision", "auroc outlier-ratio", "accepted", "top1"):
        d = boot[("finetuned", 2, "c")][m] - boot[("finetuned", 2, "a")][m]
        q5[m] = {"difference": float(d[0]), "ci": np.nanpercentile(d[1:], [2.5, 97.5]).tolist()}
    res["question_5"] = q5
    res["question_5_csls_advised"] = bool(q5["precision"]["ci"][0] > 0 and q5["auroc outlier-ratio"]["ci"][0] >= -0.01)
    print("question 5 (CSLS minus plain, finetuned, R = 2): " + "; ".join(
        f"{m} {v['difference']:+.3f} [{v['ci'][0]:+.3f}, {v['ci'][1]:+.3f}]" for m, v in q5.items())
        + f"; {'advised' if res['question_5_csls_advised'] else 'not advised'}")
    res["seconds"] = round(time.perf_counter() - start, 1)
    print(f"\n{res['seconds']} s")
    if args.json:
        args.json.write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
