"""Choose the loop's finetune recipe by class-disjoint cross-validation on the **training**
classes only (examples/retailklip_loop.py's held-out classes are never touched).

    python3 benchmarks/bench_loop_recipe.py --data ../shared/data/grocery-store --out /tmp/loop-cv

The loop's 46 training classes (odd coarse ids) are dealt into k class-disjoint folds by coarse
class (:func:`retailklip.protocol.class_disjoint_folds`).  Per fold and recipe: finetune on the
other folds' train photos, then closed-set 1-NN top-1 of the fold's classes: gallery = their iconic
packshots (K = 1, no feature centring), queries = up to ``--queries`` train photos per class.  The
raw encoder is scored on the same photos.  Prints top-1 per recipe with a bootstrap interval over
all folds' photos and McNemar's test against the ``--reference`` recipe (default ``train-iconic``,
the loop's shipped recipe), and writes ``OUT/cv.json`` (after every recipe: each recipe runs all
its folds before the next starts, so an interrupted run keeps whole recipes).  Each run's per-photo
results are kept in ``OUT/correct.json``; a later run into the same OUT keeps the recipes it
holds (the runs are deterministic: seed 0, 1 thread) and runs only the others.
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

from finetune.cli import build_parser, config_from_args
from finetune.cli import run as finetune_run
from retailklip.calibration import nearest_skus
from retailklip.datasets import read_grocery_store
from retailklip.encoders import create_encoder
from retailklip.protocol import bootstrap_ci, class_disjoint_folds, mcnemar

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
}


def score(enc, references: list[Path], classes: list[str], queries: list[tuple[Path, str]]) -> np.ndarray:
    """bool (M,): 1-NN over the classes' packshots names each query's class."""
    pred, _ = nearest_skus(enc.embed(references), classes, enc.embed([q for q, _ in queries]))
    return np.array([a == c for a, (_, c) in zip(pred, queries)])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=Path("../shared/data/grocery-store"))
    p.add_argument("--weights", type=Path, default=Path("../shared/models/mobilenetv2_100.imagenet.safetensors"))
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--folds", type=int, default=2)
    p.add_argument("--queries", type=int, default=10, help="train photos per evaluated class")
    p.add_argument("--recipes", default="baseline,train-iconic,epochs-5")
    p.add_argument("--reference", default="train-iconic", help="recipe McNemar's test compares against")
    args = p.parse_args(argv)
    bad = [r for r in args.recipes.split(",") if r not in RECIPES]
    if bad:
        p.error(f"unknown recipe(s) {', '.join(bad)}; choose from {', '.join(RECIPES)}")
    store = read_grocery_store(args.data)
    trained = [c for c in store.classes if c.coarse_id % 2 == 1]  # the loop's training classes
    names = [c.name for c in trained]
    iconic = {c.name: c.iconic.resolve() for c in trained}
    photos = defaultdict(list)
    for ph in store.photos("train"):
        if ph.label in iconic:
            photos[ph.label].append(ph.path.resolve())
    folds = class_disjoint_folds(names, k=args.folds, seed=0, groups=[c.coarse_name for c in trained])
    args.out.mkdir(parents=True, exist_ok=True)
    raw = create_encoder("timm:mobilenetv2_100", weights=args.weights, interpolation="bilinear")
    correct: dict[str, list[np.ndarray]] = defaultdict(list)
    tests = [[names[i] for i in fold.test] for fold in folds]
    trains = [[names[i] for i in fold.train] for fold in folds]
    queries = [[(q, c) for c in test for q in photos[c][: args.queries]] for test in tests]
    for fold, test in zip(folds, tests):
        correct["raw"].append(score(raw, [iconic[c] for c in test], test, queries[fold.index]))
    done = args.out / "correct.json"  # recipes of an earlier run into the same OUT are kept, not rerun
    if done.is_file():
        for name, parts in json.loads(done.read_text()).items():
            if name != "raw":
                correct[name] = [np.array(x, bool) for x in parts]
    for name in args.recipes.split(","):
        if name in correct:
            print(f"{name}: kept from {done}", flush=True)
            continue
        for fold, test, train in zip(folds, tests, trains):
            d = args.out / f"fold{fold.index}"
            d.mkdir(exist_ok=True)
            extra = list(RECIPES[name])
            rows = [(str(q), c) for c in train for q in photos[c]]
            if "+iconic" in extra:
                extra.remove("+iconic")
                rows += [(str(iconic[c]), c) for c in train]
            with open(d / f"train-{name}.csv", "w", newline="") as f:
                csv.writer(f).writerows([("image", "label"), *rows])
            with open(d / "eval.csv", "w", newline="") as f:  # the finetune's own check: 1 query per class
                csv.writer(f).writerows([("image", "label", "role")] + [r for c in test for r in
                                        ((str(iconic[c]), c, "reference"), (str(photos[c][-1]), c, "query"))])
            ft = ["--data", str(d / f"train-{name}.csv"), "--eval-data", str(d / "eval.csv"), "--out", str(d / name),
                  "--encoder", "timm:mobilenetv2_100", "--weights", str(args.weights), "--encoder-option",
                  "interpolation=bilinear", "--epochs", "3", "--depth", "12", "--batch-size", "16", "--freeze-blocks", "3",
                  "--threads", "1", "--no-progress", "--eval-every", "100", *extra]
            threads = torch.get_num_threads()
            t = time.perf_counter()
            finetune_run(config_from_args(build_parser().parse_args(ft)))
            torch.set_num_threads(threads)
            enc = create_encoder("timm:mobilenetv2_100", weights=d / name / "encoder.safetensors", interpolation="bilinear")
            correct[name].append(score(enc, [iconic[c] for c in test], test, queries[fold.index]))
            print(f"fold {fold.index} {name}: {correct[name][-1].mean():.3f} (raw {correct['raw'][fold.index].mean():.3f}), "
                  f"{time.perf_counter() - t:.0f} s", flush=True)
        summarize(correct, args)
    return 0


def summarize(correct: dict[str, list[np.ndarray]], args) -> dict:
    """Top-1 with a bootstrap interval per recipe, McNemar vs ``args.reference``; writes cv.json."""
    res = {}
    ref = np.concatenate(correct[args.reference]) if args.reference in correct else None
    for name, parts in correct.items():
        c = np.concatenate(parts)
        ci = bootstrap_ci(c.astype(float))
        row = {"top1": ci.mean, "low": ci.low, "high": ci.high, "photos": len(c),
               "per_fold": [float(x.mean()) for x in parts]}
        if ref is not None and name != args.reference and len(c) == len(ref):
            m = mcnemar(c, ref)
            row["mcnemar_vs_reference"] = {"reference": args.reference, "only_this": m.only_a, "only_reference": m.only_b,
                                           "p_value": m.p_value}
        res[name] = row
        mc = row.get("mcnemar_vs_reference")
        print(f"{name}: top-1 {ci} over {len(c)} photos" + (f"; vs {args.reference} {mc['only_this']} vs "
                                                            f"{mc['only_reference']}, p = {mc['p_value']:.3g}" if mc else ""))
    (args.out / "cv.json").write_text(json.dumps(res, indent=1) + "\n")
    (args.out / "correct.json").write_text(json.dumps({k: [x.tolist() for x in v] for k, v in correct.items()}) + "\n")
    return res


if __name__ == "__main__":
    sys.exit(main())
