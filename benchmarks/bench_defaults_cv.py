#!/usr/bin/env python3
"""The shipped defaults of the frozen-encoder main job re-checked by cross-validation over
GroceryStore's *train* split (issue 14, items 1 and 4).

The main job (``examples/grocery_store.py``) was tuned on val: bilinear resizing, features
centred on every 6th unlabeled train photo, K = 1 reference view.  Here every option is scored
on train photos it was not chosen on, with :mod:`retailklip.protocol`:

* ``photo_folds(train labels, k=5)``: each fold's photos are the queries; the gallery is the
  iconic packshot of every class (the product: one reference image per SKU), K views of it;
* the unlabeled photos whose mean feature centres the embeddings (SimpleShot CL2N, Wang et al.
  2019, §3.1) and any extra in-store references are drawn from the *other* folds
  (:func:`retailklip.protocol.fold_roles`), so no query is ever part of its own centre or gallery;
* every train photo is a query exactly once: top-1 over the 2640 photos with a 95 % bootstrap
  interval, per-class average with an interval over classes, exact McNemar against the shipped
  default on the same photos.

Multiple references per SKU (``catalog add --append``): 1 or 2 in-store photos per class from
the other folds join the packshot in the gallery; known-vs-unknown AUROC of the nearest
distance with whole coarse classes left out of the gallery (``class_disjoint_folds``); and the
same photos appended to one SKU at a time (:func:`one_sku_fix`).  ``--folds session`` deals
capture-session folds instead of stratified photo folds (:func:`cv_folds`): the train photos
come in near-copies that photo folds put among a query's references (docs/evaluation.md,
"Capture sessions").

Raw pooled features (before centring and L2 normalisation) are cached per preprocessing
option under ``--cache`` (default ``/tmp/cv-cache``), so each image is embedded once per option;
centring, normalisation and 1-NN are numpy on the cached features.

    python benchmarks/bench_defaults_cv.py --embed bilinear       # embedding only (cached)
    python benchmarks/bench_defaults_cv.py [--folds session] [--json out.json]      # every table
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np

from retailklip.augment import augment_reference
from retailklip.calibration import auroc, nearest_skus
from retailklip.datasets import GroceryStore, read_grocery_store
from retailklip.images import load_image
from retailklip.protocol import (
    SESSION_COSINE,
    bootstrap_ci,
    capture_groups,
    class_disjoint_folds,
    fold_roles,
    mcnemar,
    photo_folds,
    session_folds,
)

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
ENCODER = "timm:mobilenetv2_100"
WEIGHTS = SHARED / "models" / "mobilenetv2_100.imagenet.safetensors"

#: Preprocessing options of the timm backend (``--encoder-option``); ``bilinear`` is shipped.
PREPROCESS: dict[str, dict] = {
    "bilinear": {"interpolation": "bilinear"},
    "bicubic": {"interpolation": "bicubic"},
    "bilinear-crop1.0": {"interpolation": "bilinear", "crop_pct": 1.0},
    "bicubic-crop1.0": {"interpolation": "bicubic", "crop_pct": 1.0},
    "bilinear-256": {"interpolation": "bilinear", "input_size": 256},
}
SHIPPED = "bilinear"
#: Reference views embedded for the K comparison (K = 1, 4, 8 are prefixes: view i has its own seed).
MAX_VIEWS = 16
CHUNK = 128


def cv_folds(kind: str, labels: list[str], raw_photos: np.ndarray) -> list:
    """The k = 5 photo folds of the train split: ``"photo"`` (stratified, :func:`photo_folds`) or
    ``"session"`` (:func:`session_folds` over :func:`capture_groups` of ``raw_photos``, the shipped
    option's raw features, at :data:`SESSION_COSINE`), seed 0."""
    if kind == "session":
        return session_folds(labels, capture_groups(raw_photos, labels, SESSION_COSINE), K_FOLDS, seed=0)
    return photo_folds(labels, K_FOLDS, seed=0)


# ------------------------------------------------------------------------------ embedding cache
def _item_key(path: Path, view: int = 0) -> str:
    return f"{path.resolve()}#{view}"


def cached_features(option: str, items: list[tuple[Path, int]], cache: Path, *, log=print,
                    options: dict | None = None) -> np.ndarray:
    """Raw pooled features (N, D) float32 of ``items`` (image path, augmentation view; view 0
    = the image itself, view v = view v of :func:`retailklip.augment.augment_reference` with
    seed 0) under preprocessing ``option`` (encoder options ``PREPROCESS[option]``, or
    ``options`` under the name ``option``), embedding only what ``cache`` lacks."""
    import torch

    from retailklip import create_encoder

    folder = cache / option
    folder.mkdir(parents=True, exist_ok=True)
    have: dict[str, np.ndarray] = {}
    for part in sorted(folder.glob("part-*.npz")):
        z = np.load(part)
        have.update(zip(z["keys"].tolist(), z["feats"]))
    keys = [_item_key(p, v) for p, v in items]
    missing = [(k, it) for k, it in dict(zip(keys, items)).items() if k not in have]
    if missing:
        enc = create_encoder(ENCODER, weights=WEIGHTS, **(PREPROCESS[option] if options is None else options))
        start, views_of = time.perf_counter(), {}
        for s in range(0, len(missing), CHUNK):
            chunk = missing[s : s + CHUNK]
            ims = []
            for _, (p, v) in chunk:
                if v == 0:
                    ims.append(load_image(p))
                else:
                    if p not in views_of:
                        views_of = {p: augment_reference(load_image(p), MAX_VIEWS, seed=0)}
                    ims.append(views_of[p][v])
            feats = np.concatenate([
                enc.features(torch.stack([enc.prepare(im) for im in ims[b : b + enc.batch_size]])).numpy()
                for b in range(0, len(ims), enc.batch_size)
            ])
            name = hashlib.sha256("".join(k for k, _ in chunk).encode()).hexdigest()[:16]
            np.savez(folder / f"part-{name}.npz", keys=np.array([k for k, _ in chunk]), feats=feats)
            have.update(zip([k for k, _ in chunk], feats))
            log(f"{option}: {s + len(chunk)}/{len(missing)} embedded, {time.perf_counter() - start:.0f} s")
    return np.stack([have[k] for k in keys]).astype(np.float32)


def normalise(feats: np.ndarray, center: np.ndarray | None, groups: int = 1) -> np.ndarray:
    """(N, D) raw features -> unit vectors, centred first and each of ``groups`` parts normalised
    on its own (as :class:`retailklip.encoders.Encoder` makes them:
    :func:`retailklip.encoders.base.normalize_embeddings`)."""
    import torch

    from retailklip.encoders.base import normalize_embeddings

    c = None if center is None else torch.from_numpy(np.asarray(center))
    return normalize_embeddings(torch.from_numpy(np.asarray(feats)), center=c, groups=groups).numpy()


#: The shipped centre is every 6th unlabeled train photo: in a fold, 1/6 of the other folds' photos.
K_FOLDS = 5
SAMPLE_SIZES = (25, 50, 100, 200, 1000)


class Data:
    """Cached raw features of one preprocessing option: packshots (C, V, D) and train photos (N, D)."""

    def __init__(self, store: GroceryStore, option: str, cache: Path) -> None:
        self.classes = [c.name for c in store.classes]
        self.views = MAX_VIEWS if option == SHIPPED else 1
        g = cached_features(option, [(c.iconic, v) for c in store.classes for v in range(self.views)], cache)
        self.packshots = g.reshape(len(self.classes), self.views, -1)
        self.photos = cached_features(option, [(ph.path, 0) for ph in store.photos("train")], cache)


def run(data: Data, labels: list[str], folds, *, k: int = 1, center: str = "photos", center_size: int | None = None,
        extra_references: int = 0, unknown_folds=None, seed: int = 0) -> dict:
    """1-NN of every train photo (each once, in its fold) against the packshot gallery.

    Args:
        center: ``"none"``, ``"photos"`` (mean raw feature of the fold's centring sample) or
            ``"references"`` (mean raw feature of the gallery's packshots).
        center_size: centring sample size; None: the shipped 1/6 of the other folds' photos.
        extra_references: in-store reference photos per class from the other folds.
        unknown_folds: ``class_disjoint_folds`` over the classes, paired with the photo folds by
            index: the fold's held-out classes are left out of its gallery (open-set AUROC).

    Returns:
        ``correct`` (N,) bool (known photos only when ``unknown_folds``), ``distance`` (N,)
        cosine distances in [0, 2], ``known`` (N,) bool.
    """
    n = len(labels)
    correct, distance, known = np.zeros(n, bool), np.zeros(n, np.float32), np.ones(n, bool)
    sizes = {f.index: len(f.train) // 6 if center_size is None else center_size for f in folds}
    for f in folds:
        (roles,) = fold_roles(labels, [f], center_size=sizes[f.index], extra_references=extra_references, seed=seed)
        if center == "photos":
            c = data.photos[roles.center].mean(0)
        elif center == "references":
            c = data.packshots[:, 0].mean(0)
        else:
            c = None
        keep = set(data.classes)
        if unknown_folds is not None:
            keep -= {data.classes[i] for i in unknown_folds[f.index].test}
        gal, gal_labels = [], []
        for ci, name in enumerate(data.classes):
            if name in keep:
                gal.append(data.packshots[ci, :k])
                gal.append(data.photos[roles.references[name]])
                gal_labels += [name] * (k + len(roles.references[name]))
        q = roles.queries
        pred, dist = nearest_skus(normalise(np.concatenate(gal), c), gal_labels, normalise(data.photos[q], c))
        correct[q] = np.array(pred) == np.array([labels[i] for i in q])
        distance[q] = dist
        known[q] = [labels[i] in keep for i in q]
    return {"correct": correct, "distance": distance, "known": known}


def one_sku_fix(data: Data, labels: list[str], folds, extra: int = 2, seed: int = 0) -> dict:
    """The store's fix for one badly recognised SKU: ``extra`` in-store photos (other folds)
    appended to that SKU alone, every other SKU keeping its packshot.  Averaged over the SKUs
    (each fixed on its own, in every fold; shipped centring): the fixed SKU's own photos right
    before / after (its recall), and the other SKUs' photos that were right and are now named
    the fixed SKU (the new references attract them).

    Returns:
        ``recall_before``, ``recall_after`` (means over fixes), ``others_lost`` and
        ``others_gained`` (photos of other SKUs per fix), ``fixes`` (SKU x fold pairs).
    """
    lab = np.array(labels)
    totals = {"before": 0, "after": 0, "own": 0, "lost": 0, "gained": 0, "fixes": 0}
    for f in folds:
        (roles,) = fold_roles(labels, [f], center_size=len(f.train) // 6, extra_references=extra, seed=seed)
        c = data.photos[roles.center].mean(0)
        g = normalise(data.packshots[:, 0], c)
        q = roles.queries
        x = normalise(data.photos[q], c)
        truth = lab[q]
        base = np.array(nearest_skus(g, data.classes, x)[0]) == truth
        for name in data.classes:
            refs = roles.references.get(name, np.zeros(0, np.int64))
            own = truth == name
            if len(refs) < extra or not own.any():
                continue
            pred = np.array(nearest_skus(np.concatenate([g, normalise(data.photos[refs], c)]),
                                         data.classes + [name] * len(refs), x)[0])
            after = pred == truth
            totals["before"] += int(base[own].sum())
            totals["after"] += int(after[own].sum())
            totals["own"] += int(own.sum())
            totals["lost"] += int((base & ~after)[~own].sum())
            totals["gained"] += int((~base & after)[~own].sum())
            totals["fixes"] += 1
    return {"recall_before": totals["before"] / totals["own"], "recall_after": totals["after"] / totals["own"],
            "others_lost": totals["lost"] / totals["fixes"], "others_gained": totals["gained"] / totals["fixes"],
            "fixes": totals["fixes"]}


def summarise(name: str, res: dict, labels: list[str], base: dict | None) -> dict:
    """Top-1 (bootstrap over photos), per-class average (bootstrap over classes), McNemar vs ``base``."""
    ok = res["correct"]
    per_class = {c: float(ok[[lab == c for lab in labels]].mean()) for c in sorted(set(labels))}
    row = {"option": name, "top1": bootstrap_ci(ok), "per_class": bootstrap_ci(list(per_class.values()))}
    if base is not None:
        row["mcnemar"] = mcnemar(ok, base["correct"])
    return row


def auroc_ci(res: dict, n_boot: int = 1000, seed: int = 0) -> tuple[float, float, float]:
    """Known-vs-unknown AUROC of the nearest distance (smaller = known) and a percentile
    bootstrap 95 % interval resampling photos."""
    d, kn = -res["distance"].astype(np.float64), res["known"]
    value = auroc(d[kn], d[~kn])
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot):
        i = rng.integers(0, len(d), len(d))
        boots.append(auroc(d[i][kn[i]], d[i][~kn[i]]))
    lo, hi = np.quantile(boots, [0.025, 0.975])
    return value, float(lo), float(hi)


def fmt(row: dict) -> str:
    m = row.get("mcnemar")
    test = "—" if m is None else f"{m.only_a} / {m.only_b}, p = {m.p_value:.3g}"
    return f"| {row['option']} | {row['top1']} | {row['per_class']} | {test} |"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=SHARED / "data" / "grocery-store")
    p.add_argument("--cache", type=Path, default=Path("/tmp/cv-cache"))
    p.add_argument("--embed", nargs="+", choices=sorted(PREPROCESS), default=None,
                   help="only embed (fill the cache) for these preprocessing options")
    p.add_argument("--folds", choices=("photo", "session"), default="photo",
                   help="stratified photo folds, or capture-session folds (SESSION_COSINE; docs/evaluation.md)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    store = read_grocery_store(args.data)
    if args.embed:
        for option in args.embed:
            embed_all(store, option, args.cache)
        return 0
    t0 = time.perf_counter()
    labels = [ph.label for ph in store.photos("train")]
    data = {o: Data(store, o, args.cache) for o in PREPROCESS if (args.cache / o).exists()}
    ship = data[SHIPPED]
    folds = cv_folds(args.folds, labels, ship.photos)
    base = run(ship, labels, folds)
    rows = [summarise("shipped: bilinear, K = 1, centre = 1/6 of other folds' photos (~352)", base, labels, None)]
    sections = {"K (augmented reference views)": [], "centring": [], "preprocessing": [], "references per SKU": []}
    for k in (4, 8, 16):
        sections["K (augmented reference views)"].append(
            summarise(f"K = {k}", run(ship, labels, folds, k=k), labels, base))
    sections["centring"].append(summarise("no centre (raw)", run(ship, labels, folds, center="none"), labels, base))
    sections["centring"].append(summarise("mean of the 81 packshots", run(ship, labels, folds, center="references"), labels, base))
    for n in SAMPLE_SIZES:
        sections["centring"].append(summarise(f"mean of {n} unlabeled photos", run(ship, labels, folds, center_size=n), labels, base))
    sections["centring"].append(summarise("mean of all other folds' photos (2112)",
                                          run(ship, labels, folds, center_size=min(len(f.train) for f in folds)), labels, base))
    for o, d in data.items():
        if o != SHIPPED:
            sections["preprocessing"].append(summarise(f"{o} ({PREPROCESS[o]})", run(d, labels, folds), labels, base))
    classes = [c.name for c in store.classes]
    unknown = class_disjoint_folds(classes, K_FOLDS, seed=0, groups=[c.coarse_name for c in store.classes])
    opens = {}
    for extra in (0, 1, 2):
        if extra:
            sections["references per SKU"].append(summarise(
                f"packshot + {extra} in-store photo{'s' if extra > 1 else ''} (other folds)",
                run(ship, labels, folds, extra_references=extra), labels, base))
        opens[extra] = auroc_ci(run(ship, labels, folds, extra_references=extra, unknown_folds=unknown))
    # which in-store photos become references is chance: top-1 over 5 draws of them
    draws = {extra: [float(run(ship, labels, folds, extra_references=extra, seed=s)["correct"].mean()) for s in range(5)]
             for extra in (1, 2)}
    print("| option | top-1 [95 % CI] | per-class average [95 % CI] | McNemar vs shipped: only this / only shipped, p |")
    print("|---|---|---|---|")
    print(fmt(rows[0]))
    for title, rs in sections.items():
        print(f"| **{title}** | | | |")
        for r in rs:
            print(fmt(r))
    print("\nknown-vs-unknown AUROC (nearest distance; whole coarse classes left out of the gallery):")
    for extra, (v, lo, hi) in opens.items():
        print(f"| {1 + extra} reference{'s' if extra else ''} per SKU | {v:.3f} [{lo:.3f}, {hi:.3f}] |")
    for extra, tops in draws.items():
        print(f"top-1 with {extra} extra reference(s), 5 draws: {min(tops):.3f} .. {max(tops):.3f}")
    fixes = {extra: one_sku_fix(ship, labels, folds, extra) for extra in (1, 2)}
    for extra, fx in fixes.items():
        print(f"one SKU fixed with {extra} in-store photo(s), the others packshot only ({fx['fixes']} fixes): its photos "
              f"right {fx['recall_before']:.3f} -> {fx['recall_after']:.3f}; other SKUs' photos per fix: "
              f"{fx['others_lost']:.2f} lost, {fx['others_gained']:.2f} gained")
    print(f"\n{len(labels)} train photos, {K_FOLDS} {args.folds} folds, {time.perf_counter() - t0:.0f} s")
    if args.json:
        def plain(r):
            out = {"option": r["option"], "top1": vars(r["top1"]), "per_class": vars(r["per_class"])}
            if "mcnemar" in r:
                out["mcnemar"] = vars(r["mcnemar"])
            return out
        args.json.write_text(json.dumps({
            "shipped": plain(rows[0]), "sections": {t: [plain(r) for r in rs] for t, rs in sections.items()},
            "auroc": {str(1 + e): list(v) for e, v in opens.items()}, "reference_draws": draws, "one_sku_fix": fixes,
        }, indent=1))
    return 0


def embed_all(store: GroceryStore, option: str, cache: Path) -> None:
    """Fill the cache for one option: train photos and packshots (all views for the shipped option)."""
    views = MAX_VIEWS if option == SHIPPED else 1
    items = [(c.iconic, v) for c in store.classes for v in range(views)]
    items += [(ph.path, 0) for ph in store.photos("train")]
    cached_features(option, items, cache)


if __name__ == "__main__":
    sys.exit(main())
