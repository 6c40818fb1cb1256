"""Should ``catalog calibrate`` default to the outlier-ratio when a catalog has outlier references?
Re-analysis of the class-disjoint cross-validation of ``benchmarks/bench_loop_recipe.py``
(its ``OUT/open.json``: per fold, per photo, the open-set scores of each encoder; the loop's 46
**training** classes only, 2 folds by coarse class; the loop's held-out classes, val and test are
never read).  Nothing is recomputed from images: this reads the stored per-photo arrays.

    python3 benchmarks/bench_outlier_default.py --open /tmp/i14-cv/open.json [--encoders raw,iconic-decay0.9]

Two comparisons of ``outlier-ratio`` (the bench's ``neg-packshots``: d1 / distance to the nearest
training-class packshot, :func:`retailklip.open_set.outlier_ratio`) with ``ratio`` (today's default
of ``catalog calibrate``) and ``distance``:

1. AUROC known vs unknown, mean of the two folds, and its paired difference with a percentile
   bootstrap interval over photos (resampled with their fold), as the bench computes it.
2. Operating points *transferred across folds*: a threshold chosen on one fold's photos
   (:func:`retailklip.calibration.threshold_for_unknown_rejection` at 0.9, or
   :func:`~retailklip.calibration.threshold_for_precision` at 0.7 / 0.9) and applied to the other
   fold's photos (other classes, another finetuned encoder), both directions pooled.  Per photo,
   "decision right" = a known photo accepted and named right, or an unknown photo rejected;
   McNemar's exact test against ``ratio`` and ``distance``.  A target no threshold reaches on
   the calibration fold rejects every photo of the other fold (what ``catalog calibrate``'s
   failure leaves: the previous threshold, here taken as "reject all").
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retailklip.calibration import CalibrationError, auroc, threshold_for_precision, threshold_for_unknown_rejection
from retailklip.protocol import bootstrap_statistic, mcnemar

#: bench_loop_recipe.py's score names -> this package's.
SCORES = {"distance": "distance", "ratio": "ratio", "neg-packshots": "outlier-ratio"}
TARGETS = (("unknown rejection", 0.9), ("precision", 0.7), ("precision", 0.9))


def fold_auroc(score: np.ndarray, known: np.ndarray, fold: np.ndarray) -> float:
    """Mean over folds of AUROC known vs unknown (known = low score)."""
    return float(np.mean([auroc(-score[(fold == f) & known], -score[(fold == f) & ~known]) for f in np.unique(fold)]))


def transferred(parts: list[dict], score: str, kind: str, target: float) -> dict:
    """Operating point chosen on one fold, applied to the other (module docstring, 2.)."""
    right_all, known_acc, prec, rej, reached = [], [], [], [], 0
    for cal, app in ((0, 1), (1, 0)):
        c, a = parts[cal], parts[app]
        xc, xa = np.asarray(c[f"score:{score}"], float), np.asarray(a[f"score:{score}"], float)
        kc, ka = np.asarray(c["known"], bool), np.asarray(a["known"], bool)
        rc, ra = np.asarray(c["right"], bool), np.asarray(a["right"], bool)
        try:
            t = (threshold_for_unknown_rejection(xc, kc, target) if kind == "unknown rejection"
                 else threshold_for_precision(xc, rc, target))
        except CalibrationError:
            right_all.append(~ka)
            continue
        reached += 1
        acc = xa <= t
        right_all.append((ra & acc) | (~ka & ~acc))
        known_acc.append(float(acc[ka].mean()))
        rej.append(float((~acc[~ka]).mean()))
        if acc.any():
            prec.append(float(ra[acc].mean()))
    return {"reached": reached, "known_accepted": float(np.mean(known_acc)) if known_acc else None,
            "known_precision": float(np.mean(prec)) if prec else None,
            "unknown_rejection": float(np.mean(rej)) if rej else None,
            "decision_right": np.concatenate(right_all)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--open", type=Path, required=True, help="OUT/open.json of benchmarks/bench_loop_recipe.py")
    p.add_argument("--encoders", default="raw,iconic-decay0.9", help="comma-separated recipes of open.json")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    data = json.loads(args.open.read_text())
    res: dict = {}
    for enc in args.encoders.split(","):
        parts = data[enc]
        fold = np.concatenate([np.full(len(x["known"]), i) for i, x in enumerate(parts)])
        cat = {k: np.concatenate([np.asarray(x[k]) for x in parts]) for k in ("known", *(f"score:{s}" for s in SCORES))}
        known = cat["known"].astype(bool)
        out = res[enc] = {"photos": int(len(known)), "known": int(known.sum()), "auroc": {}, "transferred": {}}
        x = cat["score:neg-packshots"]
        for s, name in SCORES.items():
            out["auroc"][name] = fold_auroc(cat[f"score:{s}"], known, fold)
            if s != "neg-packshots":
                d = bootstrap_statistic(lambda a, b, k, f: fold_auroc(a, k, f) - fold_auroc(b, k, f),
                                        x, cat[f"score:{s}"], known, fold)
                out["auroc"][f"outlier-ratio - {name}"] = {"mean": d.mean, "low": d.low, "high": d.high}
        print(f"## {enc}: {out['photos']} photos ({out['known']} known), 2 class-disjoint folds\n")
        print("| | AUROC | outlier-ratio minus it [95 % CI] |\n|---|---|---|")
        for s, name in SCORES.items():
            diff = out["auroc"].get(f"outlier-ratio - {name}")
            dtxt = f"{diff['mean']:+.3f} [{diff['low']:+.3f}, {diff['high']:+.3f}]" if diff else "-"
            print(f"| {name} | {out['auroc'][name]:.3f} | {dtxt} |")
        print("\n| target (chosen on one fold, applied to the other) | score | reached | known accepted | known precision "
              "| unknown rejection | decision right | McNemar outlier-ratio vs it (only o-r / only it, p) |\n"
              "|---|---|---|---|---|---|---|---|")
        for kind, target in TARGETS:
            rows = {name: transferred(parts, s, kind, target) for s, name in SCORES.items()}
            for name, r in rows.items():
                m = "-" if name == "outlier-ratio" else None
                if m is None:
                    t = mcnemar(rows["outlier-ratio"]["decision_right"], r["decision_right"])
                    m = f"{t.only_a} / {t.only_b}, p = {t.p_value:.2g}"
                f = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
                print(f"| {kind} {target:g} | {name} | {r['reached']}/2 | {f(r['known_accepted'])} | "
                      f"{f(r['known_precision'])} | {f(r['unknown_rejection'])} | {r['decision_right'].mean():.3f} | {m} |")
                out["transferred"][f"{kind} {target:g} {name}"] = {k: (v.tolist() if isinstance(v, np.ndarray) else v)
                                                                   for k, v in r.items() if k != "decision_right"}
        print()
    if args.out:
        args.out.write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
