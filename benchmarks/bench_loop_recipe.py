"""Choose the loop's finetune recipe by class-disjoint cross-validation on the **training**
classes (by default only those: examples/retailklip_loop.py's held-out classes are not touched).

    python3 benchmarks/bench_loop_recipe.py --data ../shared/data/grocery-store --out /tmp/loop-cv

The loop's 46 training classes (odd coarse ids; ``--classes all``: all 81, a wider check in which
the loop's held-out classes take part) are dealt into k class-disjoint folds by coarse class
(:func:`retailklip.protocol.class_disjoint_folds`).  Per fold and recipe: finetune on the
other folds' train photos, then closed-set 1-NN top-1 of the fold's classes: gallery = their iconic
packshots (K = 1, no feature centring), queries = up to ``--queries`` train photos per class.  The
raw encoder is scored on the same photos.  ``--centred`` (on by default) scores every encoder a
second time with its features centred on every 6th train photo of the fold's training classes,
unlabeled, as the loop's catalogs centre theirs (rows ``NAME@centred``, compared with the
reference's ``@centred`` row).  Prints top-1 per recipe with a bootstrap interval over
all folds' photos and McNemar's test against the ``--reference`` recipe (default ``train-iconic``,
the loop's shipped recipe), and writes ``OUT/cv.json`` (after every recipe: each recipe runs all
its folds before the next starts, so an interrupted run keeps whole recipes).  Each run's per-photo
results are kept in ``OUT/correct.json``; a later run into the same OUT keeps the recipes it
holds (the runs are deterministic: seed 0, 1 thread) and runs only the others.  ``--seed S``
replicates the whole CV on another draw: the folds are dealt with seed S and every finetune runs
with ``--seed S`` (OUT/seed.txt records it; a run into an OUT of another seed is refused).
``--pool OUT1 OUT2 ...`` trains nothing: it pools such replicates photo by photo (the same
``--classes``, ``--folds`` and ``--queries``) and prints, per recipe they all hold, top-1 per
replicate and pooled, and the pooled difference to ``--reference`` with a bootstrap interval
over photos (each photo's difference averaged over the replicates); writes ``OUT/pooled.json``.

Open set and query/gallery options (issue 14, item 3), measured on every recipe's encoders with
the same photos (``--open-set``, on by default; ``OUT/open.json`` keeps the per-photo arrays, so
a later run re-measures only what is missing, from the encoders left in ``OUT/fold*/RECIPE``):

* closed set, the same 1-NN with the query embedding averaged with its mirror image's
  (``flip``: test-time augmentation, 2 forward passes per query) and with K = 8 catalog views per
  packshot (``k8``: :func:`retailklip.references.embed_reference`);
* open set: the fold's held-out classes are split again by coarse class
  (``class_disjoint_folds(k = 2, groups = coarse)``) into *known* (their packshots are the
  gallery) and *unknown*; every query is scored (higher = more likely unknown) by
  ``distance`` (d1), ``ratio`` (d1 / d2, Lowe's ratio), ``neg-packshots`` (d1 / distance to the
  nearest packshot of the fold's *training* classes: other products used as outliers),
  ``neg-photos`` (the same with up to ``--negatives`` train photos per training class),
  ``view-scale`` (d1 / the nearest SKU's mean distance from its packshot to its 7 augmented views:
  a per-SKU threshold from the catalog's own views), ``flip distance`` and ``k8 distance``.
  Reported per score: AUROC known vs unknown (mean of the folds' AUROCs; bootstrap interval over
  photos, resampled together with their fold), its paired difference to ``distance`` and to the
  reference recipe's ``distance``, and the *oracle* operating point per fold: the largest share of
  known photos accepted at known precision >= 0.9 read off the photos themselves (an upper bound
  for any calibration; the loop's goal is >= 0.30).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

# the repository's own packages first (not an installed copy of them)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from PIL import ImageOps

from finetune.cli import build_parser, config_from_args
from finetune.cli import run as finetune_run
from retailklip.calibration import CalibrationError, auroc, nearest_matches, nearest_skus, threshold_for_precision
from retailklip.datasets import read_grocery_store
from retailklip.encoders import create_encoder
from retailklip.images import load_image
from retailklip.open_set import distance_ratio, outlier_ratio
from retailklip.protocol import bootstrap_ci, bootstrap_statistic, class_disjoint_folds, mcnemar
from retailklip.references import embed_reference

#: Open-set scores of :func:`open_measure` (module docstring), higher = more likely unknown.
OPEN_SCORES = ("distance", "ratio", "neg-packshots", "neg-photos", "view-scale", "flip distance", "flip ratio",
               "k8 distance")
#: Closed-set variants of :func:`open_measure` besides the plain 1-NN.
CLOSED_VARIANTS = ("flip", "k8")
#: Catalog views per packshot of the ``k8`` variant.
K_VIEWS = 8
#: ``@centred`` rows: features centred on every N-th train photo of the fold's training classes
#: (the loop's ``--center-stride``).
CENTER_STRIDE = 6

RECIPES = {  # name -> extra finetune arguments on top of the loop's (3 epochs, depth 12, lr 2e-4, 3 stages frozen)
    "baseline": [],
    "train-iconic": ["+iconic"],  # the loop's shipped recipe (examples/retailklip_loop.py --train-iconic)
    "epochs-5": ["--epochs", "5"],
    # variants of train-iconic (issue 14: later argparse values override the defaults above)
    "iconic-lr5e-4": ["+iconic", "--lr", "5e-4"],
    "iconic-lr1e-3": ["+iconic", "--lr", "1e-3"],
    "iconic-decay0.9": ["+iconic", "--lr-decay", "0.9"],
    "iconic-decay0.8": ["+iconic", "--lr-decay", "0.8"],
    "iconic-freeze1": ["+iconic", "--freeze-blocks", "1"],
    "iconic-freeze0": ["+iconic", "--freeze-blocks", "0"],
    "iconic-epochs5": ["+iconic", "--epochs", "5"],
    "iconic-depth24": ["+iconic", "--depth", "24"],
    "iconic-margin17": ["+iconic", "--margin", "17.2"],
    "iconic-scale32": ["+iconic", "--scale", "32"],
    "iconic-crop0.5": ["+iconic", "--crop-scale", "0.5"],
    "iconic-decay1.0": ["+iconic", "--lr-decay", "1.0"],
    "iconic-decay0.9-freeze0": ["+iconic", "--lr-decay", "0.9", "--freeze-blocks", "0"],
    "iconic-decay0.9-epochs5": ["+iconic", "--lr-decay", "0.9", "--epochs", "5"],
    "iconic-decay0.9-lr1e-4": ["+iconic", "--lr-decay", "0.9", "--lr", "1e-4"],
    "iconic-decay0.9-margin17": ["+iconic", "--lr-decay", "0.9", "--margin", "17.2"],
    # third round (issue 14, item 3): against iconic-decay0.9, the loop's shipped recipe
    "iconic-decay0.9-subcenter3": ["+iconic", "--lr-decay", "0.9", "--sub-centers", "3"],
    "iconic-decay0.9-subcenter2": ["+iconic", "--lr-decay", "0.9", "--sub-centers", "2"],
    "iconic-decay0.9-depth24": ["+iconic", "--lr-decay", "0.9", "--depth", "24"],
    "iconic-decay0.9-size160-epochs6": ["+iconic", "--lr-decay", "0.9", "--train-size", "160", "--epochs", "6"],
    "iconic-decay0.9-freeze5": ["+iconic", "--lr-decay", "0.9", "--freeze-blocks", "5"],
    # packshot oversampling (issue 14, stop 21; "+iconicN" = the packshots as role 'reference' rows with
    # --reference-copies N): the class-balanced sampler draws ~N x depth / (photos + N) augmented
    # packshot views per class and epoch instead of ~depth / (photos + 1)
    **{f"iconic{n}-decay0.9": [f"+iconic{n}", "--lr-decay", "0.9"] for n in (4, 12, 24, 48, 96)},
    **{f"iconic{n}-decay0.9-depth24": [f"+iconic{n}", "--lr-decay", "0.9", "--depth", "24"] for n in (48, 12)},
    # packshots pasted onto in-store backgrounds (finetune --reference-backgrounds P, finetune/backgrounds.py)
    "iconic12-decay0.9-bg0.5": ["+iconic12", "--lr-decay", "0.9", "--reference-backgrounds", "0.5"],
    # Outlier Exposure (finetune --outlier-data; "+outliersF": a fraction F of the fold's training coarse classes
    # leave ArcFace and become outlier images, their photos and packshots, pushed away from every class)
    "iconic12-decay0.9-oe0.25": ["+iconic12", "--lr-decay", "0.9", "+outliers0.25"],
    # ArcFace on the embedding the loop's catalogs store (pooled output + last stage, each part normalised on its
    # own) instead of the pooled output alone; its encoders are compared at that embedding by bench_finetuned_input
    "iconic12-decay0.9-stage": ["+iconic12", "--lr-decay", "0.9", "--encoder-option", 'feature_stage=["pooled", -1]'],
    # the shipped recipe (above) trained 5 epochs instead of 3 (bench_finetuned_input.py round 7)
    "iconic12-decay0.9-stage-epochs5": ["+iconic12", "--lr-decay", "0.9", "--encoder-option", 'feature_stage=["pooled", -1]',
                                        "--epochs", "5"],
    # the same with the last two stages (96 + 320 channels) next to the pooled output, trained and compared so
    "iconic12-decay0.9-stage2": ["+iconic12", "--lr-decay", "0.9", "--encoder-option", 'feature_stage=["pooled", -2, -1]'],
}


def score(enc, references: list[Path], classes: list[str], queries: list[tuple[Path, str]]) -> np.ndarray:
    """bool (M,): 1-NN over the classes' packshots names each query's class."""
    pred, _ = nearest_skus(enc.embed(references), classes, enc.embed([q for q, _ in queries]))
    return np.array([a == c for a, (_, c) in zip(pred, queries)])


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def open_measure(enc, iconic: dict[str, Path], test: list[str], known: list[str], train: list[str],
                 queries: list[tuple[Path, str]], negatives: list[Path]) -> dict[str, np.ndarray]:
    """Per-photo arrays of one encoder on one fold (module docstring), all of length M = queries.

    Args:
        enc: the encoder (1-NN by cosine distance of its unit embeddings).
        iconic: class -> packshot path; test: the fold's held-out classes; known: the subset in
            the open-set gallery; train: the fold's training classes (outliers); queries: (photo,
            class) pairs of the test classes; negatives: train photos of the training classes.

    Returns:
        bool arrays ``correct_flip``, ``correct_k8`` (closed set over ``test``), ``known``,
        ``right`` (known and named right by the known gallery), ``right_flip``, ``right_k8``,
        and float64 score arrays ``score:NAME`` for NAME in :data:`OPEN_SCORES`.
    """
    labels = np.array([c for _, c in queries])
    photos = [load_image(q) for q, _ in queries]
    e = enc.embed(photos, decoded=True)
    e_flip = _unit(e + enc.embed([ImageOps.mirror(im) for im in photos], decoded=True))
    views = {c: embed_reference(enc, iconic[c], K_VIEWS) for c in test}  # (K, D) each, view 0 = the packshot
    out: dict[str, np.ndarray] = {}
    g1 = np.stack([views[c][0] for c in test])
    pred, _ = nearest_skus(g1, test, e_flip)
    out["correct_flip"] = np.array([a == c for a, c in zip(pred, labels)])
    pred, _ = nearest_skus(np.concatenate([views[c] for c in test]), [c for c in test for _ in range(K_VIEWS)], e)
    out["correct_k8"] = np.array([a == c for a, c in zip(pred, labels)])
    # open set: gallery = the known classes' packshots
    kset = set(known)
    out["known"] = np.array([c in kset for c in labels])
    gk = np.stack([views[c][0] for c in known])
    pred, d1, d2 = nearest_matches(gk, known, e)
    out["right"] = out["known"] & (np.array(pred) == labels)
    d1 = d1.astype(np.float64)
    neg_pack = enc.embed([iconic[c] for c in train])
    neg_photo = enc.embed(negatives)
    radius = {c: float((1.0 - views[c][1:] @ views[c][0]).mean()) for c in known}
    out["score:distance"] = d1
    out["score:ratio"] = distance_ratio(d1, d2)
    out["score:neg-packshots"] = outlier_ratio(d1, (1.0 - e @ neg_pack.T).min(1))
    out["score:neg-photos"] = outlier_ratio(d1, (1.0 - e @ neg_photo.T).min(1))
    out["score:view-scale"] = d1 / np.array([radius[c] for c in pred])
    pred_f, d1_f, d2_f = nearest_matches(gk, known, e_flip)
    out["right_flip"] = out["known"] & (np.array(pred_f) == labels)
    out["score:flip distance"] = d1_f.astype(np.float64)
    out["score:flip ratio"] = distance_ratio(d1_f, d2_f)
    pred_k, d1_k, _ = nearest_matches(np.concatenate([views[c] for c in known]), [c for c in known for _ in range(K_VIEWS)], e)
    out["right_k8"] = out["known"] & (np.array(pred_k) == labels)
    out["score:k8 distance"] = d1_k.astype(np.float64)
    return out


def _right_of(score: str) -> str:
    return "right_flip" if score.startswith("flip") else "right_k8" if score.startswith("k8") else "right"


def oracle_known_accepted(score: np.ndarray, right: np.ndarray, known: np.ndarray, precision: float = 0.9) -> float:
    """Largest share of known photos accepted (score <= threshold) at known precision >= ``precision``
    on these very photos (:func:`retailklip.calibration.threshold_for_precision`); 0 when none."""
    try:
        t = threshold_for_precision(score, right, precision)
    except CalibrationError:
        return 0.0
    return float((score <= t)[known].mean())


def fold_auroc(score: np.ndarray, known: np.ndarray, fold: np.ndarray) -> float:
    """Mean over folds of AUROC known vs unknown (known = low score); ValueError when a fold lacks a side."""
    vals = []
    for f in np.unique(fold):
        m = fold == f
        k, u = score[m & known], score[m & ~known]
        if not len(k) or not len(u):
            raise ValueError("a fold without known or unknown photos")
        vals.append(auroc(-k, -u))
    return float(np.mean(vals))


def summarize_open(opens: dict[str, list[dict]], correct: dict[str, list[np.ndarray]], args) -> dict:
    """Closed-set flip / k8 variants and the open-set scores per recipe (module docstring); writes open_set.json."""
    res: dict = {}
    ref = opens.get(args.reference)
    for name, parts in opens.items():
        fold = np.concatenate([np.full(len(p["known"]), i) for i, p in enumerate(parts)])
        cat = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        plain = np.concatenate(correct[name])
        row: dict = {"closed": {}, "open": {}}
        for v in CLOSED_VARIANTS:
            c = cat[f"correct_{v}"]
            m = mcnemar(c, plain)
            row["closed"][v] = {"top1": bootstrap_ci(c.astype(float)).__dict__,
                                "mcnemar_vs_plain": {"only_this": m.only_a, "only_plain": m.only_b, "p_value": m.p_value}}
            if ref is not None and name != args.reference:
                rc = np.concatenate([p[f"correct_{v}"] for p in ref])
                m = mcnemar(c, rc)
                row["closed"][v]["mcnemar_vs_reference"] = {"only_this": m.only_a, "only_reference": m.only_b, "p_value": m.p_value}
        known = cat["known"]
        base = cat["score:distance"]
        rbase = np.concatenate([p["score:distance"] for p in ref]) if ref is not None else None
        for sc in OPEN_SCORES:
            x = cat[f"score:{sc}"]
            r = {"auroc": bootstrap_statistic(fold_auroc, x, known, fold).__dict__,
                 "oracle_known_accepted_per_fold": [oracle_known_accepted(p[f"score:{sc}"], p[_right_of(sc)], p["known"])
                                                    for p in parts]}
            r["oracle_known_accepted"] = float(np.mean(r["oracle_known_accepted_per_fold"]))
            if sc != "distance":
                r["auroc_minus_distance"] = bootstrap_statistic(
                    lambda a, b, k, f: fold_auroc(a, k, f) - fold_auroc(b, k, f), x, base, known, fold).__dict__
            if rbase is not None and name != args.reference:
                r["auroc_minus_reference_distance"] = bootstrap_statistic(
                    lambda a, b, k, f: fold_auroc(a, k, f) - fold_auroc(b, k, f), x, rbase, known, fold).__dict__
            row["open"][sc] = r
        row["known_photos"], row["unknown_photos"] = int(known.sum()), int((~known).sum())
        res[name] = row
    (args.out / "open_set.json").write_text(json.dumps(res, indent=1) + "\n")
    print(open_table(res))
    return res


def open_table(res: dict) -> str:
    """Markdown tables of :func:`summarize_open`'s result."""
    def f(i: dict) -> str:
        return f"{i['mean']:.3f} [{i['low']:.3f}, {i['high']:.3f}]"

    lines = ["| recipe | variant | top-1 | vs plain 1-NN (only this / only plain, p) |", "|---|---|---|---|"]
    for name, row in res.items():
        for v, r in row["closed"].items():
            m = r["mcnemar_vs_plain"]
            lines.append(f"| {name} | {v} | {f(r['top1'])} | {m['only_this']} / {m['only_plain']}, p = {m['p_value']:.2g} |")
    lines += ["", "| recipe | score | AUROC known vs unknown | minus distance | minus reference's distance | oracle known accepted at precision 0.9 (per fold) |",
              "|---|---|---|---|---|---|"]
    for name, row in res.items():
        for sc, r in row["open"].items():
            lines.append(f"| {name} | {sc} | {f(r['auroc'])} | {f(r['auroc_minus_distance']) if 'auroc_minus_distance' in r else '-'} "
                         f"| {f(r['auroc_minus_reference_distance']) if 'auroc_minus_reference_distance' in r else '-'} "
                         f"| {r['oracle_known_accepted']:.3f} ({', '.join(f'{a:.3f}' for a in r['oracle_known_accepted_per_fold'])}) |")
    return "\n".join(lines)


def run_seed(out: Path) -> int | None:
    """The ``--seed`` of the run in ``out`` (``OUT/seed.txt``); 0 for a run from before
    ``--seed`` (a correct.json without seed.txt); None for no run at all."""
    if (out / "seed.txt").is_file():
        return int((out / "seed.txt").read_text())
    return 0 if (out / "correct.json").is_file() else None


def fold_queries(folds, names: list[str], photos: dict[str, list[Path]], n: int) -> list[list[tuple[Path, str]]]:
    """Per fold, its evaluation photos in the order their results are stored: up to ``n`` train
    photos of each held-out class, (photo, class) pairs."""
    return [[(q, c) for c in (names[i] for i in fold.test) for q in photos[c][:n]] for fold in folds]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=Path("../shared/data/grocery-store"))
    p.add_argument("--weights", type=Path, default=Path("../shared/models/mobilenetv2_100.imagenet.safetensors"))
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--folds", type=int, default=2)
    p.add_argument("--seed", type=int, default=0, help="deals the folds and seeds every finetune (a replicate CV)")
    p.add_argument("--queries", type=int, default=10, help="train photos per evaluated class")
    p.add_argument("--recipes", default="baseline,train-iconic,epochs-5")
    p.add_argument("--reference", default="train-iconic", help="recipe McNemar's test compares against")
    p.add_argument("--open-set", action=argparse.BooleanOptionalAction, default=True,
                   help="also the flip / k8 closed-set variants and the open-set scores (module docstring)")
    p.add_argument("--negatives", type=int, default=5, help="train photos per training class as outliers (neg-photos)")
    p.add_argument("--classes", choices=("loop-training", "all"), default="loop-training",
                   help="the classes dealt into folds: the loop's 46 training classes (its held-out classes untouched) "
                        "or all 81 (a wider check; the loop's held-out classes then take part)")
    p.add_argument("--pool", type=Path, nargs="+", metavar="RUN_OUT",
                   help="pool the replicate runs in these OUT directories instead of training (module docstring)")
    p.add_argument("--centred", action=argparse.BooleanOptionalAction, default=True,
                   help=f"also score every encoder with features centred on every {CENTER_STRIDE}th train photo of the "
                        "fold's training classes, as the loop's catalogs are (rows 'NAME@centred')")
    args = p.parse_args(argv)
    bad = [r for r in args.recipes.split(",") if r not in RECIPES]
    if bad:
        p.error(f"unknown recipe(s) {', '.join(bad)}; choose from {', '.join(RECIPES)}")
    store = read_grocery_store(args.data)
    trained = [c for c in store.classes if args.classes == "all" or c.coarse_id % 2 == 1]  # default: the loop's training classes
    names = [c.name for c in trained]
    iconic = {c.name: c.iconic.resolve() for c in trained}
    photos = defaultdict(list)
    for ph in store.photos("train"):
        if ph.label in iconic:
            photos[ph.label].append(ph.path.resolve())
    if args.pool:
        return 0 if pool(args, names, photos, [c.coarse_name for c in trained]) else 1
    folds = class_disjoint_folds(names, k=args.folds, seed=args.seed, groups=[c.coarse_name for c in trained])
    args.out.mkdir(parents=True, exist_ok=True)
    earlier = run_seed(args.out)
    if earlier is not None and earlier != args.seed:
        p.error(f"{args.out} holds a run with --seed {earlier}, not {args.seed}: use another --out")
    (args.out / "seed.txt").write_text(f"{args.seed}\n")
    raw = create_encoder("timm:mobilenetv2_100", weights=args.weights, interpolation="bilinear")
    correct: dict[str, list[np.ndarray]] = defaultdict(list)
    tests = [[names[i] for i in fold.test] for fold in folds]
    trains = [[names[i] for i in fold.train] for fold in folds]
    queries = fold_queries(folds, names, photos, args.queries)
    centre_photos = [[q for c in train for q in photos[c]][::CENTER_STRIDE] for train in trains]
    for fold, test in zip(folds, tests):
        correct["raw"].append(score(raw, [iconic[c] for c in test], test, queries[fold.index]))

    def measure_centred(name: str, enc_of) -> None:
        if not args.centred or f"{name}@centred" in correct:
            return
        for fold, test in zip(folds, tests):
            enc = enc_of(fold.index)
            enc = enc.with_center(enc.mean_feature(centre_photos[fold.index]))
            correct[f"{name}@centred"].append(score(enc, [iconic[c] for c in test], test, queries[fold.index]))
    coarse = {c.name: c.coarse_name for c in trained}
    knowns = []
    for test in tests:  # the open-set known half of each fold's held-out classes, by coarse class
        f = class_disjoint_folds(test, k=2, seed=0, groups=[coarse[c] for c in test])[0]
        knowns.append([test[i] for i in f.train])
    negatives = [[q for c in train for q in photos[c][: args.negatives]] for train in trains]
    opened = args.out / "open.json"
    opens: dict[str, list[dict]] = {}
    if opened.is_file():
        opens = {k: [{a: np.array(b) for a, b in part.items()} for part in v] for k, v in json.loads(opened.read_text()).items()}

    def measure_open(name: str, enc_of) -> None:
        if not args.open_set or name in opens:
            return
        parts = []
        for fold, test, train in zip(folds, tests, trains):
            t = time.perf_counter()
            parts.append(open_measure(enc_of(fold.index), iconic, test, knowns[fold.index], train, queries[fold.index],
                                      negatives[fold.index]))
            print(f"fold {fold.index} {name}: open set measured, {time.perf_counter() - t:.0f} s", flush=True)
        opens[name] = parts
        opened.write_text(json.dumps({k: [{a: b.tolist() for a, b in part.items()} for part in v]
                                      for k, v in opens.items()}) + "\n")

    measure_open("raw", lambda i: raw)
    done = args.out / "correct.json"  # recipes of an earlier run into the same OUT are kept, not rerun
    if done.is_file():
        for name, parts in json.loads(done.read_text()).items():
            if name != "raw":
                correct[name] = [np.array(x, bool) for x in parts]
    measure_centred("raw", lambda i: raw)
    def trained_encoder(name: str):
        return lambda i: create_encoder("timm:mobilenetv2_100", weights=args.out / f"fold{i}" / name / "encoder.safetensors",
                                        interpolation="bilinear")

    for name in args.recipes.split(","):
        if name in correct:
            print(f"{name}: kept from {done}", flush=True)
            if all((args.out / f"fold{f.index}" / name / "encoder.safetensors").is_file() for f in folds):
                if name not in opens:
                    measure_open(name, trained_encoder(name))
                measure_centred(name, trained_encoder(name))
            continue
        for fold, test, train in zip(folds, tests, trains):
            d = args.out / f"fold{fold.index}"
            d.mkdir(exist_ok=True)
            extra = list(RECIPES[name])
            arcface = train
            for token in [t for t in extra if t.startswith("+outliers")]:  # "+outliersF": Outlier Exposure
                extra.remove(token)
                k = round(1 / float(token[len("+outliers"):]))
                part = class_disjoint_folds(train, k=k, seed=args.seed, groups=[coarse[c] for c in train])[0]
                outlier_classes = [train[i] for i in part.test]
                arcface = [c for c in train if c not in set(outlier_classes)]
                with open(d / f"outliers-{name}.csv", "w", newline="") as f:
                    csv.writer(f).writerows([("image", "label"), *[(str(q), c) for c in outlier_classes
                                                                   for q in [iconic[c], *photos[c]]]])
                extra += ["--outlier-data", str(d / f"outliers-{name}.csv")]
            rows = [(str(q), c, "query") for c in arcface for q in photos[c]]
            for token in [t for t in extra if t.startswith("+iconic")]:  # "+iconicN": --reference-copies N
                extra.remove(token)
                rows += [(str(iconic[c]), c, "reference") for c in arcface]
                extra += ["--reference-copies", token[len("+iconic"):] or "1"]
            with open(d / f"train-{name}.csv", "w", newline="") as f:
                csv.writer(f).writerows([("image", "label", "role"), *rows])
            with open(d / "eval.csv", "w", newline="") as f:  # the finetune's own check: 1 query per class
                csv.writer(f).writerows([("image", "label", "role")] + [r for c in test for r in
                                        ((str(iconic[c]), c, "reference"), (str(photos[c][-1]), c, "query"))])
            ft = ["--data", str(d / f"train-{name}.csv"), "--eval-data", str(d / "eval.csv"), "--out", str(d / name),
                  "--encoder", "timm:mobilenetv2_100", "--weights", str(args.weights), "--encoder-option",
                  "interpolation=bilinear", "--epochs", "3", "--depth", "12", "--batch-size", "16", "--freeze-blocks", "3",
                  "--threads", "1", "--no-progress", "--eval-every", "100", "--seed", str(args.seed), *extra]
            threads = torch.get_num_threads()
            t = time.perf_counter()
            finetune_run(config_from_args(build_parser().parse_args(ft)))
            torch.set_num_threads(threads)
            enc = create_encoder("timm:mobilenetv2_100", weights=d / name / "encoder.safetensors", interpolation="bilinear")
            correct[name].append(score(enc, [iconic[c] for c in test], test, queries[fold.index]))
            print(f"fold {fold.index} {name}: {correct[name][-1].mean():.3f} (raw {correct['raw'][fold.index].mean():.3f}), "
                  f"{time.perf_counter() - t:.0f} s", flush=True)
        measure_centred(name, trained_encoder(name))
        summarize(correct, args)
        measure_open(name, trained_encoder(name))
    summarize(correct, args)
    if args.open_set:
        summarize_open({k: v for k, v in opens.items() if k in correct}, correct, args)
    return 0


def pool(args, names: list[str], photos: dict[str, list[Path]], groups: list[str]) -> dict:
    """Replicate CVs (``--seed`` runs in ``args.pool``) pooled photo by photo (module docstring).

    Each run's ``correct.json`` holds, per recipe, one bool array per fold in the order the run
    evaluated them; the photo order is rebuilt from the run's seed (``seed.txt``, 0 when absent:
    runs from before ``--seed``).  Returns (and writes to ``OUT/pooled.json``) per recipe:
    ``per_run`` top-1, ``top1`` pooled, and ``minus_reference`` (mean over photos of the
    per-photo difference averaged over runs, with a 95 % bootstrap interval over photos; an
    ``@centred`` row against the reference's ``@centred`` row).
    """
    runs = []
    for out in args.pool:
        seed = run_seed(out)
        if seed is None or not (out / "correct.json").is_file():
            raise SystemExit(f"--pool: {out} holds no correct.json (not a finished run of this script)")
        folds = class_disjoint_folds(names, k=args.folds, seed=seed, groups=groups)
        order = [str(q) for part in fold_queries(folds, names, photos, args.queries) for q, _ in part]
        correct = json.loads((out / "correct.json").read_text())
        runs.append((seed, {name: dict(zip(order, np.concatenate(parts).astype(bool), strict=True))
                            for name, parts in correct.items()}))
    keys = sorted(set.intersection(*(set(r) for _, r in runs)), key=lambda n: (n != "raw", n))
    if args.reference not in keys:
        print(f"not every run holds the reference recipe {args.reference}", file=sys.stderr)
        return {}
    photo_ids = sorted(runs[0][1][args.reference])
    if any(sorted(r[args.reference]) != photo_ids for _, r in runs):
        raise SystemExit("the runs evaluated different photos: pool runs of the same --classes, --folds, --queries")
    def table(name: str) -> np.ndarray:  # (photos, runs)
        return np.array([[r[name][q] for _, r in runs] for q in photo_ids], float)

    res = {}
    print(f"pooled over seeds {', '.join(str(s) for s, _ in runs)} ({len(photo_ids)} photos each)")
    for name in keys:
        x = table(name)
        row = {"per_run": [float(v) for v in x.mean(axis=0)], "top1": float(x.mean())}
        reference = args.reference + ("@centred" if name.endswith("@centred") else "")  # like with like
        if name != reference and reference in keys:
            d = bootstrap_ci((x - table(reference)).mean(axis=1))
            row["minus_reference"] = {"reference": reference, "mean": d.mean, "low": d.low, "high": d.high}
        res[name] = row
        line = f"{name}: top-1 {row['top1']:.3f} (runs {' / '.join(f'{v:.3f}' for v in row['per_run'])})"
        if "minus_reference" in row:
            line += f"; minus {reference} {d.mean:+.3f} [{d.low:+.3f}, {d.high:+.3f}]"
        print(line)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "pooled.json").write_text(json.dumps({"seeds": [s for s, _ in runs], "recipes": res}, indent=1) + "\n")
    return res


def summarize(correct: dict[str, list[np.ndarray]], args) -> dict:
    """Top-1 with a bootstrap interval per recipe, McNemar vs ``args.reference``; writes cv.json."""
    res = {}
    for name, parts in correct.items():
        reference = args.reference + ("@centred" if name.endswith("@centred") else "")  # like is compared with like
        ref = np.concatenate(correct[reference]) if reference in correct else None
        c = np.concatenate(parts)
        ci = bootstrap_ci(c.astype(float))
        row = {"top1": ci.mean, "low": ci.low, "high": ci.high, "photos": len(c),
               "per_fold": [float(x.mean()) for x in parts]}
        if ref is not None and name != reference and len(c) == len(ref):
            m = mcnemar(c, ref)
            row["mcnemar_vs_reference"] = {"reference": reference, "only_this": m.only_a, "only_reference": m.only_b,
                                           "p_value": m.p_value}
        res[name] = row
        mc = row.get("mcnemar_vs_reference")
        print(f"{name}: top-1 {ci} over {len(c)} photos" + (f"; vs {reference} {mc['only_this']} vs "
                                                            f"{mc['only_reference']}, p = {mc['p_value']:.3g}" if mc else ""))
    (args.out / "cv.json").write_text(json.dumps(res, indent=1) + "\n")
    (args.out / "correct.json").write_text(json.dumps({k: [x.tolist() for x in v] for k, v in correct.items()}) + "\n")
    return res


if __name__ == "__main__":
    sys.exit(main())
