#!/usr/bin/env python3
"""Does hubness reduction make the store's fix for one badly recognised SKU safe again?
(issue 14, item 4: "multiple references per SKU in practice ... the store's way to fix a badly
recognised SKU").

    python3 benchmarks/bench_csls_store_fix.py [--k 30] [--json OUT.json]

docs/evaluation.md ("More references per SKU") withdrew the advice "photograph a badly
recognised SKU and ``catalog add --append`` the photos": with plain 1-NN the appended in-store
photos become a hub.  An in-store photo is nearer to in-store photos of *other* products than
their packshots are, so each fix took 20-27 correctly named photos of other SKUs per fold for
about 3 of its own.  CSLS (Conneau et al., ICLR 2018, §2.3, Eq. 6; :mod:`retailklip.hubness`),
shipped since for the frozen main job, ranks a reference g by ``d(q, g) + r(g) / 2``, ``r(g)``
its mean cosine to its k nearest unlabeled store photos, and pushes back exactly such
references.  This measures the fix under it.

Protocol (the main job's, as bench_csls_main_job.py): the main job's embedding (224 + 288 +
384 px, last stage, crop 1.0; cached features), the 2,640 train photos in 5 capture-session
folds (``cv_folds("session")``); per fold, gallery = the 81 iconic packshots, unlabeled photos =
the fold's centring sample (1/6 of the other folds' photos), used to centre and for CSLS; the
queries are the fold's photos.  A *fix* is one SKU in one fold: ``extra`` of its photos from the
other folds outside the centring sample (``fold_roles(extra_references=...)``) appended to that
SKU alone, every other SKU keeping its packshot.  The photos are taken after the catalog's
unlabeled photos were, so for each fix the unlabeled photos lose every photo of the appended
photos' capture sessions (``capture_groups``) -- before and after the fix alike.

Per fix: the SKU's own photos named right before and after, the other SKUs' photos lost (right
before, wrong after) and gained; its *net* = own gained - others lost + others gained, in
photos of the fold.  Plain 1-NN and CSLS each against their own catalog before the fix.

Rule fixed before the run (one candidate: CSLS, k = 30, the shipped default, with ``extra`` =
2 photos): the advice comes back only if the mean net per fix under CSLS has a 95 % interval,
bootstrap over SKUs (a SKU's fixes in all folds move together), above zero.  ``extra`` = 1, the
plain rows, and every SKU with ``extra`` photos at once are reported, not part of the rule.
Val and test are never read.

``--product-check`` (added after the rule's run; it chooses nothing): ``catalog add``'s hub check
(:func:`catalog.skus.hub_limit`, through :func:`retailklip.matching.switches_to` and the
product's matcher) on every fix of 2 photos, appended one ``catalog add --append`` at a time as a
store would, and on every SKU's packshot added as a new SKU to a catalog of the other 80 (the
unlabeled photos of the fold, all of them): what it refuses or flags, and what the catalogs it
lets through cost.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_csls_main_job import arguments, main_job_train
from bench_defaults_cv import normalise
from bench_finetuned_input import class_bootstrap
from bench_pseudo_references import MAIN_JOB

from retailklip.calibration import gallery_matches, nearest_matches
from retailklip.hubness import HubnessReference
from retailklip.matching import switches_to
from retailklip.protocol import SESSION_COSINE, capture_groups, fold_roles


def nearest(queries: np.ndarray, gallery: np.ndarray, photos: np.ndarray | None, k: int) -> np.ndarray:
    """int (Q,): the gallery row each query is matched to: plain 1-NN (``photos`` None) or CSLS,
    the row of largest ``cos(q, g) - r(g) / 2`` (:mod:`retailklip.hubness`; unit rows)."""
    sims = queries @ gallery.T
    if photos is not None:
        k = min(k, len(photos))
        sims = sims - np.sort(gallery @ photos.T, axis=1)[:, -k:].mean(1) / 2
    return np.argmax(sims, axis=1)


def fixes(photo_raw, gallery_raw, lab, classes, folds, groups_of, extra: int, k: int, seed: int = 0) -> dict:
    """Per ranking (``plain``, ``CSLS``): arrays over fixes of ``sku``, ``own``, ``own_before``,
    ``own_after``, ``lost``, ``gained`` (module docstring); plus ``agree`` / ``checked``: fixes
    where the product's matcher (float32 SKUMatcher via :func:`nearest_matches`) picks what
    :func:`nearest` picks for every query."""
    scales = len(MAIN_JOB["scales"])
    rows = {r: {key: [] for key in ("sku", "own", "own_before", "own_after", "lost", "gained")}
            for r in ("plain", "CSLS")}
    agree = checked = 0
    for f in folds:
        (roles,) = fold_roles(list(lab), [f], center_size=len(f.train) // 6, extra_references=extra, seed=seed)
        mu = photo_raw[roles.center].mean(0)
        g = normalise(gallery_raw, mu, scales)
        q = normalise(photo_raw[roles.queries], mu, scales)
        u_all = normalise(photo_raw[roles.center], mu, scales)
        truth = lab[roles.queries]
        for s_idx, name in enumerate(classes):
            refs = roles.references.get(name, np.zeros(0, np.int64))
            own = truth == name
            if len(refs) < extra or not own.any():
                continue
            keep = ~np.isin(groups_of[roles.center], groups_of[refs])  # later photos: not among the unlabeled
            u = u_all[keep]
            g_fix = np.concatenate([g, normalise(photo_raw[refs], mu, scales)])
            sku_fix = np.concatenate([np.arange(len(classes)), np.full(len(refs), s_idx)])
            for ranking, photos in (("plain", None), ("CSLS", u)):
                before = classes[nearest(q, g, photos, k)] == truth
                after = classes[sku_fix[nearest(q, g_fix, photos, k)]] == truth
                r = rows[ranking]
                r["sku"].append(s_idx)
                r["own"].append(int(own.sum()))
                r["own_before"].append(int(before[own].sum()))
                r["own_after"].append(int(after[own].sum()))
                r["lost"].append(int((before & ~after)[~own].sum()))
                r["gained"].append(int((~before & after)[~own].sum()))
            if s_idx % 20 == 0:  # the product's matcher on a sample of fixes
                names = [classes[i] for i in sku_fix]
                product, _, _ = nearest_matches(g_fix.astype(np.float32), names, q.astype(np.float32),
                                                HubnessReference(u.astype(np.float32), k))
                agree += int((np.array(product) == np.array(names)[nearest(q, g_fix, u, k)]).all())
                checked += 1
    out = {r: {key: np.array(v) for key, v in d.items()} for r, d in rows.items()}
    out["agree"], out["checked"] = agree, checked
    return out


def every_sku(photo_raw, gallery_raw, lab, classes, folds, extra: int, k: int, seed: int = 0) -> dict:
    """Top-1 over all photos when every SKU gets ``extra`` in-store photos at once (no session
    exclusion: the references' sessions cover most classes), plain and CSLS."""
    scales = len(MAIN_JOB["scales"])
    ok = {"plain": np.zeros(len(lab), bool), "CSLS": np.zeros(len(lab), bool)}
    for f in folds:
        (roles,) = fold_roles(list(lab), [f], center_size=len(f.train) // 6, extra_references=extra, seed=seed)
        mu = photo_raw[roles.center].mean(0)
        refs = [(i, r) for i, name in enumerate(classes) for r in roles.references.get(name, [])]
        g = np.concatenate([normalise(gallery_raw, mu, scales)]
                           + ([normalise(photo_raw[[r for _, r in refs]], mu, scales)] if refs else []))
        sku = np.concatenate([np.arange(len(classes)), np.array([i for i, _ in refs], np.int64)])
        q = normalise(photo_raw[roles.queries], mu, scales)
        u = normalise(photo_raw[roles.center], mu, scales)
        for ranking, photos in (("plain", None), ("CSLS", u)):
            ok[ranking][roles.queries] = classes[sku[nearest(q, g, photos, k)]] == lab[roles.queries]
    return {r: float(v.mean()) for r, v in ok.items()}


def hub_check(queries: np.ndarray, gallery: np.ndarray, names: list[str], photos: np.ndarray, new: np.ndarray,
              sku: str, ranking: str, k: int, skus_after: int) -> bool:
    """``catalog add``'s hub check of the reference vectors ``new`` of ``sku`` against a catalog of
    ``gallery`` rows (``names``), the unlabeled ``photos`` as the store photos: more taken from
    other SKUs than :func:`catalog.skus.hub_limit`."""
    from catalog.skus import hub_limit

    hub = HubnessReference(photos.astype(np.float32), k) if ranking == "CSLS" else None
    current = gallery_matches(gallery.astype(np.float32), names, photos.astype(np.float32), hub)
    offsets = None if hub is None else hub.offsets(new.astype(np.float32))
    taken = switches_to(current, photos, new, offsets, sku).sum()
    return bool(taken > hub_limit(len(photos), skus_after))


def product_check(photo_raw, gallery_raw, lab, classes, folds, groups_of, k: int, seed: int = 0) -> dict:
    """Per ranking: for one-SKU fixes of 2 in-store photos, appended one ``catalog add --append``
    at a time (each checked against the catalog as the previous one left it; a refused photo is
    not appended): how many fixes had both / at least one photo refused, and the mean -net per fix
    with the check and without it; for new SKUs' packshots: flagged / all and the other SKUs'
    photos lost by flagged and by the others."""
    scales = len(MAIN_JOB["scales"])
    out = {}
    for ranking in ("plain", "CSLS"):
        rows = {"append": [], "new": []}
        for f in folds:
            (roles,) = fold_roles(list(lab), [f], center_size=len(f.train) // 6, extra_references=2, seed=seed)
            mu = photo_raw[roles.center].mean(0)
            g = normalise(gallery_raw, mu, scales)
            q = normalise(photo_raw[roles.queries], mu, scales)
            u_all = normalise(photo_raw[roles.center], mu, scales)
            truth = lab[roles.queries]
            names = list(classes)
            for s_idx, name in enumerate(classes):
                refs = roles.references.get(name, np.zeros(0, np.int64))
                own = truth == name
                if len(refs) < 2 or not own.any():
                    continue
                u = u_all[~np.isin(groups_of[roles.center], groups_of[refs])]
                photos = None if ranking == "plain" else u
                new = normalise(photo_raw[refs], mu, scales)
                g_fix, sku_fix = np.concatenate([g, new]), np.concatenate([np.arange(len(classes)), [s_idx] * len(refs)])
                before = classes[nearest(q, g, photos, k)] == truth

                def cost(gal: np.ndarray, sku_rows: np.ndarray) -> int:
                    after = classes[sku_rows[nearest(q, gal, photos, k)]] == truth
                    return -(int(after[own].sum() - before[own].sum()) - int((before & ~after)[~own].sum()))

                g_now, sku_now, names_now, refused = g, np.arange(len(classes)), names, 0
                for v in new:  # one `catalog add --append` per photo
                    if hub_check(q, g_now, names_now, u, v[None], name, ranking, k, len(classes)):
                        refused += 1
                        continue
                    g_now, sku_now = np.concatenate([g_now, v[None]]), np.append(sku_now, s_idx)
                    names_now = names_now + [name]
                rows["append"].append((refused, cost(g_now, sku_now), cost(g_fix, sku_fix)))
                rest = np.array([i for i in range(len(classes)) if i != s_idx])
                photos = None if ranking == "plain" else u_all
                b = classes[rest[nearest(q, g[rest], photos, k)]] == truth
                a = classes[nearest(q, g, photos, k)] == truth
                lost = int((b & ~a)[~own].sum())
                rows["new"].append((hub_check(q, g[rest], [names[i] for i in rest], u_all, g[s_idx: s_idx + 1], name,
                                              ranking, k, len(classes)), lost))
        a = np.array(rows["append"], float)
        through = a[:, 0] < 2
        out[f"append-{ranking}"] = {
            "fixes": len(a), "both_refused": int((a[:, 0] == 2).sum()), "first_or_second_through": int(through.sum()),
            "cost_checked": float(a[:, 1].mean()), "cost_unchecked": float(a[:, 2].mean()),
            "cost_checked_where_through": float(a[through, 1].mean()) if through.any() else None}
        r = np.array(rows["new"], float)
        flag = r[:, 0] > 0
        out[f"new-{ranking}"] = {"flagged": int(flag.sum()), "all": len(r),
                                 "cost_flagged": float(r[flag, 1].mean()) if flag.any() else None,
                                 "cost_not_flagged": float(r[~flag, 1].mean()) if (~flag).any() else None}
    return out


def main(argv: list[str] | None = None) -> int:
    p = arguments(__doc__)
    p.add_argument("--product-check", action="store_true", help="also catalog add's hub check (module docstring)")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    _store, lab, classes, gallery_raw, photo_raw, raw, folds = main_job_train(args.data, args.cache)
    groups_of = capture_groups(raw, list(lab), SESSION_COSINE)

    print(f"{len(lab)} train photos, 5 capture-session folds, main job embedding, CSLS k = {args.k}; "
          "a fix = one SKU's in-store photos appended in one fold\n")
    print("| photos appended | ranking | fixes | own recall before -> after | others lost / gained per fix "
          "| net per fix [95 %, SKU bootstrap] | fixes with net > 0 / < 0 |")
    print("|---|---|---|---|---|---|---|")
    report: dict = {"k": args.k}
    for extra in (2, 1):
        res = fixes(photo_raw, gallery_raw, lab, classes, folds, groups_of, extra, args.k)
        for ranking in ("plain", "CSLS"):
            r = res[ranking]
            net = (r["own_after"] - r["own_before"]) - r["lost"] + r["gained"]
            lo, hi = class_bootstrap(net.astype(float), r["sku"], args.bootstrap, 0.95)
            row = {"fixes": len(net), "recall_before": float(r["own_before"].sum() / r["own"].sum()),
                   "recall_after": float(r["own_after"].sum() / r["own"].sum()),
                   "lost": float(r["lost"].mean()), "gained": float(r["gained"].mean()),
                   "net": [float(net.mean()), lo, hi], "positive": int((net > 0).sum()),
                   "negative": int((net < 0).sum())}
            report[f"{extra}-{ranking}"] = row
            print(f"| {extra} | {ranking} | {row['fixes']} | {row['recall_before']:.3f} -> {row['recall_after']:.3f} "
                  f"| {row['lost']:.1f} / {row['gained']:.1f} | {net.mean():+.2f} [{lo:+.2f}, {hi:+.2f}] "
                  f"| {row['positive']} / {row['negative']} |")
        print(f"|  | (the product's matcher agreed with the formula on {res['agree']} of {res['checked']} "
              f"sampled fixes) | | | | | |")
    ok = report["2-CSLS"]["net"][1] > 0
    print(f"\nrule (CSLS, 2 photos: the 95 % SKU-bootstrap interval of the net per fix above zero): "
          f"{'met: the advice comes back' if ok else 'not met'}")
    print("\nevery SKU with in-store photos at once (report): top-1 over all train photos")
    print("| photos per SKU | plain | CSLS |\n|---|---|---|")
    report["every_sku"] = {}
    for extra in (0, 1, 2):
        t = every_sku(photo_raw, gallery_raw, lab, classes, folds, extra, args.k)
        report["every_sku"][extra] = t
        print(f"| {extra} | {t['plain']:.3f} | {t['CSLS']:.3f} |")
    if args.product_check:
        report["product_check"] = pc = product_check(photo_raw, gallery_raw, lab, classes, folds, groups_of, args.k)
        fmt = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
        print("\ncatalog add's hub check (catalog.skus.hub_limit): one-SKU fixes, 2 in-store photos appended one "
              "add at a time (cost: -net, photos of a fold)")
        print("| ranking | fixes | both photos refused | one or both appended | cost per fix with the check "
              "(where any was appended) | without the check |\n|---|---|---|---|---|---|")
        for ranking in ("plain", "CSLS"):
            r = pc[f"append-{ranking}"]
            print(f"| {ranking} | {r['fixes']} | {r['both_refused']} | {r['first_or_second_through']} | "
                  f"{r['cost_checked']:.1f} ({fmt(r['cost_checked_where_through'])}) | {r['cost_unchecked']:.1f} |")
        print("\nnew SKUs' packshots, each added to a catalog of the other 80 (cost: other SKUs' photos lost)")
        print("| ranking | flagged | cost of flagged / not flagged |\n|---|---|---|")
        for ranking in ("plain", "CSLS"):
            r = pc[f"new-{ranking}"]
            print(f"| {ranking} | {r['flagged']} / {r['all']} | {fmt(r['cost_flagged'])} / {fmt(r['cost_not_flagged'])} |")
    print(f"\n{time.perf_counter() - t0:.0f} s")
    report["rule_met"] = ok
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
