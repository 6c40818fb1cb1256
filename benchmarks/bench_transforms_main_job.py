#!/usr/bin/env python3
"""Feature transforms on the frozen main job's features before its centring (issue 14, goal
"frozen encoder >= 0.42 on unseen photos"): levers of instance retrieval never tried here.

    python3 benchmarks/bench_transforms_main_job.py [--candidate whitened|sqrt] [--k 30] [--json OUT.json]

Protocol: ``bench_csls_main_job.py``'s: GroceryStore's **train** split, the 5 capture-session
folds (``cv_folds("session")``), gallery = all 81 iconic packshots (K = 1), each fold's
unlabeled photos = its centring sample (1/6 of the other folds' photos), the main job's embedding
(224 + 288 + 384 px, last stage, crop 1.0, three parts; cached features), queries = every train
photo in its own fold.  ``shipped``: centred on the unlabeled photos' mean, each part
L2-normalised, 1-NN by CSLS k = 30 (the main job as it runs: ``catalog init --center-photos``,
``--hubness-k 30``).  Each round's candidate is ranked the same way against the same photos
transformed alike.  Also printed, not for the rules: both with plain 1-NN, and the open-set
AUROC known vs unknown (coarse-id parity halves, as ``bench_csls_main_job.py --open-set``; the
1-NN cosine distance and Lowe's ratio under CSLS).  Val and test are never read.

Round 1, ``--candidate whitened`` (2026-12-08; rule committed before the run in 3601eb7; result:
−0.297, not shipped, docs/evaluation.md).  Whitening (Jégou & Chum, "Negative evidences and
co-occurrences in image retrieval: the benefit of PCA and whitening", ECCV 2012, §3):
directions in which unlabeled photos vary most (lighting, background, packaging shared by a
brand) dominate a centred cosine; whitening by the photos' covariance weights every direction
alike.  With a few hundred photos per 320-dimensional part the sample covariance is singular;
the covariance is Ledoit–Wolf's shrinkage estimate (Ledoit & Wolf, J. Multivariate Anal. 2004;
:class:`sklearn.covariance.LedoitWolf`), whose shrinkage is chosen by its own formula, so
nothing is tuned.  Candidate: each part's centred raw features multiplied by ``C^(-1/2)``, C the
Ledoit–Wolf covariance of that part over the unlabeled photos, then each part L2-normalised.
Rule (one candidate): it replaces the main job's centring only if its top-1 gain over shipped,
on all 2,640 train photos, has a 95 % interval from a bootstrap over classes above zero.

Round 2, ``--candidate sqrt`` (2026-12-08, after round 1; rule committed before its run).
Power normalisation (Perronnin, Sánchez & Mensink, "Improving the Fisher kernel for large-scale
image classification", ECCV 2010, §3.2; Arandjelović & Zisserman's RootSIFT, CVPR 2012, for the
same effect on descriptors): a few strongly activated channels ("bursts": a logo, a repeated
pattern) dominate a pooled feature and its cosine; the signed square root ``sign(x) |x|^0.5`` of
each pooled feature damps them.  Candidate: every raw pooled feature replaced by its signed
square root (alpha = 0.5, the papers' value: nothing tuned), then the shipped pipeline (centred
on the unlabeled photos' mean of the transformed features, each part L2-normalised, CSLS
k = 30).  Rule (one candidate): the same as round 1.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
from sklearn.covariance import LedoitWolf

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_csls_main_job import arguments, main_job_train
from bench_defaults_cv import normalise
from bench_finetuned_input import class_bootstrap, csls_nearest
from bench_pseudo_references import MAIN_JOB

from retailklip.calibration import auroc, gallery_matches
from retailklip.hubness import HubnessReference
from retailklip.matching import score_of
from retailklip.protocol import fold_roles, mcnemar


def whitening(unlabeled: np.ndarray, groups: int) -> tuple[np.ndarray, list[np.ndarray], list[float]]:
    """``(mean (D,), per part the (d, d) matrix C^(-1/2), per part the shrinkage)`` of raw
    features ``unlabeled`` (N, D), C each part's Ledoit–Wolf covariance."""
    mu = unlabeled.mean(0)
    mats, shrinkage = [], []
    for part in np.split(unlabeled - mu, groups, axis=1):
        lw = LedoitWolf(assume_centered=True).fit(part)
        vals, vecs = np.linalg.eigh(lw.covariance_)
        mats.append((vecs / np.sqrt(vals)) @ vecs.T)
        shrinkage.append(lw.shrinkage_)
    return mu, mats, shrinkage


def whiten(raw: np.ndarray, mu: np.ndarray, mats: list[np.ndarray]) -> np.ndarray:
    """(N, D) raw features -> unit rows: centred, each part whitened, each part L2-normalised."""
    parts = [p @ w for p, w in zip(np.split(raw - mu, len(mats), axis=1), mats)]
    return normalise(np.concatenate(parts, axis=1), None, len(mats))


def signed_sqrt(raw: np.ndarray) -> np.ndarray:
    """Power normalisation, alpha = 0.5: ``sign(x) * sqrt(|x|)`` of every feature."""
    return np.sign(raw) * np.sqrt(np.abs(raw))


def candidate_embedding(name: str, unlabeled: np.ndarray, groups: int, notes: list):
    """The round's candidate as a function raw (N, D) -> unit rows, fitted on the fold's
    unlabeled photos' raw features; appends what it fitted to ``notes``."""
    if name == "whitened":
        mu, mats, shrinkage = whitening(unlabeled, groups)
        notes.append(shrinkage)
        return lambda x: whiten(x, mu, mats)
    mu = signed_sqrt(unlabeled).mean(0)
    return lambda x: normalise(signed_sqrt(x), mu, groups)


def main(argv: list[str] | None = None) -> int:
    p = arguments(__doc__)
    p.add_argument("--candidate", choices=("whitened", "sqrt"), default="whitened",
                   help="round 1: whitened (Ledoit-Wolf); round 2: sqrt (power normalisation)")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    store, lab, classes, gallery_raw, photo_raw, _raw, folds = main_job_train(args.data, args.cache)
    labels = lab.tolist()
    groups = len(MAIN_JOB["scales"])
    parity = {c.name: c.coarse_id % 2 for c in store.classes}
    known_of = {side: np.array([parity[c] == side for c in lab]) for side in (0, 1)}
    cand = args.candidate
    right = {(e, r): np.zeros(len(lab), bool) for e in ("shipped", cand) for r in ("plain", "CSLS")}
    scores = {(e, s, side): np.zeros(len(lab)) for e in ("shipped", cand)
              for s in ("distance", "ratio") for side in (0, 1)}
    shrinkage = []
    for f in folds:
        (roles,) = fold_roles(labels, [f], center_size=len(f.train) // 6, seed=0)  # as bench_csls_main_job
        mu = photo_raw[roles.center].mean(0)
        candidate = candidate_embedding(cand, photo_raw[roles.center], groups, shrinkage)
        for name, emb in (("shipped", lambda x: normalise(x, mu, groups)), (cand, candidate)):
            g, q, u = emb(gallery_raw), emb(photo_raw[roles.queries]), emb(photo_raw[roles.center])
            truth = lab[roles.queries]
            right[(name, "plain")][roles.queries] = classes[np.argmax(q @ g.T, axis=1)] == truth
            right[(name, "CSLS")][roles.queries] = classes[csls_nearest(q, g, u, args.k)] == truth
            for side in (0, 1):  # open set: known = one coarse-id parity's packshots
                rows = np.array([i for i, c in enumerate(classes) if parity[c] == side])
                matches = gallery_matches(g[rows].astype(np.float32), list(classes[rows]), q.astype(np.float32),
                                          HubnessReference(u.astype(np.float32), args.k))
                for s in ("distance", "ratio"):
                    scores[(name, s, side)][roles.queries] = [score_of(m, s) for m in matches]

    print(f"{len(lab)} train photos in {len(folds)} capture-session folds; gallery {len(classes)} packshots; "
          f"main job embedding ({groups} parts); candidate {cand}"
          + (f"; Ledoit–Wolf shrinkage per fold and part: {np.round(np.array(shrinkage), 3).tolist()}" if shrinkage else "")
          + "\n")
    print("| embedding | plain 1-NN top-1 | CSLS k = %d top-1 |" % args.k)
    print("|---|---|---|")
    for name in ("shipped", cand):
        print(f"| {name} | {right[(name, 'plain')].mean():.3f} | {right[(name, 'CSLS')].mean():.3f} |")
    out = {"k": args.k, "candidate": cand, "shrinkage": np.array(shrinkage).tolist(),
           "top1": {f"{e} {r}": float(v.mean()) for (e, r), v in right.items()}}
    for r in ("CSLS", "plain"):
        d = right[(cand, r)].astype(float) - right[("shipped", r)]
        lo, hi = class_bootstrap(d, lab, args.bootstrap, 0.95)
        m = mcnemar(right[(cand, r)], right[("shipped", r)])
        print(f"\n{cand} minus shipped, {r}: {d.mean():+.3f} [{lo:+.3f}, {hi:+.3f}] (95 %, class bootstrap); "
              f"McNemar only {cand} {m.only_a} / only shipped {m.only_b}, p = {m.p_value:.2g}")
        out[f"gain {r}"] = [float(d.mean()), lo, hi]
        out[f"mcnemar {r}"] = vars(m)

    print("\nopen set (a report): AUROC known vs unknown, mean over the two coarse-id parity halves, CSLS ranking")
    print(f"| score | shipped | {cand} |")
    print("|---|---|---|")
    for s in ("distance", "ratio"):
        vals = [np.mean([auroc(-scores[(e, s, side)][known_of[side]], -scores[(e, s, side)][~known_of[side]])
                         for side in (0, 1)]) for e in ("shipped", cand)]
        print(f"| {s} | {vals[0]:.3f} | {vals[1]:.3f} |")
        out[f"auroc {s}"] = {"shipped": float(vals[0]), cand: float(vals[1])}
    ok = out["gain CSLS"][1] > 0
    out["passes"] = ok
    print(f"\nrule (the CSLS gain's 95 % class-bootstrap interval above zero): {'passes' if ok else 'does not pass'}"
          f"\n{time.perf_counter() - t0:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
