"""The ``catalog`` command's subcommands, one function each (``cmd_init`` ... ``cmd_check``):
each takes the parsed arguments of :func:`catalog.cli.build_parser`, prints its output (text:
one record per line, tab-separated fields through :func:`field`; or ``--json``) and returns the
exit code.  Errors are raised (:class:`~retailklip.errors.RetailKlipError`) and printed as one
line by :func:`catalog.cli.main`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from retailklip.errors import RetailKlipError
from retailklip.images import IMAGE_SUFFIXES

from .store import Catalog, default_catalog_dir

_FIELD_ESCAPES = {c: f"\\x{c:02x}" for c in [*range(0x20), *range(0x7F, 0xA0)]}
_FIELD_ESCAPES.update({ord("\\"): "\\\\", ord("\t"): "\\t", ord("\n"): "\\n", ord("\r"): "\\r"})


def field(text) -> str:
    """One field of the tab-separated text output: backslash, tab, newline and carriage return
    escaped (``\\\\``, ``\\t``, ``\\n``, ``\\r``), other C0 / C1 control characters as ``\\xNN`` (a
    terminal never sees an escape sequence from stored data), so every record stays one line."""
    return str(text).translate(_FIELD_ESCAPES)


def catalog_dir(args) -> Path:
    """The catalog directory of a command: ``--catalog``, else :func:`catalog.store.default_catalog_dir`."""
    return args.catalog if args.catalog is not None else default_catalog_dir()


def image_list(path: Path) -> list[Path]:
    """Image files under a directory (recursive, sorted), or the paths listed one per line in a
    text file (relative to the file; a CSV's ``image`` column).

    Raises:
        RetailKlipError: missing path or no images found.
    """
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    elif path.is_file():
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        if lines and lines[0].split(",")[0] == "image":
            lines = [ln.split(",")[0] for ln in lines[1:]]
        files = [path.parent / ln for ln in lines]
    else:
        raise RetailKlipError(f"{path}: no such file or directory")
    if not files:
        raise RetailKlipError(f"{path}: no images found")
    return files


def expand_images(paths: list[Path]) -> list[Path]:
    """Command-line IMAGE arguments -> image files: a directory stands for the images under it
    (:func:`image_list`: recursive, sorted), anything else is kept as given (checked when read).

    Raises:
        RetailKlipError: a directory with no images in it.
    """
    return [f for p in paths for f in (image_list(p) if p.is_dir() else [p])]


def cmd_init(args) -> int:
    cat = Catalog.init(
        catalog_dir(args), encoder=args.encoder, weights=args.weights, augmentations=args.augmentations,
        threshold=args.threshold, seed=args.seed, db_url=args.db_url, encoder_options=dict(args.encoder_option),
        random_init=args.random_init, device=args.device,
        center_photos=image_list(args.center_photos) if args.center_photos else None, hubness_k=args.hubness_k,
    )
    if args.segment:
        cat.set_segmenter(args.segment, args.checkpoint)
    st = cat.settings()
    print(f"initialised {cat.root}: encoder {st['encoder_key']}, K={st['augmentations']}, threshold={st['threshold']}")
    return 0


def require_append_for_force(args) -> None:
    """``add`` and ``import``: --force only overrides the hub refusal of --append."""
    if args.force and not args.append:
        raise RetailKlipError("--force applies to --append only (a new SKU is never refused as a hub, only warned about)")


def cmd_add(args) -> int:
    require_append_for_force(args)
    cat = Catalog.open(catalog_dir(args), db_url=args.db_url, device=args.device)
    info = cat.add(args.image, sku=args.sku, name=args.name, append=args.append, force=args.force)
    if args.json:
        print(json.dumps(info.to_dict(), ensure_ascii=False, indent=1))
        return 0
    print(f"added {field(info.sku)} ({info.references} reference image(s), {info.vectors} vectors)")
    for n in info.confusable_with:
        print(f"catalog: warning: {field(info.sku)} is within the threshold of SKU {field(n.sku)} (cosine distance "
              f"{n.distance:.3f}): photos of one may be recognised as the other; check it is not the same product, "
              f"or add more reference images (--append)", file=sys.stderr)
    taken = info.store_photos
    if taken is not None and taken.hub:
        print(f"catalog: warning: {field(info.sku)}'s new reference image takes {taken.taken} of the catalog's "
              f"{taken.photos} unlabeled store photos from other SKUs (limit {taken.limit:.1f}): photos of other "
              f"products may be recognised as it", file=sys.stderr)
    return 0


def cmd_import(args) -> int:
    require_append_for_force(args)
    cat = Catalog.open(catalog_dir(args), db_url=args.db_url, device=args.device)
    result = cat.import_csv(args.csv, append=args.append, force=args.force, progress=sys.stderr.isatty() or args.verbose > 0)
    if args.json:
        print(json.dumps([r.to_dict() for r in result], ensure_ascii=False, indent=1))
    elif args.append:
        print(f"appended {sum(r.references for r in result)} reference images to {len(result)} SKUs")
    else:
        print(f"imported {len(result)} SKUs")
    return 0


def cmd_list(args) -> int:
    cat = Catalog.open(catalog_dir(args), db_url=args.db_url)
    if args.references is not None:
        return print_listing(cat.reference_images(args.references or None), args.json, "reference image(s)", lambda r: (
            f"{field(r.sku)}\t{r.sha256[:12]}\t{r.width}x{r.height}\t{r.created:%Y-%m-%d %H:%M}\t{field(str(r.path))}"))
    return print_listing(cat.list_skus(), args.json, "SKU(s)", lambda s: (
        f"{field(s.sku)}\t{field(s.name or '')}\t{s.references} ref\t{s.vectors} vec\t{s.created:%Y-%m-%d %H:%M}"))


def print_listing(items: list, as_json: bool, what: str, line) -> int:
    """Print ``items`` as a JSON list of their ``to_dict()`` or one ``line(item)`` each, with the
    count on stderr; returns exit code 0."""
    if as_json:
        print(json.dumps([i.to_dict() for i in items], ensure_ascii=False, indent=1))
    else:
        for i in items:
            print(line(i))
        print(f"{len(items)} {what}", file=sys.stderr)
    return 0


def cmd_upgrade(args) -> int:
    before, after = Catalog.upgrade(catalog_dir(args), db_url=args.db_url)
    print(f"catalog schema is at {after}" + ("" if before == after else f" (upgraded from {before})"))
    return 0


def cmd_remove(args) -> int:
    cat = Catalog.open(catalog_dir(args), db_url=args.db_url)
    if args.reference is not None:
        info = cat.remove_reference(args.sku, args.reference)
        print(f"removed a reference image of {field(info.sku)} ({info.references} left)")
        return 0
    cat.remove(args.sku)
    print(f"removed {args.sku}")
    return 0


def cmd_info(args) -> int:
    cat = Catalog.open(catalog_dir(args), db_url=args.db_url)
    st = dict(cat.settings(), catalog=str(cat.root), skus=len(cat), outlier_references=cat.outlier_count())
    if args.json:
        print(json.dumps(st, indent=1))
    else:
        for k, v in st.items():
            print(f"{k}: {v}")
    return 0


def cmd_outliers(args) -> int:
    """``catalog outliers add | import | list | remove``."""
    action = args.outliers_command
    cat = Catalog.open(catalog_dir(args), db_url=args.db_url, device=args.device)
    progress = sys.stderr.isatty() or args.verbose > 0
    if action in ("add", "import"):
        if action == "add":
            images = expand_images(args.images)
            labels = None if args.label is None else [args.label] * len(images)
            added = cat.add_outliers(images, labels, progress=progress)
        else:
            added = cat.import_outliers(args.csv, progress=progress)
        if args.json:
            print(json.dumps([o.to_dict() for o in added], ensure_ascii=False, indent=1))
        else:
            print(f"added {len(added)} outlier reference(s) ({sum(o.vectors for o in added)} vectors); "
                  f"{cat.outlier_count()} in the catalog")
        return 0
    if action == "list":
        outliers = cat.list_outliers()
        if args.json:
            print(json.dumps([o.to_dict() for o in outliers], ensure_ascii=False, indent=1))
        else:
            for o in outliers:
                print(f"{o.id}\t{field(o.label or '')}\t{o.vectors} vec\t{o.width}x{o.height}\t{o.filename}\t"
                      f"{o.created:%Y-%m-%d %H:%M}")
            print(f"{len(outliers)} outlier reference(s)", file=sys.stderr)
        return 0
    n = cat.remove_outliers(args.ids)
    print(f"removed {n} outlier reference(s); {cat.outlier_count()} left")
    return 0


def segmenter_options(args) -> dict:
    """``--segment-option KEY=VALUE`` and ``--points-per-side N`` as one dict of
    :class:`~retailklip.segment.MaskGeneratorOptions` fields.

    Raises:
        RetailKlipError: a key that is no such field.
    """
    seg_options = dict(args.segment_option)
    if args.points_per_side is not None:
        seg_options["points_per_side"] = args.points_per_side
    if seg_options:
        from dataclasses import fields

        from retailklip.segment import MaskGeneratorOptions

        known = {f.name for f in fields(MaskGeneratorOptions)}
        bad = sorted(set(seg_options) - known)
        if bad:
            raise RetailKlipError(f"unknown segmenter option(s) {', '.join(bad)}; known: {', '.join(sorted(known))}")
    return seg_options


def cmd_recognize(args) -> int:
    from retailklip.images import load_image
    from retailklip.recognizer import Recognizer

    seg_options = segmenter_options(args)
    images = expand_images(args.images)  # an empty directory: one error before any model is built
    if args.boxes is not None:
        from retailklip.coco import read_boxes

        box_file = read_boxes(args.boxes)  # a bad file: one error before any model is built
    rec = Recognizer.open(
        catalog_dir(args), db_url=args.db_url, device=args.device, threshold=args.threshold,
        segmenter=args.segment, checkpoint=args.checkpoint, segmenter_options=seg_options or None,
        open_set_score=_threshold_score(args),
    )
    if args.save_segments is not None and rec.segmenter is None and args.boxes is None:
        raise RetailKlipError("--save-segments needs a segmenter (--segment NAME) or --boxes")
    overlays = None
    if args.overlay is not None:
        from retailklip.overlay import check_overlay_path, overlay_paths

        overlays = overlay_paths(check_overlay_path(args.overlay), len(images))
    results, failed = [], 0
    for n, path in enumerate(images):
        try:
            im = load_image(path)
            boxes = box_file.boxes_for(path) if args.boxes is not None else None
            if args.save_segments is not None:
                from retailklip.segment import save_segments

                recs, segments = rec.recognize_segments(im, boxes=boxes)
                save_segments(segments, args.save_segments, path.name)
            else:
                recs = rec.recognize(im, boxes=boxes)
            if overlays is not None:
                from retailklip.overlay import save_overlay

                save_overlay(im, recs, overlays[n])
        except RetailKlipError as e:
            print(f"catalog: error: {e}", file=sys.stderr)
            failed += 1
            continue
        results.append({"image": str(path), "recognitions": [r.to_dict() for r in recs]})
        if overlays is not None:
            results[-1]["overlay"] = str(overlays[n])
        if not args.json:
            for r in recs:
                label = r.sku if r.known else f"unknown (nearest {r.nearest_sku})"
                runner = f", runner-up {field(r.runner_up.sku)} {r.runner_up.distance:.3f}" if r.runner_up else ""
                outlier = (f", outlier distance {r.outlier_distance:.3f}, outlier-ratio {r.outlier_ratio:.3f}"
                           if r.outlier_distance is not None else "")
                print(f"{field(path)}\t{field(label)}\t{field(r.name or '')}\tdistance {r.distance:.3f}{runner}{outlier}"
                      f"\tbbox {list(r.bbox)}")
    if args.json:
        print(json.dumps(results, ensure_ascii=False, indent=1))
    return 1 if failed else 0


def _threshold_score(args) -> str | None:
    """The score of ``--threshold`` (``--score``; a bare threshold is a distance), checked
    against the score's range.

    Raises:
        RetailKlipError: ``--score`` without ``--threshold``, or a threshold outside the score's range.
    """
    from retailklip.open_set import DEFAULT_OPEN_SET_SCORE, check_threshold

    if args.score is not None and args.threshold is None:
        raise RetailKlipError("--score is the score of --threshold: give --threshold too")
    if args.threshold is not None:
        check_threshold(args.threshold, args.score or DEFAULT_OPEN_SET_SCORE)
    return args.score


def _fraction(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def cmd_calibrate(args) -> int:
    from retailklip.calibration import calibrate_catalog
    from retailklip.datasets import read_photos_csv

    cat = Catalog.open(catalog_dir(args), db_url=args.db_url, device=args.device)
    photos = read_photos_csv(args.csv)
    previous, previous_score = cat.threshold, cat.open_set_score
    report = calibrate_catalog(
        cat, photos, progress=sys.stderr.isatty() or args.verbose > 0,
        target_precision=args.target_precision, match_softmax_cutoff=args.match_softmax_cutoff, score=args.score,
    )
    if not args.dry_run:
        cat.set_threshold(report.threshold, report.open_set_score)
    out = dict(report.to_dict(), previous_threshold=previous, previous_open_set_score=previous_score,
               stored=not args.dry_run, generation=cat.generation)
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    nn, sm = report.nearest_neighbour, report.softmax
    why = (f"known precision >= {report.target:g}" if report.mode == "target-precision"
           else f"unknown rejection >= {report.target:.3f}, the softmax head's at cutoff {report.softmax_cutoff:g}")
    where = "stored in the catalog" if not args.dry_run else "not stored (--dry-run)"
    print(f"threshold {report.threshold:.4f} on {report.open_set_score} ({why}); {where}, "
          f"previous {previous:.4f} on {previous_score}")
    print(f"photos: {report.photos} ({nn.known_photos} of catalog SKUs, {nn.unknown_photos} unknown); catalog: {report.skus} SKUs")
    print(f"{'':20}{f'1-NN + {report.open_set_score}':>18}{f'softmax >= {report.softmax_cutoff:g}':>18}")
    for label, key in [("known accuracy", "known_accuracy"), ("known precision", "known_precision"),
                       ("unknown rejection", "unknown_rejection"), ("known rejection", "known_rejection"),
                       ("closed-set top-1", "closed_set_top1"), ("AUROC", "auroc")]:
        print(f"{label:20}{_fraction(getattr(nn, key)):>18}{_fraction(getattr(sm, key)):>18}")
    if nn.known_precision_ci is not None:
        low, high = nn.known_precision_ci
        print(f"1-NN known precision, 95 % interval over the {nn.accepted} accepted photos: [{low:.3f}, {high:.3f}] "
              f"(sampling only; more calibration photos, from more shopping sessions, narrow it)")
    return 0


def cmd_eval(args) -> int:
    from retailklip.augment import DEFAULT_AUGMENTATIONS as K_DEFAULT
    from retailklip.datasets import load_dataset
    from retailklip.encoders import create_encoder
    from retailklip.evaluation import evaluate_zero_shot

    if args.layout == "coco":
        return cmd_eval_trays(args)
    coco_only = {"--images": args.images, "--masks": args.masks, "--segment": args.segment, "--checkpoint": args.checkpoint,
                 "--points-per-side": args.points_per_side, "--segment-option": args.segment_option or None,
                 "--threshold": args.threshold, "--iou-threshold": args.iou_threshold}
    given = [k for k, v in coco_only.items() if v is not None]
    if given:
        raise RetailKlipError(f"{', '.join(given)}: only with --layout coco")
    ds = load_dataset(args.layout, args.root, args.split)
    if any(v is not None and v < 1 for v in (args.max_classes, args.max_per_class)):
        raise RetailKlipError("--max-classes and --max-per-class must be >= 1")
    if args.max_classes is not None or args.max_per_class is not None:
        ds = ds.limited(args.max_classes, args.max_per_class)
    hubness = None  # a catalog's own hubness reduction; an encoder given here has no unlabeled photos
    if args.encoder is not None:
        encoder = create_encoder(args.encoder, weights=args.weights, device=args.device, **dict(args.encoder_option))
        k, seed = K_DEFAULT, 0
    else:
        if args.weights is not None or args.encoder_option:
            raise RetailKlipError("--weights and --encoder-option go with --encoder")
        cat = Catalog.open(catalog_dir(args), db_url=args.db_url, device=args.device)
        st = cat.settings()
        encoder, k, seed, hubness = cat.encoder(), st["augmentations"], st["seed"], cat.hubness_reference()
    k = args.augmentations if args.augmentations is not None else k
    seed = args.seed if args.seed is not None else seed
    if k < 1:
        raise RetailKlipError(f"--augmentations must be >= 1, got {k}")
    result = evaluate_zero_shot(ds, encoder, k=k, seed=seed, progress=sys.stderr.isatty() or args.verbose > 0,
                                hubness=hubness)
    if args.json:
        print(json.dumps(result.to_dict(), ensure_ascii=False, indent=1))
    else:
        print(f"{result.dataset} {result.split}: {result.classes} classes, {result.queries} images, K={k}, encoder {result.encoder}")
        csls = f", CSLS hubness reduction k={result.hubness_k}" if result.hubness_k else ""
        print(f"top-1 {result.top1:.4f}  per-class average {result.per_class_average:.4f}  ({result.seconds:.0f} s{csls})")
    return 0


def cmd_eval_trays(args) -> int:
    """``catalog eval --layout coco ANNOTATIONS.json``: tray-level metrics (retailklip.tray_eval)."""
    from retailklip.coco import read_coco
    from retailklip.recognizer import Recognizer
    from retailklip.tray_eval import evaluate_trays

    zero_shot_only = {"--split": args.split, "--encoder": args.encoder, "--weights": args.weights,
                      "--encoder-option": args.encoder_option or None, "--augmentations": args.augmentations,
                      "--seed": args.seed, "--max-classes": args.max_classes, "--max-per-class": args.max_per_class}
    given = [k for k, v in zero_shot_only.items() if v is not None]
    if given:
        raise RetailKlipError(f"{', '.join(given)}: not used with --layout coco (the catalog's encoder and references are)")
    masks = args.masks or "predicted"
    seg_options = segmenter_options(args)
    if masks == "ground-truth" and (args.segment or args.checkpoint or seg_options):
        raise RetailKlipError("--masks ground-truth recognises the annotated masks: drop --segment / --checkpoint / segmenter options")
    dataset = read_coco(args.root)  # a bad file: one error before any model is built
    if masks == "ground-truth":
        rec = Recognizer(Catalog.open(catalog_dir(args), db_url=args.db_url, device=args.device), threshold=args.threshold)
    else:
        rec = Recognizer.open(
            catalog_dir(args), db_url=args.db_url, device=args.device, threshold=args.threshold,
            segmenter=args.segment, checkpoint=args.checkpoint, segmenter_options=seg_options or None,
        )
    result = evaluate_trays(
        dataset, rec, images_dir=args.images, masks=masks,
        iou_threshold=args.iou_threshold if args.iou_threshold is not None else 0.5,
    )
    print(json.dumps(result.to_dict(), ensure_ascii=False, indent=1) if args.json else result.table())
    return 0


def cmd_rebuild(args) -> int:
    cat = Catalog.open(catalog_dir(args), db_url=args.db_url, device=args.device)
    info = cat.rebuild(
        encoder=args.encoder, weights=args.weights, encoder_options=dict(args.encoder_option) or None,
        random_init=args.random_init, center_photos=image_list(args.center_photos) if args.center_photos else None,
        hubness_k=args.hubness_k, index_type=args.index_type, memory_budget=args.memory_budget,
        target_recall=args.target_recall, keep=args.keep,
        ray=args.ray, ray_workers=args.ray_workers, progress=sys.stderr.isatty(), batch=args.batch,
    )
    if args.json:
        print(json.dumps(info.to_dict(), indent=1))
    else:
        print(f"rebuild: version {info.id} active: {info.factory}, {info.vectors} vectors, dim {info.dim}, "
              f"recall@1 {_fraction(info.recall_at_1)}, encoder {info.encoder_key}")
    return 0


def cmd_check(args) -> int:
    from .check import check

    cat = Catalog.open(catalog_dir(args), db_url=args.db_url, device=args.device)
    report = check(cat, repair=args.repair, images_from=args.images_from, verify_images=not args.quick,
                   progress=sys.stderr.isatty())
    if args.json:
        print(json.dumps(report.to_dict(), indent=1))
    else:
        for f in report.findings:
            fixed = f", repaired {f.repaired}" if args.repair else ("" if f.repairable else " (not repairable here)")
            print(f"{f.kind}: {f.count}{fixed}; e.g. {'; '.join(f.examples[:3])}")
        state = "ok" if report.ok else ("drift left unrepaired" if args.repair else "drift found (run with --repair)")
        print(f"check: {state}: {report.references} reference images, {report.vectors} vectors, "
              f"{len(report.findings)} finding kind(s), {report.seconds:.1f} s")
    return 0 if report.ok else 1


def cmd_versions(args) -> int:
    cat = Catalog.open(catalog_dir(args), db_url=args.db_url)
    versions = cat.versions()
    if args.json:
        print(json.dumps([v.to_dict() for v in versions], indent=1))
        return 0
    print(f"{'':2}{'id':>5}  {'created (UTC)':16}  {'status':8}  {'index':14}  {'vectors':>9}  {'recall@1':>8}  "
          f"{'hubness-k':>9}  {'outliers':>8}  {'outlier vectors':>15}  encoder")
    for v in versions:
        k = "-" if v.hubness_k is None else str(v.hubness_k)
        print(f"{'*' if v.active else ' ':2}{v.id:>5}  {v.created:%Y-%m-%d %H:%M}  {v.status:8}  {v.factory:14}  "
              f"{v.vectors:>9}  {_fraction(v.recall_at_1):>8}  {k:>9}  {v.outlier_references:>8}  "
              f"{v.outlier_vectors:>15}  {v.encoder_key}")
    return 0


def cmd_rollback(args) -> int:
    cat = Catalog.open(catalog_dir(args), db_url=args.db_url, device=args.device)
    info = cat.rollback(args.version, progress=sys.stderr.isatty())
    print(f"rollback: version {info.id} active: {info.factory}, {info.vectors} vectors, encoder {info.encoder_key}")
    return 0
