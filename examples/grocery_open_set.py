"""Open-set study on GroceryStore: the calibrated distance threshold vs the softmax cutoff it
replaces, and what adding SKUs costs each.  Produces the numbers of docs/threshold.md.

    python3 examples/grocery_open_set.py --data ../shared/data/grocery-store --out /tmp/open-set [--json]

Setup (deterministic): the 81 GroceryStore fine classes in classes.csv order; classes at even
positions are in the catalog ("known", 41 SKUs), odd positions are not ("unknown", 40), so every
coarse group (apples, juices, ...) has both: an unknown photo is usually a sibling variety of a
known SKU.  The catalog is built as a store would, with the shipped defaults (``Catalog.init`` with
features centred on every 6th *unlabeled* train photo, as examples/grocery_store.py does, then
``import_csv`` of the iconic images; MobileNetV2; K = the catalog default).  Photos: all 296 val photos (143 known, 153 unknown); for the
held-out check, the first 8 train photos per class (648).  A second split, ``coarse``, leaves
whole coarse groups out instead (every other group of classes.csv: a new kind of product).

It also writes ``known.csv`` (import CSV), ``val_photos.csv`` and ``train_photos.csv`` (image,sku)
into ``--out``, so the same numbers come from the CLI::

    catalog --catalog OUT/catalog-known calibrate OUT/val_photos.csv --match-softmax-cutoff 0.78 --dry-run
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from catalog import Catalog
from retailklip.baseline import DEFAULT_L2, DEFAULT_SOFTMAX_CUTOFF, SoftmaxHead
from retailklip.calibration import (
    calibrate,
    catalog_gallery,
    nearest_skus,
    open_set_metrics,
    threshold_for_unknown_rejection,
)
from retailklip.datasets import load_dataset, split_known_unknown

ENCODER = "timm:mobilenetv2_100"
OPTIONS = {"interpolation": "bilinear"}


def write_csv(path: Path, header: list[str], rows) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def embed_cached(cat: Catalog, paths: list[Path], cache_dir: Path, name: str) -> np.ndarray:
    """Embeddings of photos with the catalog's encoder, cached per encoder and file list."""
    enc = cat.encoder()
    key = hashlib.sha256((enc.identity.key + "\n".join(map(str, paths))).encode()).hexdigest()[:16]
    f = cache_dir / f"{name}-{key}.npy"
    if f.exists():
        return np.load(f)
    e = enc.embed(paths, progress=True)
    np.save(f, e)
    return e


def metrics_row(m) -> dict:
    return {k: m.to_dict()[k] for k in ("known_accuracy", "known_precision", "unknown_rejection", "known_rejection", "closed_set_top1", "auroc", "accepted")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=Path("../shared/data/grocery-store"))
    p.add_argument("--weights", type=Path, default=Path("../shared/models/mobilenetv2_100.imagenet.safetensors"))
    p.add_argument("--out", type=Path, required=True, help="work folder (catalogs, CSVs, embedding cache); reused")
    p.add_argument("--train-per-class", type=int, default=8)
    p.add_argument("--augmentations", type=int, default=None, metavar="K", help="views per reference (default: the catalog's)")
    p.add_argument("--center-stride", type=int, default=6, help="centre features on every N-th unlabeled train photo (0: none)")
    p.add_argument("--target-precision", type=float, default=0.5)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    val = load_dataset("grocery-store", args.data, "val")
    train = load_dataset("grocery-store", args.data, "train").limited(max_per_class=args.train_per_class)
    known, unknown = split_known_unknown(val.classes)
    write_csv(out / "known.csv", ["image", "sku", "name"], [(str(val.references[c].resolve()), c, c) for c in known])
    write_csv(out / "unknown.csv", ["image", "sku", "name"], [(str(val.references[c].resolve()), c, c) for c in unknown])
    write_csv(out / "val_photos.csv", ["image", "sku"], [(str(q.path.resolve()), q.label) for q in val.queries])
    write_csv(out / "train_photos.csv", ["image", "sku"], [(str(q.path.resolve()), q.label) for q in train.queries])

    cat_dir = out / "catalog-known"
    if not (cat_dir / "catalog.db").exists():
        shutil.rmtree(cat_dir, ignore_errors=True)
        all_train = load_dataset("grocery-store", args.data, "train").queries
        center = [q.path for q in all_train[:: args.center_stride]] if args.center_stride else None
        extra = {"augmentations": args.augmentations} if args.augmentations else {}
        # hubness_k=0: the plain 1-NN this study calibrates (calibrate() below is given no hubness reference)
        Catalog.init(cat_dir, encoder=ENCODER, weights=args.weights, encoder_options=OPTIONS, center_photos=center,
                     hubness_k=0, **extra)
        Catalog.open(cat_dir).import_csv(out / "known.csv")
    cat = Catalog.open(cat_dir)
    gallery, skus = catalog_gallery(cat)
    V = embed_cached(cat, [q.path for q in val.queries], out, "val")
    T = embed_cached(cat, [q.path for q in train.queries], out, "train")
    v_truth, t_truth = [q.label for q in val.queries], [q.label for q in train.queries]
    v_known = np.array([t in set(known) for t in v_truth])
    res: dict = {"catalog_skus": len(set(skus)), "vectors": len(skus), "encoder": cat.encoder_identity().key,
                 "augmentations": cat.settings()["augmentations"], "val_known": int(v_known.sum()),
                 "val_unknown": int((~v_known).sum()), "train_photos": len(t_truth)}

    # 1. In-sample: calibrated on the val photos, judged on them (what `catalog calibrate` reports).
    match = calibrate(gallery, skus, V, v_truth, match_softmax_cutoff=DEFAULT_SOFTMAX_CUTOFF)
    prec = calibrate(gallery, skus, V, v_truth, target_precision=args.target_precision)
    res["match_softmax"] = match.to_dict()
    res["target_precision"] = prec.to_dict()

    # 2. Held out: thresholds calibrated on train photos, applied to val photos.
    v_pred, v_dist = nearest_skus(gallery, skus, V)
    held = {}
    for name, kw in [("match_softmax", {"match_softmax_cutoff": DEFAULT_SOFTMAX_CUTOFF}),
                     ("target_precision", {"target_precision": args.target_precision})]:
        r = calibrate(gallery, skus, T, t_truth, **kw)
        held[name] = {"threshold": round(r.threshold, 6), "train": metrics_row(r.nearest_neighbour),
                      "val": metrics_row(open_set_metrics(v_pred, v_truth, v_known, v_dist <= r.threshold, -v_dist))}
    res["held_out"] = held

    # 3. Equal unknown rejection: 1-NN threshold vs softmax cutoff chosen for the same rate.
    head = SoftmaxHead.fit(gallery, skus)
    hp = head.predict(V, DEFAULT_SOFTMAX_CUTOFF)
    curve = []
    for rate in (0.25, 0.5, 0.75, 0.9):
        t = threshold_for_unknown_rejection(v_dist, v_known, rate)
        c = 1.0 - threshold_for_unknown_rejection(1.0 - hp.confidence, v_known, rate)
        nn = open_set_metrics(v_pred, v_truth, v_known, v_dist <= t, -v_dist)
        sm = open_set_metrics(hp.labels, v_truth, v_known, hp.confidence >= c, hp.confidence)
        curve.append({"rate": rate, "threshold": round(t, 4), "cutoff": round(float(c), 4),
                      "nearest_neighbour": metrics_row(nn), "softmax": metrics_row(sm)})
    res["equal_rejection"] = curve

    # 4. Softmax head sensitivity to its L2 penalty, at the 0.78 cutoff.
    sens = []
    for l2 in (1e-4, DEFAULT_L2, 1e-8):
        h = SoftmaxHead.fit(gallery, skus, l2=l2)
        hp2 = h.predict(V, DEFAULT_SOFTMAX_CUTOFF)
        sens.append({"l2": l2, "train_confidence": round(float(h.predict(gallery).confidence.mean()), 4),
                     **metrics_row(open_set_metrics(hp2.labels, v_truth, v_known, hp2.known, hp2.confidence))})
    res["head_sensitivity"] = sens

    # 5. Adding the 40 unknown SKUs: 1-NN needs an import; the head must be retrained.
    all_dir = out / "catalog-all"
    if not (all_dir / "catalog.db").exists():
        shutil.rmtree(all_dir, ignore_errors=True)
        shutil.copytree(cat_dir, all_dir)
        start = time.perf_counter()
        Catalog.open(all_dir).import_csv(out / "unknown.csv")
        (out / "import_seconds.txt").write_text(f"{time.perf_counter() - start:.3f}")
    cat_all = Catalog.open(all_dir)
    g_all, s_all = catalog_gallery(cat_all)
    new = ~v_known
    a_pred, a_dist = nearest_skus(g_all, s_all, V)
    thr = match.threshold
    nn_new = {"closed_set_top1": float(np.mean([p == t for p, t, n in zip(a_pred, v_truth, new) if n])),
              "known_accuracy_at_threshold": float(np.mean([p == t and d <= thr for p, t, d, n in zip(a_pred, v_truth, a_dist, new) if n])),
              "all_photos_top1": float(np.mean([p == t for p, t in zip(a_pred, v_truth)]))}
    old_on_new = {"accepted_as_old_sku": float(hp.known[new].mean()), "rejected": float((~hp.known[new]).mean())}
    start = time.perf_counter()
    head_all = SoftmaxHead.fit(g_all, s_all)
    retrain = time.perf_counter() - start
    hp_all = head_all.predict(V, DEFAULT_SOFTMAX_CUTOFF)
    head_new = {"closed_set_top1": float(np.mean([p == t for p, t, n in zip(hp_all.labels, v_truth, new) if n])),
                "known_accuracy_at_cutoff": float(np.mean([p == t and k for p, t, k, n in zip(hp_all.labels, v_truth, hp_all.known, new) if n])),
                "all_photos_top1": float(np.mean([p == t for p, t in zip(hp_all.labels, v_truth)]))}
    res["adding_skus"] = {
        "added": len(unknown), "import_seconds": float((out / "import_seconds.txt").read_text()),
        "nearest_neighbour_after_import": nn_new, "old_head_on_new_sku_photos": old_on_new,
        "head_retrain_seconds": round(retrain, 3), "retrained_head": head_new,
    }
    # 6. The other split: whole coarse groups unknown (a new kind of product, not a new variety).
    #    Same vectors as a catalog of those SKUs: the rows of catalog-all for the known SKUs.
    c_known, _ = split_known_unknown(val.classes, "coarse", val.groups)
    keep = np.array([s_ in set(c_known) for s_ in s_all])
    c_gallery, c_skus = g_all[keep], [s_ for s_, k in zip(s_all, keep) if k]
    c_match = calibrate(c_gallery, c_skus, V, v_truth, match_softmax_cutoff=DEFAULT_SOFTMAX_CUTOFF)
    c_prec = calibrate(c_gallery, c_skus, V, v_truth, target_precision=args.target_precision)
    res["coarse_split"] = {"known_skus": len(c_known), "match_softmax": c_match.to_dict(), "target_precision": c_prec.to_dict()}

    (out / "results.json").write_text(json.dumps(res, indent=1))
    if args.json:
        print(json.dumps(res, indent=1))
        return 0
    f = lambda v: "-" if v is None else f"{v:.3f}"
    print(f"catalog {res['catalog_skus']} SKUs, {res['vectors']} vectors, {res['encoder']}; val photos {res['val_known']} known + {res['val_unknown']} unknown")
    for title, rep in [("match softmax 0.78", match), (f"target precision {args.target_precision}", prec),
                       ("coarse split, match softmax 0.78", c_match), (f"coarse split, target precision {args.target_precision}", c_prec)]:
        nn, sm = rep.nearest_neighbour, rep.softmax
        print(f"\n{title}: threshold {rep.threshold:.4f}")
        print("| | 1-NN + threshold | softmax >= 0.78 |\n|---|---|---|")
        for k in ("known_accuracy", "known_precision", "unknown_rejection", "known_rejection", "closed_set_top1", "auroc"):
            print(f"| {k} | {f(getattr(nn, k))} | {f(getattr(sm, k))} |")
    print("\nheld out (calibrated on train photos, judged on val):", json.dumps(held, indent=1))
    print("\nequal unknown rejection:", json.dumps(curve, indent=1))
    print("\nhead sensitivity:", json.dumps(sens, indent=1))
    print("\nadding SKUs:", json.dumps(res["adding_skus"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
