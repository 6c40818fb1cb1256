"""The RetailKLIP loop on GroceryStore in one command: split by coarse class, finetune, rebuild
the catalog with the new weights, calibrate, and compare before / after on held-out classes.

    python3 examples/retailklip_loop.py --data ../shared/data/grocery-store --out /tmp/loop

Steps (everything from the dataset's **train** split; test is never read, val only by
``--final-val``, the protocol's one final report on the held-out classes' val photos):

1. Split the 81 fine classes by coarse class, as ``python -m finetune.grocery`` does (odd coarse
   ids train, even ones are held out; ``--held-out-parity``): 46 training classes, 35 held-out
   classes, no coarse class on both sides.  The held-out classes' train photos are dealt into
   *evaluation* and *calibration* photos by capture session
   (:func:`retailklip.protocol.session_folds` over :func:`~retailklip.protocol.capture_groups` of
   the raw encoder's embeddings, k = 2: near-copies of a photo never sit on the other side, so a
   threshold is not judged on near-copies of its calibration photos; ``--folds photo``: stratified
   photo folds, as before 2026-12-07).  Closed-set top-1 needs no calibration, so it is measured
   on every held-out train photo (evaluation and calibration photos; before 2026-12-07: the
   evaluation photos only).  For
   the open-set part the held-out classes are split by coarse class
   (:func:`retailklip.protocol.class_disjoint_folds`, k = 2) into *known* (in the open-set
   catalog) and *unknown* classes, and the unknown ones again into those seen at calibration and
   those seen at evaluation, so the threshold is judged on products it was not calibrated on.
2. Finetune the MobileNetV2 on the training classes' photos and packshots (``finetune``: ArcFace, blockwise
   learning-rate decay, 0.9 per lower block, class-balanced sampling; RetailKLIP, Srivastava 2023, §4.1),
   each packshot a ``reference`` row counted ``--reference-copies`` (12) times in the class-balanced
   draw; ArcFace sees the catalogs' embedding, the pooled output next to the last stage
   (``--train-on-catalog-embedding``); packshots, their copies, the decay and the embedding trained
   chosen by class-disjoint CV on the training classes, benchmarks/bench_loop_recipe.py and
   benchmarks/bench_finetuned_input.py) -> ``OUT/encoder.safetensors`` (the timm model's weights,
   loadable with or without ``feature_stage``).
3. Two catalogs of iconic packshots (``catalog.Catalog.init`` + ``import_csv``, features centred
   on unlabeled training-class photos as examples/grocery_store.py does; encoder options
   ``interpolation=bilinear`` and ``feature_stage=["pooled", -1]``: the pooled embedding next to
   the last stage's, ``--feature-stage``): ``catalog-all`` (the 35
   held-out classes: closed-set top-1) and ``catalog-known`` (the known half: open set).  Measured
   with the raw encoder (before), then ``Catalog.rebuild(encoder=..., weights=OUT/encoder.safetensors)``
   (= ``catalog rebuild --encoder timm:mobilenetv2_100 --weights OUT/encoder.safetensors`` with the
   same encoder options) and
   measured again (after), its features centred on the same photos (``--no-center-after``: not).
   ``catalog-known`` also gets the 46 training classes' packshots as
   *outlier references* (products not in the catalog) through the CLI,
   ``catalog --catalog OUT/catalog-known outliers add PACKSHOT...``; the rebuild re-embeds them
   with the finetuned encoder.
4. ``catalog --catalog OUT/catalog-known calibrate OUT/calibration.csv --match-softmax-cutoff 0.78 --score S --json``
   (or ``--target-precision P``) for every open-set score S (``distance``, ``ratio``,
   ``outlier-ratio``), the ``--score`` one (default ``outlier-ratio``, ``catalog calibrate``'s
   default on a catalog with outlier references) last, so its threshold is the one stored;
   before and after the rebuild.
5. Prints a before / after table (closed-set top-1 with bootstrap intervals and McNemar's test,
   per-class top-1 and their average with a bootstrap interval over classes, AUROC known vs unknown with a bootstrap interval over photos, accepted
   fraction, known precision and unknown rejection at the calibrated threshold), a per-score
   open-set table (AUROC, the calibrated threshold judged on the evaluation photos, and the
   *oracle* operating point: the largest acceptance with known precision >= ``--oracle-precision``
   read off the evaluation photos themselves, an upper bound for any calibration) and writes it
   all to ``OUT/loop.json``.  ``outlier-ratio`` (:func:`retailklip.open_set.outlier_ratio`) is
   computed from the catalog's own outlier vectors (``catalog_outliers``), as the recognizer does.

The held-out photos are embedded once per encoder with the catalog's own encoder
(``Catalog.encoder().embed``, what ``catalog recognize`` runs on a whole image) and matched by
:func:`retailklip.calibration.nearest_skus` against each catalog's vectors, the functions
``catalog calibrate`` uses.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

# the repository's own packages first (not an installed copy of them)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from catalog import Catalog
from finetune.cli import build_parser, config_from_args
from finetune.cli import run as finetune_run
from retailklip.calibration import (
    CalibrationError,
    auroc,
    catalog_gallery,
    catalog_outliers,
    nearest_matches,
    nearest_skus,
    open_set_metrics,
    outlier_distances,
    threshold_for_precision,
)
from retailklip.datasets import LabelledImage, read_grocery_store
from retailklip.encoders import create_encoder
from retailklip.open_set import OPEN_SET_SCORES, OUTLIER_SCORE, open_set_score
from retailklip.protocol import (
    bootstrap_ci,
    bootstrap_statistic,
    capture_groups,
    class_disjoint_folds,
    mcnemar,
    photo_folds,
    session_folds,
)

ENCODER = "timm:mobilenetv2_100"
OPTIONS = {"interpolation": "bilinear"}  # the capture groups' encoder (SESSION_COSINE is defined on it) and the finetune's
#: the catalogs' embedding: the pooled output next to the last stage's, each normalised on its own
#: (retailklip.encoders.multiscale; chosen by the class-disjoint CV, docs/finetune.md "Seventh round")
FEATURE_STAGE = ["pooled", -1]
RAW_WEIGHTS = Path("../shared/models/mobilenetv2_100.imagenet.safetensors")


def write_csv(path: Path, header: list[str], rows) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def catalog_options(args) -> dict:
    """Encoder options of the before and after catalogs (``--feature-stage``)."""
    return {**OPTIONS, **({"feature_stage": args.feature_stage} if args.feature_stage is not None else {})}


def trained_feature_stage(args):
    """The feature_stage the finetune trains on (``--train-on-catalog-embedding``): the catalogs'
    (``--feature-stage``), or None for the pooled output alone."""
    return args.feature_stage if args.train_on_catalog_embedding else None


def split(args) -> dict:
    """The class and photo split of step 1 (deterministic in ``args.seed``)."""
    store = read_grocery_store(args.data)
    coarse = {c.name: c.coarse_name for c in store.classes}
    held = [c.name for c in store.classes if c.coarse_id % 2 == args.held_out_parity]
    trained = [c.name for c in store.classes if c.coarse_id % 2 != args.held_out_parity]
    count: dict[str, int] = defaultdict(int)
    train_photos, held_photos = [], []
    for p in store.photos("train"):
        cap = args.max_held_out_photos if p.label in held else args.max_train_photos
        if cap and count[p.label] >= cap:
            continue
        count[p.label] += 1
        (held_photos if p.label in held else train_photos).append(p)
    labels = [p.label for p in held_photos]
    if args.folds == "session":  # capture sessions of the raw encoder's embeddings (SESSION_COSINE)
        raw = create_encoder(ENCODER, weights=args.weights, **OPTIONS)
        groups = capture_groups(raw.embed([p.path for p in held_photos]), labels)
        fold = session_folds(labels, groups, k=2, seed=args.seed)[0]
    else:
        groups = np.arange(len(held_photos))
        fold = photo_folds(labels, k=2, seed=args.seed)[0]
    evaluation = [held_photos[i] for i in fold.test]
    calibration = [held_photos[i] for i in fold.train]
    f = class_disjoint_folds(held, k=2, seed=args.seed, groups=[coarse[c] for c in held])[0]
    known, unknown = [held[i] for i in f.train], [held[i] for i in f.test]
    g = class_disjoint_folds(unknown, k=2, seed=args.seed, groups=[coarse[c] for c in unknown])[0]
    unknown_cal, unknown_eval = [unknown[i] for i in g.train], [unknown[i] for i in g.test]
    val = [p for p in store.photos("val") if p.label in set(held)] if args.final_val else []
    return {
        "val": val, "store": store, "coarse": coarse, "trained": trained, "held": held, "known": known,
        "unknown_calibration": unknown_cal, "unknown_evaluation": unknown_eval,
        "train_photos": train_photos, "evaluation": evaluation, "closed": held_photos, "capture_groups": len(set(groups.tolist())),
        "calibration": [p for p in calibration if p.label in set(known) | set(unknown_cal)],
        "open_evaluation": [p for p in evaluation if p.label in set(known) | set(unknown_eval)],
    }


def write_inputs(s: dict, out: Path, center_stride: int, train_iconic: bool) -> dict[str, Path]:
    """CSVs and lists the steps read, all under ``out``."""
    store = s["store"]
    iconic = {c.name: c.iconic.resolve() for c in store.classes}
    train_rows = [(str(p.path.resolve()), p.label, "query") for p in s["train_photos"]]
    if train_iconic:  # the training classes' packshots too, as reference rows (benchmarks/bench_loop_recipe.py)
        train_rows += [(str(iconic[c]), c, "reference") for c in s["trained"]]
    files = {
        "train": write_csv(out / "train.csv", ["image", "label", "role"], train_rows),
        "all": write_csv(out / "catalog-all.csv", ["image", "sku", "name"], [(str(iconic[c]), c, c) for c in s["held"]]),
        "known": write_csv(out / "catalog-known.csv", ["image", "sku", "name"], [(str(iconic[c]), c, c) for c in s["known"]]),
        "calibration": write_csv(out / "calibration.csv", ["image", "sku"],
                                 [(str(p.path.resolve()), p.label) for p in s["calibration"]]),
        "evaluation": write_csv(out / "evaluation.csv", ["image", "sku"],
                                [(str(p.path.resolve()), p.label) for p in s["evaluation"]]),
    }
    # the finetune's own zero-shot check (information only): packshot + 2 calibration photos per held-out class
    rows, per = [], defaultdict(list)
    for p in s["calibration"]:
        per[p.label].append(p.path)
    by_class = defaultdict(list)
    for p in s["evaluation"] + s["calibration"]:
        by_class[p.label].append(p.path)
    for c in s["held"]:
        rows.append((str(iconic[c]), c, "reference"))
        rows += [(str(q.resolve()), c, "query") for q in (per[c] or by_class[c])[:2]]
    files["finetune_eval"] = write_csv(out / "finetune-eval.csv", ["image", "label", "role"], rows)
    center = [p.path.resolve() for p in s["train_photos"]][::center_stride] if center_stride else []
    files["center"] = out / "center.txt"
    files["center"].write_text("".join(f"{p}\n" for p in center))
    return files


def calibrate_cli(catalog_dir: Path, photos_csv: Path, args, score: str) -> dict:
    """``catalog calibrate ... --score SCORE --json`` (stores the threshold); its JSON output."""
    mode = (["--target-precision", str(args.target_precision)] if args.target_precision is not None
            else ["--match-softmax-cutoff", str(args.match_softmax_cutoff)])
    cmd = [sys.executable, "-m", "catalog", "--catalog", str(catalog_dir), "calibrate", str(photos_csv), *mode,
           "--score", score, "--json"]
    res = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"retailklip_loop: error: catalog calibrate failed: {res.stderr.strip()}")
    return json.loads(res.stdout)


def add_outliers_cli(catalog_dir: Path, images: list[Path]) -> int:
    """``catalog --catalog DIR outliers add IMAGE... --json``; the number of outlier references added."""
    cmd = [sys.executable, "-m", "catalog", "--catalog", str(catalog_dir), "outliers", "add", *map(str, images), "--json"]
    res = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"retailklip_loop: error: catalog outliers add failed: {res.stderr.strip()}")
    return len(json.loads(res.stdout))


def calibrate_all(catalog_dir: Path, photos_csv: Path, args) -> dict[str, dict]:
    """``catalog calibrate`` on every open-set score, ``--score`` last, so that the threshold the
    catalog keeps is the one on ``--score``; score -> its JSON output."""
    order = [x for x in OPEN_SET_SCORES if x != args.score] + [args.score]
    return {x: calibrate_cli(catalog_dir, photos_csv, args, x) for x in order}


def oracle_operating_point(score: np.ndarray, right: np.ndarray, known: np.ndarray, precision: float) -> dict | None:
    """The largest-acceptance threshold whose known precision *on these photos* is >= ``precision``
    (:func:`retailklip.calibration.threshold_for_precision` applied to the photos it is judged on:
    an oracle operating point, read off the evaluation photos, not a calibrated one); None when no
    threshold reaches it.  Photos are accepted when ``score <= threshold``.

    Returns:
        threshold, accepted_fraction (all photos), known_accepted (accepted known photos / known
        photos), known_precision, unknown_rejection, known_accuracy, accepted (photos).
    """
    score, right, known = np.asarray(score, np.float64), np.asarray(right, bool), np.asarray(known, bool)
    try:
        t = threshold_for_precision(score, right, precision)
    except CalibrationError:
        return None
    acc = score <= t
    return {"threshold": t, "accepted": int(acc.sum()), "accepted_fraction": float(acc.mean()),
            "known_accepted": float(acc[known].mean()), "known_precision": float(right[acc].mean()),
            "unknown_rejection": float((~acc[~known]).mean()) if (~known).any() else None,
            "known_accuracy": float((right & acc)[known].mean())}


def measure(cat_all: Catalog, cat_known: Catalog, s: dict, calibration: dict[str, dict], args) -> dict:
    """Closed-set and open-set results of one encoder (both catalogs hold its vectors);
    ``calibration``: score -> ``catalog calibrate --json`` output on the known catalog."""
    enc = cat_all.encoder()
    if enc.identity.key != cat_known.encoder().identity.key:
        raise SystemExit("retailklip_loop: error: the two catalogs have different encoders")
    photos: list[LabelledImage] = s["closed"]  # every held-out train photo (closed set needs no calibration photos)
    t = time.perf_counter()
    emb = enc.embed([p.path for p in photos])
    embed_s = time.perf_counter() - t
    truth = [p.label for p in photos]
    g_all, sku_all = catalog_gallery(cat_all)
    pred, _ = nearest_skus(g_all, sku_all, emb)
    correct = np.array([a == b for a, b in zip(pred, truth)])
    per_class: dict[str, list[bool]] = defaultdict(list)
    for ok, c in zip(correct, truth):
        per_class[c].append(bool(ok))
    # open set: the known half in the catalog, evaluation photos of known + evaluation-unknown classes
    open_evaluation = {p.path for p in s["open_evaluation"]}
    use = np.array([p.path in open_evaluation for p in photos])
    o_truth = [c for c, u in zip(truth, use) if u]
    g_known, sku_known = catalog_gallery(cat_known)
    o_pred, o_dist, o_runner = nearest_matches(g_known, sku_known, emb[use])
    # the training classes' packshots, outlier references of the known catalog (its active encoder's vectors)
    o_out = outlier_distances(catalog_outliers(cat_known), emb[use])
    scores = {x: open_set_score(x, o_dist, o_runner, o_out) for x in OPEN_SET_SCORES}
    threshold = cat_known.threshold
    if cat_known.open_set_score != args.score:
        raise SystemExit(f"retailklip_loop: error: the catalog's threshold is on {cat_known.open_set_score}, not {args.score}")
    known = np.array([c in set(s["known"]) for c in o_truth])
    accepted = scores[args.score] <= threshold
    m = open_set_metrics(o_pred, o_truth, known, accepted, -scores[args.score])
    right = known & (np.array(o_pred, dtype=object) == np.array(o_truth, dtype=object))
    ci = lambda v: (bootstrap_ci(v) if len(v) else None)
    auroc_ci = lambda sc: bootstrap_statistic(lambda x, k: auroc(-x[k], -x[~k]), sc, known) if (~known).any() else None
    per_score = {}
    for x, sc in scores.items():  # every score: AUROC, its calibrated threshold, the oracle operating point
        if x not in calibration:
            per_score[x] = {"auroc": auroc_ci(sc), "calibrated": None,
                            "oracle": oracle_operating_point(sc, right, known, args.oracle_precision)}
            continue
        t = calibration[x]["threshold"]
        acc = sc <= t
        per_score[x] = {
            "auroc": auroc_ci(sc),
            "calibrated": {"threshold": t, "mode": calibration[x]["mode"], "target": calibration[x]["target"],
                           "accepted_fraction": ci(acc.astype(float)), "known_accepted": ci(acc[known].astype(float)),
                           "known_precision": ci(right[acc].astype(float)),
                           "unknown_rejection": ci((~acc[~known]).astype(float)),
                           "known_accuracy": ci((right & acc)[known].astype(float))},
            "oracle": oracle_operating_point(sc, right, known, args.oracle_precision),
        }
    val_correct = np.zeros(0, bool)
    if s["val"]:
        v_pred, _ = nearest_skus(g_all, sku_all, enc.embed([p.path for p in s["val"]]))
        val_correct = np.array([a == p.label for a, p in zip(v_pred, s["val"])])
    return {
        "encoder": enc.identity.key,
        "correct": correct,
        "val_correct": val_correct,
        "embed_seconds": round(embed_s, 1),
        "closed_set": {"photos": len(photos), "classes": len(per_class), "top1": ci(correct.astype(float)),
                       # the mean of per-class top-1, its interval a bootstrap over classes (as the main job's)
                       "per_class_average": ci(np.array([np.mean(v) for v in per_class.values()])),
                       "per_class": {c: {"photos": len(v), "top1": float(np.mean(v))} for c, v in sorted(per_class.items())}},
        "open_set": {
            "score": args.score, "threshold": threshold, "calibration": calibration[args.score],
            "known_photos": m.known_photos, "unknown_photos": m.unknown_photos, "auroc": per_score[args.score]["auroc"],
            "accepted_fraction": ci(accepted.astype(float)), "known_accepted": ci(accepted[known].astype(float)),
            "known_precision": ci(right[accepted].astype(float)),
            "unknown_rejection": ci((~accepted[~known]).astype(float)),
            "known_accuracy": ci((right & accepted)[known].astype(float)),
            "closed_set_top1_known": m.closed_set_top1,
            "oracle_precision": args.oracle_precision,
            "scores": per_score,
        },
    }


def finetune(s: dict, files: dict, out: Path, args) -> dict:
    """Step 2 through the finetune's own command-line API (= ``python -m finetune ...``)."""
    argv = ["--data", str(files["train"]), "--eval-data", str(files["finetune_eval"]), "--out", str(out / "finetune"),
            "--encoder", ENCODER, "--weights", str(args.weights), "--encoder-option", "interpolation=bilinear",
            "--epochs", str(args.epochs), "--depth", str(args.depth), "--batch-size", str(args.batch_size),
            "--freeze-blocks", str(args.freeze_blocks), "--lr", str(args.lr), "--lr-decay", str(args.lr_decay),
            "--margin", str(args.margin),
            *(["--reference-copies", str(args.reference_copies)] if args.train_iconic else []),
            "--eval-every", str(args.epochs), "--threads", str(args.threads), "--seed", str(args.seed), "--no-progress"]
    if args.train_size:
        argv += ["--train-size", str(args.train_size)]
    stage = trained_feature_stage(args)
    if stage is not None:  # ArcFace on what the catalogs compare
        argv += ["--encoder-option", "feature_stage=" + json.dumps(stage)]
    threads = torch.get_num_threads()
    metrics = finetune_run(config_from_args(build_parser().parse_args(argv)))
    torch.set_num_threads(threads)
    shutil.copyfile(out / "finetune" / "encoder.safetensors", out / "encoder.safetensors")
    return {"argv": argv, "train_images_per_s": metrics.get("train_images_per_s"),
            "zero_shot_top1_before": metrics["zero_shot_top1_before"], "zero_shot_top1_after": metrics["zero_shot_top1_after"]}


def fmt(v) -> str:
    """A number, or an interval's ``mean [low, high]``, at 3 decimals; ``-`` for none."""
    if v is None:
        return "-"
    if hasattr(v, "mean"):
        return f"{v.mean:.3f} [{v.low:.3f}, {v.high:.3f}]"
    return f"{v:.3f}"


ROWS = [  # (label, path into a measure() result)
    ("closed-set top-1", ("closed_set", "top1")),
    ("closed-set per-class average", ("closed_set", "per_class_average")),
    ("AUROC known vs unknown", ("open_set", "auroc")),
    ("calibrated threshold", ("open_set", "threshold")),
    ("accepted fraction", ("open_set", "accepted_fraction")),
    ("known photos accepted", ("open_set", "known_accepted")),
    ("known precision", ("open_set", "known_precision")),
    ("unknown rejection", ("open_set", "unknown_rejection")),
    ("known accuracy", ("open_set", "known_accuracy")),
]


def score_rows(score: str, precision: float) -> list[tuple[str, tuple[str, ...]]]:
    """Rows of the per-score open-set table (every score, whichever ``--score`` stores)."""
    cal, orc = ("open_set", "scores", score, "calibrated"), ("open_set", "scores", score, "oracle")
    return [
        (f"{score}: AUROC known vs unknown", ("open_set", "scores", score, "auroc")),
        (f"{score}: calibrated threshold", (*cal, "threshold")),
        (f"{score}: calibrated, accepted fraction", (*cal, "accepted_fraction")),
        (f"{score}: calibrated, known photos accepted", (*cal, "known_accepted")),
        (f"{score}: calibrated, known precision", (*cal, "known_precision")),
        (f"{score}: calibrated, unknown rejection", (*cal, "unknown_rejection")),
        (f"{score}: oracle precision >= {precision:g}, threshold", (*orc, "threshold")),
        (f"{score}: oracle precision >= {precision:g}, known photos accepted", (*orc, "known_accepted")),
        (f"{score}: oracle precision >= {precision:g}, known precision", (*orc, "known_precision")),
        (f"{score}: oracle precision >= {precision:g}, unknown rejection", (*orc, "unknown_rejection")),
    ]


def get(res: dict, path: tuple[str, ...]):
    """``res[path[0]][path[1]]...``; None where a step is None (an oracle point no threshold reaches)."""
    for key in path:
        if res is None:
            return None
        res = res[key]
    return res


def jsonable(v):
    if hasattr(v, "mean") and hasattr(v, "low"):
        return {"mean": round(v.mean, 6), "low": round(v.low, 6), "high": round(v.high, 6), "level": v.level, "n": v.n}
    if isinstance(v, dict):
        return {k: jsonable(x) for k, x in v.items()}
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, float):
        return float(f"{v:.6g}")  # 6 significant digits: a p-value of 6e-10 stays 6e-10, not 0.0
    return v


def loop_parser() -> argparse.ArgumentParser:
    """The loop's command line (every default here is the shipped recipe)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=Path("../shared/data/grocery-store"))
    p.add_argument("--out", type=Path, required=True, help="output folder (emptied first)")
    p.add_argument("--weights", type=Path, default=RAW_WEIGHTS, help="raw encoder weights (ImageNet MobileNetV2)")
    p.add_argument("--held-out-parity", type=int, default=0, choices=(0, 1), help="hold out coarse ids with id %% 2 == this")
    p.add_argument("--max-train-photos", type=int, default=0, metavar="N", help="at most N training photos per class (0: all)")
    p.add_argument("--max-held-out-photos", type=int, default=0, metavar="N", help="at most N photos per held-out class (0: all)")
    p.add_argument("--folds", choices=("session", "photo"), default="session",
                   help="deal the held-out classes' photos into evaluation and calibration photos by capture session "
                        "(retailklip.protocol.session_folds; near-copies stay on one side) or by photo (stratified)")
    p.add_argument("--feature-stage", type=json.loads, default=FEATURE_STAGE, metavar="JSON",
                   help=f"the catalogs' feature_stage encoder option, JSON (default {json.dumps(FEATURE_STAGE)}: the "
                        "pooled embedding and the last stage's; null: the pooled embedding alone, as before 2026-12-07)")
    p.add_argument("--center-stride", type=int, default=6, help="centre features on every N-th training photo, unlabeled (0: none)")
    p.add_argument("--center-after", action=argparse.BooleanOptionalAction, default=True,
                   help="centre the finetuned encoder's features too, on the same photos (rebuild --center-photos); "
                        "--no-center-after rebuilds without (the evidence is mixed: docs/finetune.md, 'Fourth round')")
    g = p.add_argument_group("finetune (docs/finetune.md)")
    g.add_argument("--epochs", type=int, default=3)
    g.add_argument("--depth", type=int, default=12)
    g.add_argument("--batch-size", type=int, default=16)
    g.add_argument("--freeze-blocks", type=int, default=3)
    g.add_argument("--lr", type=float, default=2e-4)
    g.add_argument("--lr-decay", type=float, default=0.9,
                   help="learning-rate factor per lower block (0.9, not the finetune default 0.7: chosen by class-disjoint CV on "
                        "the training classes, benchmarks/bench_loop_recipe.py)")
    g.add_argument("--margin", type=float, default=28.6, help="ArcFace margin, degrees")
    g.add_argument("--train-size", type=int, default=None)
    g.add_argument("--train-on-catalog-embedding", action=argparse.BooleanOptionalAction, default=True,
                   help="train ArcFace on the catalogs' embedding (--feature-stage: pooled output + last stage, each part "
                        "normalised on its own), not on the pooled output alone (chosen by class-disjoint CV on the training "
                        "classes: docs/finetune.md, 'Eighth round'); no effect with --feature-stage null")
    g.add_argument("--threads", type=int, default=1, help="torch threads while training")
    g.add_argument("--train-iconic", action=argparse.BooleanOptionalAction, default=True,
                   help="also train on the training classes' packshots (chosen by class-disjoint CV on the training "
                        "classes, benchmarks/bench_loop_recipe.py)")
    g.add_argument("--reference-copies", type=int, default=12, metavar="N",
                   help="with --train-iconic: each packshot counts N times in the class-balanced draw (finetune "
                        "--reference-copies; 12 chosen by class-disjoint CV, benchmarks/bench_loop_recipe.py)")
    c = p.add_argument_group("calibration (docs/threshold.md)")
    g = c.add_mutually_exclusive_group()
    g.add_argument("--match-softmax-cutoff", type=float, default=0.78)
    g.add_argument("--target-precision", type=float, default=None)
    c.add_argument("--score", choices=OPEN_SET_SCORES, default=OUTLIER_SCORE,
                   help="open-set score of the threshold the catalog keeps (catalog calibrate --score; default "
                        "outlier-ratio, calibrate's default on a catalog with outlier references); the other scores "
                        "are calibrated and reported too")
    c.add_argument("--oracle-precision", type=float, default=0.9, metavar="P",
                   help="report the oracle operating point: the largest acceptance whose known precision on the "
                        "evaluation photos themselves is >= P (read off the photos judged, not calibrated)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--final-val", action="store_true",
                   help="also report closed-set top-1 on the held-out classes' val photos (the protocol's one final "
                        "report: val is a development set, never used for choices)")
    return p


def main(argv: list[str] | None = None) -> int:
    p = loop_parser()
    args = p.parse_args(argv)
    if args.reference_copies < 1:
        p.error(f"--reference-copies must be >= 1, got {args.reference_copies}")
    if not args.weights.is_file():
        print(f"retailklip_loop: error: {args.weights}: no such weights file", file=sys.stderr)
        return 1
    start = time.perf_counter()
    timings: dict[str, float] = {}
    out = args.out
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)

    s = split(args)
    files = write_inputs(s, out, args.center_stride, args.train_iconic)
    center = [Path(x) for x in files["center"].read_text().split("\n") if x] or None
    catalogs = {}
    t = time.perf_counter()
    for name in ("all", "known"):
        d = out / f"catalog-{name}"
        # hubness_k=0: plain 1-NN, the loop's recipe (CSLS did not pass its rule on the finetuned encoder:
        # docs/evaluation.md, 'Hubness reduction at the 1-NN')
        Catalog.init(d, encoder=ENCODER, weights=args.weights, encoder_options=catalog_options(args), center_photos=center,
                     hubness_k=0)
        Catalog.open(d).import_csv(files[name], progress=False)
        catalogs[name] = d
    trained = set(s["trained"])
    outlier_refs = add_outliers_cli(catalogs["known"], [c.iconic.resolve() for c in s["store"].classes if c.name in trained])
    timings["catalogs"] = time.perf_counter() - t
    t = time.perf_counter()
    cal_before = calibrate_all(catalogs["known"], files["calibration"], args)
    before = measure(Catalog.open(catalogs["all"]), Catalog.open(catalogs["known"]), s, cal_before, args)
    timings["measure_before"] = time.perf_counter() - t

    t = time.perf_counter()
    ft = finetune(s, files, out, args)
    timings["finetune"] = time.perf_counter() - t

    vectors_before, _ = catalog_gallery(Catalog.open(catalogs["all"]))
    t = time.perf_counter()
    for d in catalogs.values():  # = catalog --catalog D rebuild --encoder ... --weights OUT/encoder.safetensors
        Catalog.open(d).rebuild(encoder=ENCODER, weights=out / "encoder.safetensors", encoder_options=catalog_options(args),
                                center_photos=center if args.center_after else None, hubness_k=0)
    timings["rebuild"] = time.perf_counter() - t
    t = time.perf_counter()
    cal_after = calibrate_all(catalogs["known"], files["calibration"], args)
    after = measure(Catalog.open(catalogs["all"]), Catalog.open(catalogs["known"]), s, cal_after, args)
    timings["measure_after"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - start

    mc = mcnemar(after["correct"], before["correct"])
    vectors_after, _ = catalog_gallery(Catalog.open(catalogs["all"]))
    res = {
        "split": {"train_iconic": args.train_iconic, "center_after": bool(args.center_after and center),
                  "feature_stage": args.feature_stage,
                  "train_on_catalog_embedding": trained_feature_stage(args) is not None,
                  "reference_copies": args.reference_copies if args.train_iconic else None, "rule": f"coarse class id % 2 == {args.held_out_parity} held out", "training_classes": len(s["trained"]),
                  "training_photos": len(s["train_photos"]), "held_out_classes": len(s["held"]),
                  "folds": args.folds, "capture_groups": s["capture_groups"],
                  "closed_set_photos": len(s["closed"]),
                  "evaluation_photos": len(s["evaluation"]), "calibration_photos": len(s["calibration"]),
                  "known_classes": s["known"], "unknown_calibration_classes": s["unknown_calibration"],
                  "unknown_evaluation_classes": s["unknown_evaluation"], "open_set_evaluation_photos": len(s["open_evaluation"]),
                  "outlier_references": outlier_refs},
        "finetune": ft,
        "before": {k: v for k, v in before.items() if k not in ("correct", "val_correct")},
        "after": {k: v for k, v in after.items() if k not in ("correct", "val_correct")},
        "mcnemar_after_vs_before": {"only_after": mc.only_a, "only_before": mc.only_b, "p_value": mc.p_value},
        # per evaluation photo, so two runs (two recipes) can be compared paired (McNemar) on the same photos
        "per_photo": {"image": [str(p.path.resolve()) for p in s["closed"]], "before_correct": before["correct"],
                      "after_correct": after["correct"]},
        "encoder_changed": before["encoder"] != after["encoder"],
        "vectors_max_abs_change": float(np.abs(vectors_after - vectors_before).max()),
        "seconds": {k: round(v, 1) for k, v in timings.items()},
    }
    if s["val"]:
        vm = mcnemar(after["val_correct"], before["val_correct"])
        res["final_val"] = {"photos": len(s["val"]), "classes": len({p.label for p in s["val"]}),
                            "before": bootstrap_ci(before["val_correct"].astype(float)),
                            "after": bootstrap_ci(after["val_correct"].astype(float)),
                            "mcnemar_after_vs_before": {"only_after": vm.only_a, "only_before": vm.only_b, "p_value": vm.p_value}}
    (out / "loop.json").write_text(json.dumps(jsonable(res), indent=1) + "\n")

    sp = res["split"]
    print(f"split: {sp['training_classes']} training classes ({sp['training_photos']} photos), {sp['held_out_classes']} held-out "
          f"classes: {sp['closed_set_photos']} photos (closed set), dealt into {sp['evaluation_photos']} evaluation + "
          f"{sp['calibration_photos']} calibration photos for the open set ({sp['folds']} folds, "
          f"{sp['capture_groups']} capture groups); open set: "
          f"{len(s['known'])} known, {len(s['unknown_calibration'])} + {len(s['unknown_evaluation'])} unknown classes")
    print(f"encoder: {before['encoder']} -> {after['encoder']}")
    print(f"open set: catalog-known keeps the threshold on {args.score} (the rows below); outlier references: "
          f"{sp['outlier_references']} training-class packshots (catalog outliers add)")
    print("\n| held-out classes | before | after |\n|---|---|---|")
    for label, path in ROWS:
        print(f"| {label} | {fmt(get(before, path))} | {fmt(get(after, path))} |")
    mode = (f"--target-precision {args.target_precision:g}" if args.target_precision is not None
            else f"--match-softmax-cutoff {args.match_softmax_cutoff:g}")
    print(f"\nopen set by score ({sp['open_set_evaluation_photos']} evaluation photos; 'calibrated': threshold from "
          f"catalog calibrate {mode} --score SCORE on the calibration photos, judged on the evaluation photos; 'oracle': the threshold read off the evaluation photos themselves, the largest "
          f"acceptance with known precision >= {args.oracle_precision:g} there -- an upper bound, not a calibration; "
          f"the catalog keeps the {args.score} threshold)")
    print("\n| open set, held-out classes | before | after |\n|---|---|---|")
    for x in OPEN_SET_SCORES:
        for label, path in score_rows(x, args.oracle_precision):
            print(f"| {label} | {fmt(get(before, path))} | {fmt(get(after, path))} |")
    print(f"\nMcNemar after vs before (closed set, {sp['closed_set_photos']} photos): {mc.only_a} right only after, "
          f"{mc.only_b} only before, p = {mc.p_value:.3g}")
    print("\n| class | photos | before | after |\n|---|---|---|---|")
    for c, r in before["closed_set"]["per_class"].items():
        print(f"| {c} | {r['photos']} | {r['top1']:.3f} | {after['closed_set']['per_class'][c]['top1']:.3f} |")
    if s["val"]:
        fv = res["final_val"]
        m = fv["mcnemar_after_vs_before"]
        print(f"\nfinal report, held-out classes' val photos ({fv['photos']} photos, {fv['classes']} classes; closed set): "
              f"{fmt(fv['before'])} -> {fmt(fv['after'])}, McNemar {m['only_after']} vs {m['only_before']}, p = {m['p_value']:.3g}")
    print(f"\nseconds: {json.dumps(res['seconds'])}; results: {out / 'loop.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
