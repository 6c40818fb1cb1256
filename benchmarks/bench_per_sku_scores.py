"""Per-SKU open-set scores (issue 14, item 3: "per-SKU thresholds from the distances of each
SKU's own views and neighbours"), by class-disjoint cross-validation on GroceryStore's **train**
split with capture-session photo folds.  Val and test are never read.

    python3 benchmarks/bench_per_sku_scores.py --runs /tmp/i14-cv-all /tmp/i14-cv-all-s1 /tmp/i14-cv-all-s2 \
        [--recipes iconic12-decay0.9,iconic12-decay0.9-oe0.25] [--json OUT.json]

Encoders: the raw ImageNet MobileNetV2 and, per recipe of ``--recipes``, the finetuned fold
encoders of the three replicate 81-class, 3-fold class-disjoint CVs of
``benchmarks/bench_loop_recipe.py --classes all`` (``RUN/fold*/RECIPE/encoder.safetensors``; their
raw features of every packshot and train photo are cached as
``CACHE/finetuned/RUN-foldF-RECIPE.npy``, :func:`bench_pseudo_references.fold_features`).
Features centred on every 6th train photo of the fold's training classes, unlabeled, as the
loop's catalogs are.

One experiment per (replicate, class fold, known half, photo side), 4 per fold encoder, as
examples/retailklip_loop.py splits its held-out classes: the fold's held-out classes are split by
coarse class into *known* (their packshots are the catalog) and *unknown*
(:func:`retailklip.protocol.class_disjoint_folds`, k = 2; both halves take the known role in
turn), the unknown ones again into calibration and evaluation classes; the held-out classes'
photos are dealt into calibration and evaluation photos by capture session
(:func:`retailklip.protocol.session_folds` over :func:`~retailklip.protocol.capture_groups`,
k = 2; both sides take the calibration role in turn), so no evaluation photo has a near-copy
among the calibration photos.  The fold's training classes' packshots are the *outlier
references*, as in the loop.

Scores, higher = more likely unknown, of a photo x whose 1-NN SKU is s (d(x, s): cosine distance
to s's packshot; d_out(x): to the nearest outlier reference):

* ``distance`` d(x, s); ``outlier-ratio`` d(x, s) / d_out(x), the shipped score;
* ``z-outliers`` (Z-norm, SKU side: Auckenthaler, Carey & Lloyd-Thomas, "Score normalization for
  text-independent speaker verification systems", DSP 10, 2000, §2.2): (d(x, s) - m_s) / sd_s,
  with m_s, sd_s the mean and standard deviation of the distances from s's packshot to the
  outlier references (an impostor cohort the catalog already holds; no photo, no label);
* ``t-outliers`` (T-norm, query side, ibid. §2.3): (d(x, s) - m_x) / sd_x over the distances
  from x to the outlier references; ``s-outliers`` = z + t (symmetric normalisation);
* ``scale-cal distance`` / ``scale-cal outlier-ratio``: the score divided by its median over the
  calibration photos *of s* (genuine scores: their score taken against s), the global median
  of genuine scores where s has fewer than 3 calibration photos -- a per-SKU threshold from the
  SKU's own photos, as one global threshold on a per-SKU-scaled score;
* ``z-cal distance`` / ``z-cal outlier-ratio``: Z-norm with the calibration photos *not* of s
  (other known SKUs' and the calibration-unknown classes' photos, scores taken against s) as
  s's impostor cohort -- a per-SKU threshold from the SKU's neighbours.

Reported per encoder and score: AUROC known vs unknown on the evaluation photos (mean over the
experiments); its paired difference to the shipped ``outlier-ratio`` with a 95 % interval from a
bootstrap over *classes* (all of a class's photos move together, in every experiment: the
open-set AUROC depends on which classes are known, and the replicates reuse the same photos);
the calibrated operating point: the threshold at known precision >= 0.9 on the calibration
photos (:func:`retailklip.calibration.threshold_for_precision`) judged on the evaluation photos
(known photos accepted, known precision), and the oracle (the same read off the evaluation
photos themselves).  Rule fixed before the run: a score replaces ``outlier-ratio`` only if its
AUROC difference on the shipped recipe's fold encoders is positive with the interval excluding zero even at
the Bonferroni level for the 7 new scores (99.3 %).  With several recipes, each later one is
compared with the first on every score (paired: same experiments, same class resamples), e.g.
Outlier Exposure in the finetune (docs/finetune.md, "Sixth round").

``competitor-ratio`` (added 2026-12-07, rule fixed before its run): d(x, s) / min(d2(x),
d_out(x)), d2 the runner-up SKU's distance -- the nearest-neighbour distance ratio of the
open-set NNDR classifier (Mendes Junior et al., Machine Learning 106, 2017, §3) with the outlier
products counted as classes: one score for both ways a photo is wrongly accepted (an unknown
product near an outlier, a known one near another SKU).  One candidate; it replaces
``outlier-ratio`` as ``catalog calibrate``'s default only if, on the shipped loop's encoders at the
catalog's embedding (``--recipes iconic12-decay0.9-stage --feature-stage``: "iconic12-decay0.9-stage
+stage"), (1) its AUROC difference to ``outlier-ratio`` has a 95 % class-bootstrap lower bound of at
least -0.01, (2) at the calibrated precision-0.9 threshold it accepts more known photos, the 95 %
interval of the difference above zero, and (3) its realised precision is at most 0.02 lower.  ``--feature-stage``: every
encoder also as "ENCODER +stage", its pooled embedding next to its last stage's (the encoder
option ``feature_stage=["pooled", -1]``, each part centred and normalised on its own), compared
with the pooled embedding alone (docs/finetune.md, "Seventh round"), and each later recipe's
"+stage" encoder with the first's (the loop's catalogs embed so: "Eighth round").

``fused`` (added 2026-12-07, next stop; rule fixed before its run): linear logistic-regression
score fusion (Brummer et al., "Fusion of heterogeneous speaker recognition systems in the STBU
submission for the NIST SRE 2006", IEEE TASLP 15(7), 2007, §3; the FoCal fusion): the features
(log d(x, s), log d_out(x), log d2(x)), standardised on the calibration photos, weighted by a
logistic regression fitted on the calibration photos (target: the photo is known *and* its 1-NN
SKU is its own, the event the precision goal counts; L2 penalty 1e-2 on the weights, not the
intercept; :func:`scipy.optimize.minimize`, L-BFGS-B), score = minus the fitted log-odds.  It
contains the shipped score (weights 1, -1, 0 give log of the outlier-ratio) and learns how much
the runner-up SKU adds, per catalog, from photos ``catalog calibrate`` already takes.  One
candidate; the same three conditions as ``competitor-ratio``'s, on the same encoder, decide
whether it replaces ``outlier-ratio`` (threshold again chosen on the calibration photos the
fusion was fitted on: the product would do the same).
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

from bench_defaults_cv import SHARED, cached_features, normalise
from bench_loop_recipe import oracle_known_accepted, run_seed
from bench_pseudo_references import fold_features

from retailklip.calibration import CalibrationError, threshold_for_precision
from retailklip.datasets import read_grocery_store
from retailklip.open_set import outlier_ratio
from retailklip.protocol import capture_groups, class_disjoint_folds, session_folds

SCORES = ("distance", "outlier-ratio", "z-outliers", "t-outliers", "s-outliers", "scale-cal distance",
          "scale-cal outlier-ratio", "z-cal distance", "z-cal outlier-ratio", "competitor-ratio", "fused")
SHIPPED = "outlier-ratio"
CANDIDATES = ("competitor-ratio", "fused")  # each judged by the rule of the module docstring
FUSION_L2 = 1e-2
MIN_GENUINE = 3
PRECISION = 0.9


def _z(v: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    return v.mean(axis), np.maximum(v.std(axis), 1e-6)


def fit_fusion(f: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Logistic regression of ``target`` on standardised features (the ``fused`` score).

    Args:
        f: float (N, F) features of the calibration photos; target: bool (N,).

    Returns:
        (mean (F,), scale (F,), weights (F + 1,): intercept first); the log-odds of a photo with
        features g is ``weights[0] + ((g - mean) / scale) @ weights[1:]``.
    """
    from scipy.optimize import minimize

    mean, scale = f.mean(0), np.maximum(f.std(0), 1e-9)
    z = np.c_[np.ones(len(f)), (f - mean) / scale]
    y = np.where(target, 1.0, -1.0)

    def loss(w):
        m = y * (z @ w)
        nll = np.logaddexp(0.0, -m).sum()
        grad = -(z * (y * np.exp(-np.logaddexp(0.0, m)))[:, None]).sum(0)
        return nll + FUSION_L2 * (w[1:] ** 2).sum(), grad + 2 * FUSION_L2 * np.r_[0.0, w[1:]]

    return mean, scale, minimize(loss, np.zeros(z.shape[1]), jac=True, method="L-BFGS-B").x


def experiment(x: np.ndarray, labels: np.ndarray, known: list[str], gallery: np.ndarray, outliers: np.ndarray,
               cal: np.ndarray, ev: np.ndarray) -> dict[str, dict[str, np.ndarray]]:
    """Scores of one experiment (module docstring).

    Args:
        x: float (N, D) unit embeddings of the photos; labels: (N,) their classes.
        known: the catalog's SKUs; gallery: (len(known), D) their packshots' unit embeddings;
        outliers: (O, D) unit embeddings of the outlier references.
        cal, ev: indices of the calibration and evaluation photos (of known and unknown classes).

    Returns:
        {"cal" | "ev": {"known", "right", "class", and every score of :data:`SCORES`}}.
    """
    kidx = {c: i for i, c in enumerate(known)}
    d_all = 1.0 - x @ gallery.T  # (N, K)
    d_out_all = 1.0 - x @ outliers.T  # (N, O)
    d_out = d_out_all.min(1)
    ratio_all = outlier_ratio(d_all, np.broadcast_to(d_out[:, None], d_all.shape))  # (N, K), the shipped score
    pack_m, pack_sd = _z(1.0 - gallery @ outliers.T, 1)  # (K,) per SKU, outlier cohort
    t_m, t_sd = _z(d_out_all, 1)  # (N,) per photo
    # calibration statistics per SKU: genuine (its own photos) and impostor (every other calibration photo)
    lab_cal = labels[cal]
    own = lab_cal[:, None] == np.array(known)[None, :]  # (C, K)
    stats = {}
    for name, m in (("distance", d_all[cal]), ("outlier-ratio", ratio_all[cal])):
        glob = float(np.median(m[own]))
        scale = np.array([np.median(m[own[:, j], j]) if own[:, j].sum() >= MIN_GENUINE else glob for j in range(len(known))])
        im = np.array([m[~own[:, j], j].mean() for j in range(len(known))])
        isd = np.array([max(m[~own[:, j], j].std(), 1e-6) for j in range(len(known))])
        stats[name] = (scale, im, isd)
    out = {}
    for side, idx in (("cal", cal), ("ev", ev)):
        s = d_all[idx].argmin(1)
        d1 = d_all[idx, s]
        r1 = ratio_all[idx, s]
        d2 = np.partition(d_all[idx], 1, axis=1)[:, 1] if d_all.shape[1] > 1 else np.full(len(idx), 2.0)
        z = (d1 - pack_m[s]) / pack_sd[s]
        t = (d1 - t_m[idx]) / t_sd[idx]
        lab = labels[idx]
        k = np.array([c in kidx for c in lab])
        res = {"known": k, "right": k & (np.array(known)[s] == lab), "class": lab,
               "distance": d1, "outlier-ratio": r1, "z-outliers": z, "t-outliers": t, "s-outliers": z + t,
               "competitor-ratio": outlier_ratio(d1, np.minimum(d2, d_out[idx])),
               "features": np.log(np.maximum(np.c_[d1, d_out[idx], d2], 1e-6))}
        for name, v in (("distance", d1), ("outlier-ratio", r1)):
            scale, im, isd = stats[name]
            res[f"scale-cal {name}"] = v / scale[s]
            res[f"z-cal {name}"] = (v - im[s]) / isd[s]
        out[side] = res
    mean, scale, w = fit_fusion(out["cal"]["features"], out["cal"]["right"])
    for res in out.values():
        res["fused"] = -(w[0] + ((res.pop("features") - mean) / scale) @ w[1:])
    out["fusion_weights"] = w
    return out


def operating_point(cal: dict, ev: dict, score: str) -> tuple[float, float, float]:
    """(calibrated known accepted, calibrated known precision, oracle known accepted) at PRECISION."""
    oracle = oracle_known_accepted(ev[score], ev["right"], ev["known"], PRECISION)
    accepted = ev[score] <= calibrated_threshold(cal, score)
    precision = float(ev["right"][accepted].mean()) if accepted.any() else float("nan")
    return float(accepted[ev["known"]].mean()), precision, oracle


def calibrated_threshold(cal: dict, score: str, target: float = PRECISION) -> float:
    """The threshold at known precision >= ``target`` on the calibration photos (-inf if none)."""
    try:
        return threshold_for_precision(cal[score], cal["right"], target)
    except CalibrationError:
        return -np.inf


def weighted_point_rows(ev: dict, score: str, t: float, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(known photos accepted, precision of the accepted) at threshold ``t``, one of each per row
    of photo weights ``w`` (B, n): float64 (B,) each, NaN where a row weights no known / no
    accepted photo."""
    acc = ev[score] <= t
    w = np.asarray(w, np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (w * (acc & ev["known"])).sum(1) / (w * ev["known"]).sum(1), (w * (acc & ev["right"])).sum(1) / (w * acc).sum(1)


def weighted_point(ev: dict, score: str, t: float, w: np.ndarray) -> tuple[float, float]:
    """:func:`weighted_point_rows` for one row of photo weights ``w`` (n,)."""
    accepted, precision = weighted_point_rows(ev, score, t, np.asarray(w)[None])
    return float(accepted[0]), float(precision[0])


def weighted_auroc_rows(score: np.ndarray, known: np.ndarray, w: np.ndarray) -> np.ndarray:
    """AUROC known vs unknown (known = lower score; ties count 1/2) for each row of photo weights.

    Args:
        score: float (n,); known: bool (n,); w: (B, n) non-negative weights (class-bootstrap
        counts; all ones = the plain AUROC).

    Returns:
        float64 (B,), NaN where a row weights no known or no unknown photo.
    """
    order = np.argsort(score, kind="stable")
    s, k, w = score[order], known[order], np.asarray(w)[:, order].astype(np.float64)
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])  # tie groups of the sorted scores
    gk = np.add.reduceat(w * k, starts, axis=1)
    gu = np.add.reduceat(w * ~k, starts, axis=1)
    below = np.cumsum(gk, axis=1) - gk  # known weight strictly below each group
    with np.errstate(invalid="ignore", divide="ignore"):
        return (gu * (below + 0.5 * gk)).sum(1) / (gk.sum(1) * gu.sum(1))


def weighted_auroc(score: np.ndarray, known: np.ndarray, w: np.ndarray) -> float:
    """:func:`weighted_auroc_rows` for one row of photo weights ``w`` (n,)."""
    return float(weighted_auroc_rows(score, known, np.asarray(w)[None])[0])


def train_split(data: Path, cache: Path):
    """GroceryStore's train split as these benchmarks use it: (class names, class -> coarse class,
    items = every packshot then every train photo by class (path, view 0), labels (N,) of the
    photos, raw ImageNet MobileNetV2 features (81 + N, D) float64, capture groups (N,) of the
    photos)."""
    store = read_grocery_store(data)
    names = [c.name for c in store.classes]
    coarse = {c.name: c.coarse_name for c in store.classes}
    photos = defaultdict(list)
    for ph in store.photos("train"):
        photos[ph.label].append(ph.path)
    items = [(c.iconic, 0) for c in store.classes] + [(q, 0) for c in names for q in photos[c]]
    labels = np.array([c for c in names for _ in photos[c]])
    raw = cached_features("bilinear", items, cache, options={"interpolation": "bilinear"}).astype(np.float64)
    return names, coarse, items, labels, raw, capture_groups(raw[len(names):], labels.tolist())


def known_unknown(test: list[str], half, seed: int, coarse: dict[str, str]) -> tuple[list[str], list[str], list[str]]:
    """One half of a class fold's held-out classes as the catalog (known), the other split again
    by coarse class into calibration and evaluation unknowns: (known, unknown_cal, unknown_ev)."""
    known, unknown = [test[i] for i in half.train], [test[i] for i in half.test]
    u = class_disjoint_folds(unknown, k=2, seed=seed, groups=[coarse[c] for c in unknown])[0]
    return known, [unknown[i] for i in u.train], [unknown[i] for i in u.test]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=SHARED / "data" / "grocery-store")
    p.add_argument("--runs", type=Path, nargs="+", required=True, help="bench_loop_recipe.py --classes all outputs")
    p.add_argument("--recipes", default="iconic12-decay0.9",
                   help="fold encoders' recipes, comma-separated; the first is the reference of the encoder comparison")
    p.add_argument("--cache", type=Path, default=Path("/tmp/cv-cache"))
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--feature-stage", action="store_true",
                   help='also every encoder with feature_stage=["pooled", -1] (pooled + last stage)')
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    recipes = args.recipes.split(",")
    start = time.perf_counter()
    names, coarse, items, labels, raw, groups = train_split(args.data, args.cache)
    raw_stage = cached_features("bilinear-stage-1", items, args.cache, options={"interpolation": "bilinear", "feature_stage": -1}
                                ).astype(np.float64) if args.feature_stage else None
    sides = session_folds(labels.tolist(), groups, k=2, seed=0)[0]
    side_of = np.zeros(len(labels), int)
    side_of[sides.test] = 1
    rows: dict[str, list[dict]] = defaultdict(list)  # encoder -> experiments
    widths: dict[str, list[int]] = {}  # encoder -> part widths, for the "+stage" concatenations
    for run in args.runs:
        seed = run_seed(run) or 0
        for f in class_disjoint_folds(names, k=3, seed=seed, groups=[coarse[c] for c in names]):
            test, train = [names[i] for i in f.test], [names[i] for i in f.train]
            encoders = {"raw": raw, **{r: fold_features(run, f.index, r, [q for q, _ in items], args.cache) for r in recipes}}
            if args.feature_stage:
                stage = {"raw": raw_stage, **{r: fold_features(run, f.index, r, [q for q, _ in items], args.cache,
                                                               feature_stage=-1) for r in recipes}}
                for e in list(encoders):
                    encoders[f"{e} +stage"] = np.concatenate([encoders[e], stage[e]], 1)
                    widths[f"{e} +stage"] = [encoders[e].shape[1], stage[e].shape[1]]
            centre_rows = np.flatnonzero(np.isin(labels, train))[::6]
            halves = class_disjoint_folds(test, k=2, seed=seed, groups=[coarse[c] for c in test])
            for enc_name, feats in encoders.items():
                x_all = normalise(feats, feats[len(names) + centre_rows].mean(0), widths.get(enc_name, 1))
                pack, x = x_all[: len(names)], x_all[len(names):]
                outliers = pack[[names.index(c) for c in train]]
                for h in halves:
                    known, u_cal, u_ev = known_unknown(test, h, seed, coarse)
                    gallery = pack[[names.index(c) for c in known]]
                    kn = np.isin(labels, known)
                    for cal_side in (0, 1):
                        cal = np.flatnonzero((side_of == cal_side) & (kn | np.isin(labels, u_cal)))
                        ev = np.flatnonzero((side_of != cal_side) & (kn | np.isin(labels, u_ev)))
                        rows[enc_name].append(experiment(x, labels, known, gallery, outliers, cal, ev))
        print(f"{run}: done, {time.perf_counter() - start:.0f} s", flush=True)

    cls = np.array(sorted(names))
    res: dict = {"experiments": len(rows["raw"]), "photos_per_experiment": float(np.mean([len(e["ev"]["known"]) for e in rows["raw"]])),
                 "encoders": {}}
    boot_of, full_of = {}, {}
    for enc_name, exps in rows.items():
        rng = np.random.default_rng(0)  # the same class resamples for every encoder: paired differences
        point = {sc: np.array([operating_point(e["cal"], e["ev"], sc) for e in exps]) for sc in SCORES}
        full = {sc: np.array([weighted_auroc(e["ev"][sc], e["ev"]["known"], np.ones(len(e["ev"]["known"]), int)) for e in exps])
                for sc in SCORES}
        boots = {sc: [] for sc in SCORES}
        class_ix = [np.searchsorted(cls, e["ev"]["class"]) for e in exps]  # cls is sorted
        rule_scores = (SHIPPED, *CANDIDATES)
        thresholds = {sc: [calibrated_threshold(e["cal"], sc) for e in exps] for sc in rule_scores}
        point_boot = {sc: [] for sc in rule_scores}  # (accepted, precision) means per resample
        for _ in range(args.bootstrap):
            count = np.bincount(rng.integers(0, len(cls), len(cls)), minlength=len(cls))
            for sc in SCORES:
                boots[sc].append(np.nanmean([weighted_auroc(e["ev"][sc], e["ev"]["known"], count[ci])
                                             for e, ci in zip(exps, class_ix)]))
            for sc in rule_scores:
                pts = np.array([weighted_point(e["ev"], sc, t, count[ci])
                                for e, ci, t in zip(exps, class_ix, thresholds[sc])])
                point_boot[sc].append(np.nanmean(pts, axis=0))
        table = {}
        for sc in SCORES:
            b = np.array(boots[sc])
            diff = b - np.array(boots[SHIPPED])
            table[sc] = {
                "auroc": float(np.mean(full[sc])), "auroc_ci": np.nanpercentile(b, [2.5, 97.5]).tolist(),
                "minus_shipped": float(np.mean(full[sc]) - np.mean(full[SHIPPED])),
                "minus_shipped_ci": np.nanpercentile(diff, [2.5, 97.5]).tolist(),
                "minus_shipped_ci_bonferroni": np.nanpercentile(diff, [0.05 / 14 * 100, 100 - 0.05 / 14 * 100]).tolist(),
                "experiments_above_shipped": int((full[sc] > full[SHIPPED]).sum()),
                "calibrated_known_accepted": float(point[sc][:, 0].mean()),
                "calibrated_known_precision": float(np.nanmean(point[sc][:, 1])),
                "oracle_known_accepted": float(point[sc][:, 2].mean()),
                "oracle_max": float(point[sc][:, 2].max()),
            }
        pb = {sc: np.array(v) for sc, v in point_boot.items()}
        for sc in rule_scores:  # does the calibrated threshold deliver the precision it was chosen for?
            table[sc]["calibrated_known_accepted_ci"] = np.nanpercentile(pb[sc][:, 0], [2.5, 97.5]).tolist()
            table[sc]["calibrated_known_precision_ci"] = np.nanpercentile(pb[sc][:, 1], [2.5, 97.5]).tolist()
        for cand in CANDIDATES:
            d_acc = pb[cand][:, 0] - pb[SHIPPED][:, 0]
            d_prec = pb[cand][:, 1] - pb[SHIPPED][:, 1]
            c = table[cand]
            c["accepted_minus_shipped"] = c["calibrated_known_accepted"] - table[SHIPPED]["calibrated_known_accepted"]
            c["accepted_minus_shipped_ci"] = np.nanpercentile(d_acc, [2.5, 97.5]).tolist()
            c["precision_minus_shipped"] = c["calibrated_known_precision"] - table[SHIPPED]["calibrated_known_precision"]
            c["precision_minus_shipped_ci"] = np.nanpercentile(d_prec, [2.5, 97.5]).tolist()
            c["rule_met"] = bool(c["minus_shipped_ci"][0] >= -0.01 and c["accepted_minus_shipped_ci"][0] > 0
                                 and c["precision_minus_shipped"] >= -0.02)
        table["fused"]["weights_mean"] = np.mean([e["fusion_weights"] for e in exps], 0).tolist()
        res["encoders"][enc_name] = table
        boot_of[enc_name], full_of[enc_name] = {k: np.array(v) for k, v in boots.items()}, full
        print(f"\n{enc_name} encoder: {len(exps)} experiments, about {res['photos_per_experiment']:.0f} evaluation photos each; "
              f"AUROC known vs unknown (mean over experiments, 95 % CI: bootstrap over classes); at known precision "
              f">= {PRECISION} on the calibration photos: known photos accepted / known precision on the evaluation photos; oracle")
        print("\n| score | AUROC | minus outlier-ratio [95 % CI] | experiments above | calibrated: known accepted | "
              "known precision | oracle known accepted (mean, max) |\n|---|---|---|---|---|---|---|")
        for sc, r in table.items():
            print(f"| {sc} | {r['auroc']:.3f} [{r['auroc_ci'][0]:.3f}, {r['auroc_ci'][1]:.3f}] | "
                  f"{r['minus_shipped']:+.3f} [{r['minus_shipped_ci'][0]:+.3f}, {r['minus_shipped_ci'][1]:+.3f}] | "
                  f"{r['experiments_above_shipped']}/{len(exps)} | {r['calibrated_known_accepted']:.3f} | "
                  f"{r['calibrated_known_precision']:.3f} | {r['oracle_known_accepted']:.3f}, {r['oracle_max']:.3f} |")
        for cand in CANDIDATES:
            c = table[cand]
            print(f"\n{cand} minus outlier-ratio at precision {PRECISION} calibrated [95 % CI, class bootstrap]: "
                  f"known accepted {c['accepted_minus_shipped']:+.3f} [{c['accepted_minus_shipped_ci'][0]:+.3f}, "
                  f"{c['accepted_minus_shipped_ci'][1]:+.3f}], precision {c['precision_minus_shipped']:+.3f} "
                  f"[{c['precision_minus_shipped_ci'][0]:+.3f}, {c['precision_minus_shipped_ci'][1]:+.3f}]; rule "
                  f"{'met' if c['rule_met'] else 'not met'} (it counts on the shipped recipe's encoder at the catalog's "
                  f"embedding only)")
        print(f"calibrated at precision {PRECISION} [95 % CI, class bootstrap]: " + "; ".join(
            f"{sc}: known accepted {table[sc]['calibrated_known_accepted']:.3f} "
            f"[{table[sc]['calibrated_known_accepted_ci'][0]:.3f}, {table[sc]['calibrated_known_accepted_ci'][1]:.3f}], "
            f"realised precision {table[sc]['calibrated_known_precision']:.3f} "
            f"[{table[sc]['calibrated_known_precision_ci'][0]:.3f}, {table[sc]['calibrated_known_precision_ci'][1]:.3f}]"
            for sc in rule_scores))
        w = table["fused"]["weights_mean"]
        print(f"fused: mean weights over the experiments, intercept {w[0]:+.2f}, log d {w[1]:+.2f}, "
              f"log d_out {w[2]:+.2f}, log d2 {w[3]:+.2f} (standardised features; positive = more likely right)")
    pairs = [(r, recipes[0]) for r in recipes[1:]]
    if args.feature_stage:
        pairs += [(f"{e} +stage", e) for e in ("raw", *recipes)]
        pairs += [(f"{r} +stage", f"{recipes[0]} +stage") for r in recipes[1:]]  # recipes at the catalog's embedding
    if pairs:  # encoders compared on one score, paired by experiment and class resample
        print("\nencoders against their reference (same experiments, same class resamples; AUROC difference [95 % CI])\n")
        print("| encoder | reference | " + " | ".join(SCORES) + " |\n|---|---|" + "---|" * len(SCORES))
        res["recipes_minus_reference"] = {}
        for r, ref in pairs:
            cells, out = [], {}
            for sc in SCORES:
                d = boot_of[r][sc] - boot_of[ref][sc]
                m = float(np.mean(full_of[r][sc]) - np.mean(full_of[ref][sc]))
                ci = np.nanpercentile(d, [2.5, 97.5]).tolist()
                out[sc] = {"difference": m, "ci": ci}
                cells.append(f"{m:+.3f} [{ci[0]:+.3f}, {ci[1]:+.3f}]")
            res["recipes_minus_reference"][r] = out
            print(f"| {r} | {ref} | " + " | ".join(cells) + " |")
    res["seconds"] = round(time.perf_counter() - start, 1)
    print(f"\n{res['seconds']} s")
    if args.json:
        args.json.write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
