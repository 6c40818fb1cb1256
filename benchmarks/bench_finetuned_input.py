#!/usr/bin/env python3
"""Input size and crop at evaluation for the finetuned encoder (issue 14: "larger input at
evaluation for the finetuned encoder", never tried before), by class-disjoint cross-validation on
GroceryStore's **train** split.  Val and test are never read.

    python3 benchmarks/bench_finetuned_input.py --runs /tmp/i14-cv-all /tmp/i14-cv-all-s1 /tmp/i14-cv-all-s2 \
        [--recipe iconic12-decay0.9] [--challenger iconic12-decay0.9-stage] [--json OUT.json]

Encoders: the fold encoders of the three replicate 81-class, 3-fold class-disjoint CVs of
``benchmarks/bench_loop_recipe.py --classes all`` (``RUN/fold*/RECIPE/encoder.safetensors``,
trained at 224 px), and the raw ImageNet MobileNetV2.  Per fold: gallery = the held-out classes'
iconic packshots (K = 1), queries = the first 10 train photos of each held-out class (the CV's
own 810 photos per replicate), features centred on the fold's training classes' photos among
every 6th train photo (unlabeled, as the loop's catalogs centre theirs), 1-NN by cosine
(:func:`retailklip.calibration.nearest_skus`).

Evaluation geometries (timm preprocessing, bilinear: resize the short side to
``input / crop_pct``, centre crop ``input``):

* ``shipped``: 224 px, crop_pct 0.875, the loop's catalogs as shipped (cached features of
  :func:`bench_pseudo_references.fold_features`);
* ``224 crop 1.0``: the whole centre square, no margin cut (a packshot's edges kept);
* ``288 crop 1.0``: larger input than trained (FixRes: Touvron et al., "Fixing the train-test
  resolution discrepancy", NeurIPS 2019, §3: a CNN trained with random-resized crops sees
  objects larger than at test time, so testing above the training size can help);
* ``224+288 crop 1.0``: both, each part centred and L2-normalised on its own (cosine = the mean
  of the two), as the main job's multi-scale embedding (retailklip.encoders.multiscale).

Also measured, not a candidate: ``shipped + raw main job``, the mean of the shipped finetuned
cosine and the raw encoder's main-job cosine (multi-scale stage embedding): whether the frozen
features hold what the finetune lost (an ensemble of two backbones, 5x the embedding cost).

Rule fixed before the run: a candidate replaces ``shipped`` in the loop only if its pooled
top-1 gain over ``shipped`` (each photo's right/wrong averaged over the three replicates) is
positive with its interval from a bootstrap over *classes* excluding zero at the Bonferroni
level for the candidates of its round (round 1: the 3 above, 98.3 %).

Round 2, added after round 1 (where no candidate passed, and the ensemble with the frozen
features gained +2.3 points, not significant): the finetuned encoder's own intermediate
features, which cost no second backbone, at the shipped geometry (224 px, crop_pct 0.875):
``stage -1`` (average-pooled last stage before MobileNetV2's 1x1 head convolution, C = 320, as
the main job pools the frozen encoder) and ``shipped + stage -1`` (both, each part normalised
on its own); Bonferroni for 2 (97.5 %).  The raw encoder is measured at every geometry too, so the
gain over raw is reported against the raw encoder's best geometry, not only its 224 px.

Round 3, ``--challenger RECIPE`` (added after round 2 shipped pooled + last stage): a finetune
recipe trained on that embedding (``bench_loop_recipe.py`` recipe ``iconic12-decay0.9-stage``:
ArcFace on the pooled output and the last stage, each part normalised on its own, as the catalog
compares them) instead of on the pooled output alone.  Its fold encoders are embedded at the
shipped geometry with ``feature_stage=["pooled", -1]`` (one forward pass) and compared with the
shipped recipe's encoders at the shipped embedding (``shipped + stage -1``).  Rule fixed before
the run: the challenger replaces the loop's recipe only if its pooled gain there is positive
with the 95 % class-bootstrap interval excluding zero (one candidate).

Round 4 (after round 3 shipped ``iconic12-decay0.9-stage``): ``--recipe iconic12-decay0.9-stage
--challenger iconic12-decay0.9-stage2 --challenger-stage '["pooled", -2, -1]'``: ArcFace on the
pooled output and the last *two* stages (96 + 320 channels), evaluated at that embedding (three
parts) against the round-3 recipe at pooled + last stage; the same rule (one candidate).

Round 5 (after round 4 left ``iconic12-decay0.9-stage`` shipped): ``--recipe iconic12-decay0.9-stage
--challenger-wise 0.5``: WiSE-FT (Wortsman et al., "Robust fine-tuning of zero-shot models",
CVPR 2022, §2), the shipped recipe's fold encoders with every weight replaced by the mean of the
finetuned and the ImageNet weights it started from (:func:`interpolate_weights`, alpha = 0.5,
the paper's untuned choice; no cost at inference), at the shipped embedding (pooled +
last stage).  Rule fixed before the run: the same as rounds 3 and 4, one candidate (alpha = 0.5);
other alphas may be printed afterwards but are not candidates of this round.

Round 6 (after round 5 left ``iconic12-decay0.9-stage`` shipped): ``--recipe iconic12-decay0.9-stage
--csls 10``: hubness reduction at the 1-NN, no training.  A few packshots ("hubs") are nearest to
many photos, sibling products' photos included; cross-domain similarity local scaling (CSLS:
Conneau et al., "Word translation without parallel data", ICLR 2018, §2.3, Eq. 6; k = 10, the
paper's value) ranks the packshots g of a photo q by ``cos(q, g) - r(g) / 2`` with ``r(g)`` the
mean cosine of g to its k nearest unlabeled store photos: the fold's centring photos, the ones
the catalog already centres on (``r(q)`` is the same for every g of a photo and drops out).
Applied to the shipped recipe's encoders at the catalog's embedding (``finetuned shipped + stage
-1``); also printed for the raw main job (not a candidate).  Rule fixed before the run: one
candidate, shipped only if its gain over plain 1-NN on the same embedding has a 95 %
class-bootstrap interval above zero.

Round 7 (next stop, after round 6 left the recipe as it was): ``--recipe iconic12-decay0.9-stage
--challenger iconic12-decay0.9-stage-epochs5``: the shipped recipe trained 5 epochs instead of 3
(``bench_loop_recipe.py`` recipe of that name; the second round's "+ 5 epochs" was the one
schedule change with p < 0.05 on the 46-class CV, +3.1 points, never re-tested on the 81-class
CV or with 12 packshot copies; the loop's finetune goes from about 115 s to about 190 s, still
under the loop's 10 minutes).  Its fold encoders at the catalog's embedding (pooled + last stage)
against the shipped recipe's.  Rule fixed before the run: the same as rounds 3 to 6, one
candidate: its pooled gain must have a 95 % class-bootstrap interval above zero.

``--speed R``: the embedding cost of pooled + last stage against the pooled output alone on this
CPU (:func:`bench_multiscale_cv.speed`: 32 real train photos, R interleaved repeats, 2 torch
threads, minimum and median ms per image) and the index vector size.

Features are cached under ``CACHE/finetuned-input/`` (one ``.npy`` per encoder and geometry,
over the images the protocol needs: packshots, queries and centring photos); a rerun only analyses.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_defaults_cv import ENCODER, SHARED, WEIGHTS, cached_features, normalise
from bench_loop_recipe import run_seed
from bench_pseudo_references import MAIN_JOB, MAIN_JOB_CACHE, fold_features

from retailklip.calibration import nearest_skus
from retailklip.datasets import read_grocery_store
from retailklip.encoders import create_encoder
from retailklip.protocol import class_disjoint_folds, mcnemar

#: geometry name -> create_encoder options (on top of the weights)
GEOMETRIES = {
    "224c1.0": {"interpolation": "bilinear", "crop_pct": 1.0, "input_size": 224},
    "288c1.0": {"interpolation": "bilinear", "crop_pct": 1.0, "input_size": 288},
    "224stage-1": {"interpolation": "bilinear", "feature_stage": -1},
}
#: rounds 3 and 4: the challenger recipe's fold encoders at its own embedding (``--challenger-stage``)
CHALLENGER_STAGE = ["pooled", -1]
CHALLENGER = "challenger"  # round 3's rows: the --challenger recipe's encoders
SHIPPED = "shipped"  # the loop's geometry (224 px, crop_pct 0.875), features cached by fold_features
#: per round, candidate -> the geometries whose features are concatenated (each part normalised on its own)
ROUNDS = {
    1: {"224 crop 1.0": ("224c1.0",), "288 crop 1.0": ("288c1.0",), "224+288 crop 1.0": ("224c1.0", "288c1.0")},
    2: {"stage -1": ("224stage-1",), "shipped + stage -1": (SHIPPED, "224stage-1")},
}
CANDIDATES = {c: gs for r in ROUNDS.values() for c, gs in r.items()}
QUERIES = 10
CENTER_STRIDE = 6
CSLS = "CSLS"
#: round 6: the embeddings CSLS is applied to; the first is the rule's (the catalog's embedding)
CSLS_ON = ("finetuned shipped + stage -1", "raw main job")


def challenger_geometry(stage: list) -> tuple[str, dict]:
    """Cache name and encoder options of the challenger's embedding at the shipped geometry
    (224 px, crop 0.875): the pooled output first, then the listed stages."""
    if not stage or stage[0] != "pooled" or len(stage) < 2:
        raise SystemExit(f"--challenger-stage must start with \"pooled\" and name a stage, got {stage!r}")
    name = "224" + "+".join("pooled" if s == "pooled" else f"stage{s}" for s in stage)
    return name, {"interpolation": "bilinear", "feature_stage": list(stage)}


def csls_nearest(queries: np.ndarray, gallery: np.ndarray, photos: np.ndarray, k: int) -> np.ndarray:
    """int (Q,): per query row, the gallery row of largest ``cos(q, g) - r(g) / 2``, ``r(g)`` the
    mean cosine of ``g`` to its ``k`` nearest ``photos`` (CSLS, Conneau et al. 2018, Eq. 6; all
    inputs unit rows)."""
    hub = np.sort(gallery @ photos.T, axis=1)[:, -k:].mean(1)
    return np.argmax(queries @ gallery.T - hub / 2, axis=1)


def embed(weights: Path, geometry: str, paths: list[Path], npy: Path, prepared: dict, log=print,
          options: dict | None = None) -> np.ndarray:
    """float64 (N, D) raw features (not normalised) of ``paths`` under ``weights`` at ``geometry``,
    cached in ``npy`` (keyed by the path list); ``prepared`` keeps the decoded inputs of one
    geometry between encoders; ``options`` replace ``GEOMETRIES[geometry]``."""
    key = hashlib.sha256("\n".join(map(str, paths)).encode()).hexdigest()[:12]
    npy = npy.with_name(f"{npy.stem}-{key}.npy")
    if not npy.is_file():
        enc = create_encoder(ENCODER, weights=weights, **(options or GEOMETRIES[geometry]))
        if prepared.get("geometry") != geometry:
            prepared.clear()
            t = time.perf_counter()
            prepared.update(geometry=geometry, x=torch.stack([enc.prepare(p) for p in paths]))
            log(f"{geometry}: {len(paths)} images decoded in {time.perf_counter() - t:.0f} s")
        t, x = time.perf_counter(), prepared["x"]
        feats = torch.cat([enc.features(x[i: i + 64]) for i in range(0, len(x), 64)]).numpy()
        npy.parent.mkdir(parents=True, exist_ok=True)
        np.save(npy, feats)
        log(f"{npy.name}: embedded in {time.perf_counter() - t:.0f} s")
    return np.load(npy).astype(np.float64)


def interpolate_weights(start: dict[str, torch.Tensor], finetuned: dict[str, torch.Tensor],
                        alpha: float) -> dict[str, torch.Tensor]:
    """WiSE-FT (Wortsman et al., CVPR 2022, Eq. 1): ``(1 - alpha) * start + alpha * finetuned`` per
    floating-point tensor (in float64, cast back), integer tensors (``num_batches_tracked``)
    from ``finetuned``; the keys are ``finetuned``'s (``start``'s classifier is dropped)."""
    return {k: ((1 - alpha) * start[k].double() + alpha * f.double()).to(f.dtype) if f.is_floating_point() else f
            for k, f in finetuned.items()}


def wise_weights(finetuned: Path, alpha: float, out: Path) -> Path:
    """``out``: WiSE-FT weights, ``(1 - alpha) * ImageNet + alpha * finetuned`` (written once)."""
    if not out.is_file():
        from safetensors.torch import load_file, save_file

        out.parent.mkdir(parents=True, exist_ok=True)
        save_file(interpolate_weights(load_file(str(WEIGHTS)), load_file(str(finetuned)), alpha), str(out))
    return out


def paired_gain(c: np.ndarray, base: np.ndarray, cls: np.ndarray, n_boot: int):
    """``c`` against ``base`` (bool (replicates, photos), the same photos): per-photo difference of
    the replicate means, its 95 % class-bootstrap interval and McNemar over all replicates."""
    d = c.mean(0) - base.mean(0)
    lo, hi = class_bootstrap(d, cls, n_boot, 0.95)
    return d, lo, hi, mcnemar(c.ravel(), base.ravel())


def class_bootstrap(diff: np.ndarray, cls: np.ndarray, n_boot: int, level: float, seed: int = 0) -> tuple[float, float]:
    """Percentile interval of the mean of per-photo ``diff`` with whole classes resampled."""
    ids = np.unique(cls)
    sums = np.array([diff[cls == c].sum() for c in ids])
    counts = np.array([(cls == c).sum() for c in ids])
    rng = np.random.default_rng(seed)
    draw = rng.integers(0, len(ids), size=(n_boot, len(ids)))
    means = sums[draw].sum(1) / counts[draw].sum(1)
    a = (1 - level) / 2 * 100
    lo, hi = np.percentile(means, [a, 100 - a])
    return float(lo), float(hi)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=SHARED / "data" / "grocery-store")
    p.add_argument("--runs", type=Path, nargs="+", required=True, help="bench_loop_recipe.py --classes all outputs")
    p.add_argument("--recipe", default="iconic12-decay0.9")
    p.add_argument("--cache", type=Path, default=Path("/tmp/cv-cache"))
    p.add_argument("--bootstrap", type=int, default=4000)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--speed", type=int, default=0, metavar="R", help="also time the embedding, R interleaved repeats")
    p.add_argument("--challenger", default=None, metavar="RECIPE",
                   help="rounds 3-4: this recipe's fold encoders at their embedding against --recipe's at pooled + last stage")
    p.add_argument("--challenger-stage", type=json.loads, default=CHALLENGER_STAGE, metavar="JSON",
                   help=f"the challenger's feature_stage (default {json.dumps(CHALLENGER_STAGE)}; it was trained on it)")
    p.add_argument("--challenger-wise", type=float, default=None, metavar="ALPHA",
                   help="round 5: the challenger is --recipe's fold encoders interpolated with the ImageNet weights (WiSE-FT)")
    p.add_argument("--csls", type=int, default=0, metavar="K",
                   help="round 6: also rank packshots by CSLS with K nearest centring photos (0: off)")
    p.add_argument("--geometries", nargs="+", choices=list(GEOMETRIES), default=list(GEOMETRIES),
                   help="embed only these geometries (rows that need another are left out; the rule of rounds 3-7 "
                        "needs 224stage-1 only)")
    p.add_argument("--main-job", action=argparse.BooleanOptionalAction, default=True,
                   help="also the raw encoder at the main job's embedding (3 scales over every train photo: minutes)")
    args = p.parse_args(argv)
    if args.csls and not args.main_job:
        p.error("--csls also ranks the raw main job: drop --no-main-job")
    if args.challenger_wise is not None:
        if not 0 <= args.challenger_wise <= 1:
            p.error(f"--challenger-wise must be in [0, 1], got {args.challenger_wise}")
        if args.challenger:
            p.error("--challenger-wise names its own challenger; drop --challenger")
        args.challenger = f"{args.recipe}-wise{args.challenger_wise:g}"
    start = time.perf_counter()
    store = read_grocery_store(args.data)
    if args.speed:
        from bench_multiscale_cv import speed

        rows = speed(store, {"interpolation": "bilinear", "feature_stage": ["pooled", -1]}, args.speed)
        print("| embedding (224 px, crop 0.875) | D | bytes per vector | ms per image, min | median | min / pooled |\n"
              "|---|---|---|---|---|---|")
        for r, name in zip(rows, ("pooled output (shipped before)", "pooled + last stage")):
            print(f"| {name} | {r['dim']} | {4 * r['dim']} | {r['ms_min']:.1f} | {r['ms_median']:.1f} | {r['ratio_min']:.3f} |")
        print()
    names = [c.name for c in store.classes]
    coarse = [c.coarse_name for c in store.classes]
    photos: dict[str, list[Path]] = defaultdict(list)
    for ph in store.photos("train"):
        photos[ph.label].append(ph.path)
    items = [c.iconic for c in store.classes] + [q for c in names for q in photos[c]]
    labels = np.array([c for c in names for _ in photos[c]])
    first = np.concatenate([np.flatnonzero(labels == c)[:QUERIES] for c in names])  # query rows (train-photo index)
    stride = np.arange(len(labels)) % CENTER_STRIDE == 0
    need = np.concatenate([np.arange(len(names)), len(names) + np.union1d(first, np.flatnonzero(stride))])
    sub_paths = [items[i] for i in need]
    row = {int(i): r for r, i in enumerate(need)}  # item index -> row of the subset features
    print(f"{len(sub_paths)} images embedded per encoder and geometry ({len(names)} packshots, "
          f"{len(first)} queries, every {CENTER_STRIDE}th train photo for centring)")

    feats: dict[tuple[str, str], dict[str, np.ndarray]] = {}  # (run, fold) -> geometry -> (len(need), D)
    runs = [(run, run_seed(run) or 0) for run in args.runs]
    cache = args.cache / "finetuned-input"
    prepared: dict = {}
    for g in args.geometries:  # geometry outer: each geometry's inputs decoded once
        feats.setdefault(("raw", ""), {})[g] = embed(WEIGHTS, g, sub_paths, cache / f"raw-{g}.npy", prepared)
        for run, _ in runs:
            for f in range(3):
                w = run / f"fold{f}" / args.recipe / "encoder.safetensors"
                feats.setdefault((run.name, str(f)), {})[g] = embed(
                    w, g, sub_paths, cache / f"{run.name}-fold{f}-{args.recipe}-{g}.npy", prepared)
    if args.challenger:
        cg, copts = challenger_geometry(args.challenger_stage)
        widths = list(create_encoder(ENCODER, weights=WEIGHTS, **copts).groups)  # (pooled, stage, ...)
        for run, _ in runs:
            for f in range(3):
                w = run / f"fold{f}" / args.challenger / "encoder.safetensors"
                if args.challenger_wise is not None:
                    w = wise_weights(run / f"fold{f}" / args.recipe / "encoder.safetensors", args.challenger_wise,
                                     cache / "wise" / f"{run.name}-fold{f}-{args.challenger}.safetensors")
                feats[(run.name, str(f))][CHALLENGER] = embed(
                    w, cg, sub_paths, cache / f"{run.name}-fold{f}-{args.challenger}-{cg}.npy", prepared, options=copts)
    prepared.clear()
    shipped_raw = cached_features("bilinear", [(q, 0) for q in items], args.cache,
                                  options={"interpolation": "bilinear"}).astype(np.float64)[need]
    main_job = cached_features(MAIN_JOB_CACHE, [(q, 0) for q in items], args.cache,
                               options=MAIN_JOB).astype(np.float64)[need] if args.main_job else None
    mj_groups = len(MAIN_JOB["scales"])

    def unit(parts: list[np.ndarray], centre: np.ndarray) -> np.ndarray:
        """The parts concatenated, centred, each part L2-normalised on its own (the encoder's
        ``groups`` as part widths): cosine = the mean of the parts' cosines."""
        x = np.concatenate(parts, 1)
        return normalise(x, x[centre].mean(0), [p.shape[1] for p in parts])

    correct: dict[str, np.ndarray] = {}  # method -> bool (runs, 810) in the global query order
    for r, (run, seed) in enumerate(runs):
        folds = class_disjoint_folds(names, k=3, seed=seed, groups=coarse)
        for f in folds:
            test, train = [names[i] for i in f.test], [names[i] for i in f.train]
            q_items = [len(names) + int(i) for i in first if labels[i] in test]
            q_pos = np.flatnonzero(np.isin(labels[first], test))  # their places in the global query order
            truth = labels[[i - len(names) for i in q_items]].tolist()
            centre = [row[len(names) + int(i)] for i in np.flatnonzero(stride & np.isin(labels, train))]
            g_rows, q_rows = [row[names.index(c)] for c in test], [row[i] for i in q_items]
            ft_shipped = fold_features(run, f.index, args.recipe, items, args.cache)[need]
            methods: dict[str, np.ndarray] = {}
            for enc, shipped_feats in (("raw", shipped_raw), ("finetuned", ft_shipped)):
                geo = {**(feats[("raw", "")] if enc == "raw" else feats[(run.name, str(f.index))]), SHIPPED: shipped_feats}
                methods[f"{enc} {SHIPPED}"] = unit([shipped_feats], centre)
                for cand, gs in CANDIDATES.items():
                    if all(g in geo for g in gs):
                        methods[f"{enc} {cand}"] = unit([geo[g] for g in gs], centre)
            if args.challenger:
                x = feats[(run.name, str(f.index))][CHALLENGER]
                parts = np.split(x, np.cumsum(widths)[:-1], axis=1)
                methods[f"{CHALLENGER} {SHIPPED}"] = unit(parts[:1], centre)
                methods[f"{CHALLENGER} embedding"] = unit(parts, centre)  # the rule's row: all its parts
                if len(parts) > 2:  # also at the shipped embedding (for two parts it is the row above)
                    methods[f"{CHALLENGER} {SHIPPED} + stage -1"] = unit([parts[0], parts[-1]], centre)
            if main_job is not None:
                methods["raw main job"] = normalise(main_job, main_job[centre].mean(0), mj_groups)
                ens = np.concatenate([methods["finetuned shipped"], methods["raw main job"]], 1) / np.sqrt(2)
                methods["finetuned shipped + raw main job"] = ens  # cosine = mean of the two cosines
            for m, x in methods.items():
                named, _ = nearest_skus(x[g_rows], test, x[q_rows])
                correct.setdefault(m, np.zeros((len(runs), len(first)), bool))[r, q_pos] = np.array(named) == np.array(truth)
            for m in CSLS_ON if args.csls else ():
                x = methods[m]
                pred = np.array(test)[csls_nearest(x[q_rows], x[g_rows], x[centre], args.csls)]
                correct.setdefault(f"{m} {CSLS}", np.zeros((len(runs), len(first)), bool))[r, q_pos] = pred == np.array(truth)
        print(f"{run}: done ({time.perf_counter() - start:.0f} s)")

    cls = labels[first]
    ref = correct[f"finetuned {SHIPPED}"].mean(0)
    level = {c: 1 - 0.05 / len(r) for r in ROUNDS.values() for c in r}
    raw_best = max((m for m in correct if m.startswith("raw") and not m.endswith(CSLS)), key=lambda m: correct[m].mean())
    print(f"\n## Closed-set top-1, {len(first)} photos x {len(runs)} replicates (81 classes, 3 class-disjoint folds)\n")
    print(f"| encoder, evaluation geometry | top-1 per replicate | pooled | minus finetuned shipped [95 %] "
          f"[Bonferroni for the round: 98.3 % / 97.5 %] | McNemar vs finetuned shipped (all replicates) | minus {raw_best} [95 %] |")
    print("|---|---|---|---|---|---|")
    out = {}
    for m, c in correct.items():
        if m.startswith(CHALLENGER) or m.endswith(CSLS):
            continue  # rounds 3-6 have their own tables below
        v = c.mean(0)
        d = v - ref
        lo, hi = class_bootstrap(d, cls, args.bootstrap, 0.95)
        blo, bhi = class_bootstrap(d, cls, args.bootstrap, level.get(m.split(" ", 1)[1], 0.95))
        mc = mcnemar(c.ravel(), correct[f"finetuned {SHIPPED}"].ravel())
        dr = v - correct[raw_best].mean(0)
        rlo, rhi = class_bootstrap(dr, cls, args.bootstrap, 0.95)
        print(f"| {m} | {' / '.join(f'{a:.3f}' for a in c.mean(1))} | {v.mean():.3f} | {d.mean():+.3f} [{lo:+.3f}, {hi:+.3f}] "
              f"[{blo:+.3f}, {bhi:+.3f}] | {mc.only_a} vs {mc.only_b}, p = {mc.p_value:.2g} | "
              f"{dr.mean():+.3f} [{rlo:+.3f}, {rhi:+.3f}] |")
        out[m] = {"per_replicate": c.mean(1).tolist(), "pooled": float(v.mean()), "minus_shipped": [float(d.mean()), lo, hi],
                  "minus_shipped_bonferroni": [blo, bhi], "mcnemar": vars(mc), f"minus {raw_best}": [float(dr.mean()), rlo, rhi]}
    winners = [c for c in CANDIDATES if f"finetuned {c}" in out and out[f"finetuned {c}"]["minus_shipped_bonferroni"][0] > 0]
    for r, cands in ROUNDS.items():
        if not all(f"finetuned {c}" in out for c in cands):
            continue  # a round whose geometries were not embedded (--geometries)
        won = [c for c in cands if c in winners]
        print(f"\nround {r} rule (Bonferroni interval of the gain over shipped above zero): "
              f"{', '.join(won) if won else 'no candidate passes; shipped stays'}")
    if args.challenger:
        print(f"\n## Challenger {args.challenger} (feature_stage {json.dumps(args.challenger_stage)}) against {args.recipe} "
              "(pooled + last stage)\n")
        print("| challenger's embedding at evaluation | shipped recipe, pooled | challenger, per replicate | challenger, pooled | "
              f"minus shipped recipe [95 %] | McNemar (all replicates) | minus {raw_best} [95 %] |\n|---|---|---|---|---|---|---|")
        rows = [("embedding", f"{SHIPPED} + stage -1")]  # (challenger's, the shipped recipe's): the rule's row first
        if len(widths) > 2:
            rows.append((f"{SHIPPED} + stage -1", f"{SHIPPED} + stage -1"))
        rows.append((SHIPPED, SHIPPED))
        for emb, ref_emb in rows:
            c, base = correct[f"{CHALLENGER} {emb}"], correct[f"finetuned {ref_emb}"]
            d, lo, hi, mc = paired_gain(c, base, cls, args.bootstrap)
            dr = c.mean(0) - correct[raw_best].mean(0)
            rlo, rhi = class_bootstrap(dr, cls, args.bootstrap, 0.95)
            print(f"| {emb} | {base.mean():.3f} | {' / '.join(f'{a:.3f}' for a in c.mean(1))} | {c.mean():.3f} | "
                  f"{d.mean():+.3f} [{lo:+.3f}, {hi:+.3f}] | {mc.only_a} vs {mc.only_b}, p = {mc.p_value:.2g} | "
                  f"{dr.mean():+.3f} [{rlo:+.3f}, {rhi:+.3f}] |")
            out[f"{CHALLENGER} {emb}"] = {"per_replicate": c.mean(1).tolist(), "pooled": float(c.mean()),
                                          "minus_shipped_recipe": [float(d.mean()), lo, hi], "mcnemar": vars(mc),
                                          f"minus {raw_best}": [float(dr.mean()), rlo, rhi]}
        won = out[f"{CHALLENGER} embedding"]["minus_shipped_recipe"][1] > 0
        print(f"\nrule (95 % interval of the gain of the challenger's embedding over the shipped one above zero): "
              f"{args.challenger + ' replaces ' + args.recipe if won else 'the shipped recipe stays'}")
    if args.csls:
        print(f"\n## Round 6: CSLS (k = {args.csls} centring photos) against plain 1-NN on the same embedding\n")
        print("| embedding | plain 1-NN, pooled | CSLS, per replicate | CSLS, pooled | minus plain [95 %] | McNemar (all replicates) |\n"
              "|---|---|---|---|---|---|")
        for m in CSLS_ON:
            c, base = correct[f"{m} {CSLS}"], correct[m]
            d, lo, hi, mc = paired_gain(c, base, cls, args.bootstrap)
            print(f"| {m} | {base.mean():.3f} | {' / '.join(f'{a:.3f}' for a in c.mean(1))} | {c.mean():.3f} | "
                  f"{d.mean():+.3f} [{lo:+.3f}, {hi:+.3f}] | {mc.only_a} vs {mc.only_b}, p = {mc.p_value:.2g} |")
            out[f"{m} {CSLS}"] = {"per_replicate": c.mean(1).tolist(), "pooled": float(c.mean()),
                                  "minus_plain": [float(d.mean()), lo, hi], "mcnemar": vars(mc)}
        won = out[f"{CSLS_ON[0]} {CSLS}"]["minus_plain"][1] > 0
        print(f"\nround 6 rule (95 % interval of CSLS's gain on {CSLS_ON[0]} above zero): "
              f"{'CSLS passes' if won else 'plain 1-NN stays'}")
    print(f"{time.perf_counter() - start:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"top1": out, "winners": winners,
                                         "correct": {m: c.astype(int).tolist() for m, c in correct.items()}}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
