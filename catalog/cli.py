"""The ``catalog`` command: manage an SKU catalog and recognise products in photos.

Exit codes: 0 success; 1 a clear error (bad image, unknown SKU, missing weights, ...), printed
as one line ``catalog: error: ...`` on stderr; 2 bad command-line usage; for ``rebuild`` and
``rollback`` also 3 another rebuild is running and 4 the new index failed validation (the
previous version keeps serving in every failure case).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from sqlalchemy.exc import SQLAlchemyError

from retailklip.augment import DEFAULT_AUGMENTATIONS
from retailklip.encoders import DEFAULT_ENCODER_SPEC
from retailklip.errors import RetailKlipError
from retailklip.images import IMAGE_SUFFIXES
from retailklip.weights import parse_key_value

from .database import is_no_space, no_space_error
from .store import DEFAULT_THRESHOLD, Catalog, default_catalog_dir

logger = logging.getLogger("catalog")


def _distance(text: str) -> float:
    v = float(text)
    if not 0.0 <= v <= 2.0:
        raise argparse.ArgumentTypeError(f"a cosine distance is in [0, 2], got {v}")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="catalog",
        description="Recognise retail products (SKUs) in photos with a catalog of one reference image per SKU.",
    )
    p.add_argument(
        "--catalog", type=Path, default=None, metavar="DIR",
        help="catalog directory (default: $RETAILKLIP_CATALOG, else ~/.local/share/retailklip/catalog)",
    )
    p.add_argument("--db-url", default=None, help="SQLAlchemy database URL (default: SQLite file in the catalog directory)")
    p.add_argument("--device", default="cpu", help="torch device for the encoder, e.g. cpu or cuda (default: cpu)")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    from retailklip import __version__

    p.add_argument("--version", action="version", version=f"retailklip {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("init", help="create a catalog and choose its encoder")
    s.add_argument("--encoder", default=DEFAULT_ENCODER_SPEC, metavar="SPEC",
                   help=f"open_clip:MODEL/TAG, open_clip:MODEL or timm:MODEL (default: {DEFAULT_ENCODER_SPEC})")
    s.add_argument("--weights", type=Path, default=None, metavar="FILE", help="local encoder weights (safetensors or PyTorch state dict)")
    s.add_argument("--augmentations", type=int, default=DEFAULT_AUGMENTATIONS, metavar="K",
                   help=f"views per reference image, 1 = no augmentation (default: {DEFAULT_AUGMENTATIONS})")
    s.add_argument("--threshold", type=_distance, default=DEFAULT_THRESHOLD, metavar="D",
                   help=f"cosine distance in [0, 2] beyond which a match is unknown (default: {DEFAULT_THRESHOLD})")
    s.add_argument("--seed", type=int, default=0, help="augmentation seed (default: 0)")
    s.add_argument("--encoder-option", type=parse_key_value, action="append", default=[], metavar="KEY=VALUE",
                   help="backend option, repeatable: timm interpolation=bilinear, crop_pct=1.0; open_clip resize_mode=longest")
    s.add_argument("--center-photos", type=Path, default=None, metavar="DIR|LIST",
                   help="unlabeled in-store photos (a directory, searched recursively, or a file listing paths) whose mean "
                        "feature is subtracted from every embedding (SimpleShot CL2N centering; see docs/augmentation.md)")
    s.add_argument("--segment", default=None, metavar="NAME", help="default segmenter for recognize (e.g. efficientvit-sam-l0)")
    s.add_argument("--checkpoint", default=None, metavar="FILE", help="checkpoint of the default segmenter")
    s.add_argument("--random-init", action="store_true", help=argparse.SUPPRESS)  # tests only

    s = sub.add_parser("add", help="add an SKU from one reference image; recognisable at once")
    s.add_argument("image", type=Path)
    s.add_argument("--sku", default=None, metavar="ID", help="SKU id (default: the image file name without extension)")
    s.add_argument("--name", default=None, help="display name")
    s.add_argument("--append", action="store_true", help="add another reference image to an existing SKU")
    s.add_argument("--json", action="store_true", help="print the SKU as JSON, with the SKUs it could be confused with")

    s = sub.add_parser("import", help="bulk-add SKUs from a CSV with columns image,sku,name")
    s.add_argument("csv", type=Path)

    sub.add_parser("upgrade", help="migrate the catalog's database to the schema this retailklip needs")

    s = sub.add_parser("list", help="list the SKUs")
    s.add_argument("--json", action="store_true", help="print JSON")

    s = sub.add_parser("remove", help="remove an SKU")
    s.add_argument("sku")

    s = sub.add_parser("info", help="show the catalog's settings")
    s.add_argument("--json", action="store_true", help="print JSON")

    s = sub.add_parser("recognize", help="recognise the products in photos")
    s.add_argument("images", type=Path, nargs="+", metavar="IMAGE")
    s.add_argument("--json", action="store_true", help="print JSON: one object per image")
    s.add_argument("--threshold", type=_distance, default=None, metavar="D", help="override the catalog's distance threshold")
    s.add_argument("--segment", default=None, metavar="NAME", help="segmenter (default: the catalog's, else whole image)")
    s.add_argument("--checkpoint", default=None, metavar="FILE", help="segmenter checkpoint file")
    s.add_argument("--save-segments", type=Path, default=None, metavar="DIR", help="save each segment's RGBA crop as [image]_segment_[x].png")
    s.add_argument("--overlay", type=Path, default=None, metavar="FILE",
                   help="write a picture of the recognitions (.png/.jpg/.webp); several images: FILE_0.png, FILE_1.png, ... in input order")
    s.add_argument("--points-per-side", type=int, default=None, metavar="N",
                   help="segmenter point grid N x N (default 32; 16 is ~4x faster on the CPU)")
    s.add_argument("--segment-option", type=parse_key_value, action="append", default=[], metavar="KEY=VALUE",
                   help="automatic mask generation parameter, repeatable, e.g. pred_iou_thresh=0.8 (see docs/segmentation.md)")

    s = sub.add_parser("rebuild", help="re-embed every SKU, build a new index version, validate it and switch to it atomically")
    s.add_argument("--encoder", default=None, metavar="SPEC", help="new encoder (default: the catalog's), e.g. after a finetune")
    s.add_argument("--weights", type=Path, default=None, metavar="FILE", help="local weights of the encoder (e.g. finetune output)")
    s.add_argument("--encoder-option", type=parse_key_value, action="append", default=[], metavar="KEY=VALUE", help="backend option, repeatable")
    s.add_argument("--center-photos", type=Path, default=None, metavar="DIR|LIST",
                   help="unlabeled in-store photos for the new encoder's feature centre (SimpleShot CL2N)")
    s.add_argument("--index-type", default="auto", metavar="TYPE",
                   help="auto (by vector count and memory budget), or a FAISS index_factory string: Flat, HNSW32, IVF1024,PQ64, ...")
    s.add_argument("--memory-budget", type=_bytes, default=None, metavar="SIZE", help="memory the index may use with --index-type auto, e.g. 4G")
    s.add_argument("--target-recall", type=float, default=0.99, metavar="R", help="recall@1 approximate indexes are tuned to (default 0.99)")
    s.add_argument("--keep", type=int, default=3, metavar="N", help="index versions to keep, the active one included (default 3)")
    s.add_argument("--ray", default=None, metavar="ADDRESS", help="embed with Ray Data on a cluster: auto, local, HOST:PORT or ray://HOST:PORT")
    s.add_argument("--ray-workers", type=int, default=None, metavar="N", help="Ray actors (default: one per CPU slot)")
    s.add_argument("--batch", type=int, default=64, metavar="N", help="reference images per database commit while embedding (default 64)")
    s.add_argument("--json", action="store_true", help="print the new version as JSON")
    s.add_argument("--random-init", action="store_true", help=argparse.SUPPRESS)  # tests only

    s = sub.add_parser("check", help="find drift between database, image store and index files; --repair fixes it")
    s.add_argument("--repair", action="store_true", help="fix what can be fixed (see docs/reliability.md)")
    s.add_argument("--images-from", type=Path, action="append", default=[], metavar="DIR",
                   help="where to look for missing or corrupt reference images, matched by content hash (repeatable)")
    s.add_argument("--quick", action="store_true", help="check that stored images exist without hashing them")
    s.add_argument("--json", action="store_true", help="print JSON")

    s = sub.add_parser("versions", help="list the index versions")
    s.add_argument("--json", action="store_true", help="print JSON")

    s = sub.add_parser("rollback", help="make an earlier index version active again")
    s.add_argument("version", type=int, nargs="?", default=None, help="version id (default: the one before the active version)")

    s = sub.add_parser("calibrate", help="choose the distance threshold from labelled photos (CSV image,sku)")
    s.add_argument("csv", type=Path, metavar="PHOTOS_CSV",
                   help="CSV with columns image,sku (paths relative to the CSV); an sku not in the catalog = should be unknown")
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--target-precision", type=float, default=None, metavar="P",
                   help="largest threshold whose known precision on the photos is >= P (0 < P <= 1)")
    g.add_argument("--match-softmax-cutoff", type=float, default=None, metavar="C",
                   help="reject at least as many unknown photos as a softmax head with confidence cutoff C (the old system: 0.78)")
    s.add_argument("--dry-run", "--no-store", dest="dry_run", action="store_true", help="report only; keep the stored threshold")
    s.add_argument("--json", action="store_true", help="print JSON")

    from retailklip.datasets import LAYOUTS

    s = sub.add_parser("eval", help="RetailKLIP zero-shot protocol: one reference per class + K augmentations, 1-NN top-1")
    s.add_argument("root", type=Path, metavar="DATASET_DIR")
    s.add_argument("--layout", required=True, choices=list(LAYOUTS), help="dataset directory layout (see docs/evaluation.md)")
    s.add_argument("--split", default=None, help="query split (default: val for grocery-store, else test)")
    s.add_argument("--encoder", default=None, metavar="SPEC", help="encoder to evaluate (default: the catalog's)")
    s.add_argument("--weights", type=Path, default=None, metavar="FILE", help="local weights of --encoder")
    s.add_argument("--encoder-option", type=parse_key_value, action="append", default=[], metavar="KEY=VALUE", help="backend option of --encoder, repeatable")
    s.add_argument("--augmentations", type=int, default=None, metavar="K",
                   help=f"views per reference (default: the catalog's K; with --encoder {DEFAULT_AUGMENTATIONS})")
    s.add_argument("--seed", type=int, default=None, help="augmentation seed (default: the catalog's; with --encoder 0)")
    s.add_argument("--max-classes", type=int, default=None, metavar="N", help="only the first N classes (quick runs)")
    s.add_argument("--max-per-class", type=int, default=None, metavar="N", help="at most N query images per class")
    s.add_argument("--json", action="store_true", help="print JSON (with per-class counts)")
    return p


def _bytes(text: str) -> int:
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("B")
    unit = t[-1] if t and t[-1] in units else ""
    try:
        value = float(t[: len(t) - len(unit)])
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 512M, 4G)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"a size must be > 0, got {text!r}")
    return int(value * units[unit])


_FIELD_ESCAPES = {c: f"\\x{c:02x}" for c in [*range(0x20), *range(0x7F, 0xA0)]}
_FIELD_ESCAPES.update({ord("\\"): "\\\\", ord("\t"): "\\t", ord("\n"): "\\n", ord("\r"): "\\r"})


def field(text) -> str:
    """One field of the tab-separated text output: backslash, tab, newline and carriage return
    escaped (``\\\\``, ``\\t``, ``\\n``, ``\\r``), other C0 / C1 control characters as ``\\xNN`` (a
    terminal never sees an escape sequence from stored data), so every record stays one line."""
    return str(text).translate(_FIELD_ESCAPES)


def _catalog_dir(args) -> Path:
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


def cmd_init(args) -> int:
    cat = Catalog.init(
        _catalog_dir(args), encoder=args.encoder, weights=args.weights, augmentations=args.augmentations,
        threshold=args.threshold, seed=args.seed, db_url=args.db_url, encoder_options=dict(args.encoder_option),
        random_init=args.random_init, device=args.device,
        center_photos=image_list(args.center_photos) if args.center_photos else None,
    )
    if args.segment:
        cat.set_segmenter(args.segment, args.checkpoint)
    st = cat.settings()
    print(f"initialised {cat.root}: encoder {st['encoder_key']}, K={st['augmentations']}, threshold={st['threshold']}")
    return 0


def cmd_add(args) -> int:
    cat = Catalog.open(_catalog_dir(args), db_url=args.db_url, device=args.device)
    info = cat.add(args.image, sku=args.sku, name=args.name, append=args.append)
    if args.json:
        print(json.dumps(info.to_dict(), ensure_ascii=False, indent=1))
        return 0
    print(f"added {field(info.sku)} ({info.references} reference image(s), {info.vectors} vectors)")
    for n in info.confusable_with:
        print(f"catalog: warning: {field(info.sku)} is within the threshold of SKU {field(n.sku)} (cosine distance "
              f"{n.distance:.3f}): photos of one may be recognised as the other; check it is not the same product, "
              f"or add more reference images (--append)", file=sys.stderr)
    return 0


def cmd_import(args) -> int:
    cat = Catalog.open(_catalog_dir(args), db_url=args.db_url, device=args.device)
    n = cat.import_csv(args.csv, progress=sys.stderr.isatty() or args.verbose > 0)
    print(f"imported {n} SKUs")
    return 0


def cmd_list(args) -> int:
    cat = Catalog.open(_catalog_dir(args), db_url=args.db_url)
    skus = cat.list_skus()
    if args.json:
        print(json.dumps([s.to_dict() for s in skus], ensure_ascii=False, indent=1))
    else:
        for s in skus:
            print(f"{field(s.sku)}\t{field(s.name or '')}\t{s.references} ref\t{s.vectors} vec\t{s.created:%Y-%m-%d %H:%M}")
        print(f"{len(skus)} SKU(s)", file=sys.stderr)
    return 0


def cmd_upgrade(args) -> int:
    before, after = Catalog.upgrade(_catalog_dir(args), db_url=args.db_url)
    print(f"catalog schema is at {after}" + ("" if before == after else f" (upgraded from {before})"))
    return 0


def cmd_remove(args) -> int:
    cat = Catalog.open(_catalog_dir(args), db_url=args.db_url)
    cat.remove(args.sku)
    print(f"removed {args.sku}")
    return 0


def cmd_info(args) -> int:
    cat = Catalog.open(_catalog_dir(args), db_url=args.db_url)
    st = dict(cat.settings(), catalog=str(cat.root), skus=len(cat))
    if args.json:
        print(json.dumps(st, indent=1))
    else:
        for k, v in st.items():
            print(f"{k}: {v}")
    return 0


def cmd_recognize(args) -> int:
    from retailklip.images import load_image
    from retailklip.recognizer import Recognizer

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
    rec = Recognizer.open(
        _catalog_dir(args), db_url=args.db_url, device=args.device, threshold=args.threshold,
        segmenter=args.segment, checkpoint=args.checkpoint, segmenter_options=seg_options or None,
    )
    if args.save_segments is not None and rec.segmenter is None:
        raise RetailKlipError("--save-segments needs a segmenter (--segment NAME)")
    overlays = None
    if args.overlay is not None:
        from retailklip.overlay import check_overlay_path, overlay_paths

        overlays = overlay_paths(check_overlay_path(args.overlay), len(args.images))
    results, failed = [], 0
    for n, path in enumerate(args.images):
        try:
            im = load_image(path)
            if args.save_segments is not None:
                from retailklip.segment import save_segments

                recs, segments = rec.recognize_segments(im)
                save_segments(segments, args.save_segments, path.name)
            else:
                recs = rec.recognize(im)
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
                print(f"{field(path)}\t{field(label)}\t{field(r.name or '')}\tdistance {r.distance:.3f}{runner}\tbbox {list(r.bbox)}")
    if args.json:
        print(json.dumps(results, ensure_ascii=False, indent=1))
    return 1 if failed else 0


def _fraction(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def cmd_calibrate(args) -> int:
    from retailklip.calibration import calibrate_catalog
    from retailklip.datasets import read_photos_csv

    cat = Catalog.open(_catalog_dir(args), db_url=args.db_url, device=args.device)
    photos = read_photos_csv(args.csv)
    previous = cat.threshold
    report = calibrate_catalog(
        cat, photos, progress=sys.stderr.isatty() or args.verbose > 0,
        target_precision=args.target_precision, match_softmax_cutoff=args.match_softmax_cutoff,
    )
    if not args.dry_run:
        cat.set_threshold(report.threshold)
    out = dict(report.to_dict(), previous_threshold=previous, stored=not args.dry_run, generation=cat.generation)
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    nn, sm = report.nearest_neighbour, report.softmax
    why = (f"known precision >= {report.target:g}" if report.mode == "target-precision"
           else f"unknown rejection >= {report.target:.3f}, the softmax head's at cutoff {report.softmax_cutoff:g}")
    where = "stored in the catalog" if not args.dry_run else "not stored (--dry-run)"
    print(f"threshold {report.threshold:.4f} ({why}); {where}, previous {previous:.4f}")
    print(f"photos: {report.photos} ({nn.known_photos} of catalog SKUs, {nn.unknown_photos} unknown); catalog: {report.skus} SKUs")
    print(f"{'':20}{'1-NN + threshold':>18}{f'softmax >= {report.softmax_cutoff:g}':>18}")
    for label, key in [("known accuracy", "known_accuracy"), ("known precision", "known_precision"),
                       ("unknown rejection", "unknown_rejection"), ("known rejection", "known_rejection"),
                       ("closed-set top-1", "closed_set_top1"), ("AUROC", "auroc")]:
        print(f"{label:20}{_fraction(getattr(nn, key)):>18}{_fraction(getattr(sm, key)):>18}")
    return 0


def cmd_eval(args) -> int:
    from retailklip.augment import DEFAULT_AUGMENTATIONS as K_DEFAULT
    from retailklip.datasets import load_dataset
    from retailklip.encoders import create_encoder
    from retailklip.evaluation import evaluate_zero_shot

    ds = load_dataset(args.layout, args.root, args.split)
    if any(v is not None and v < 1 for v in (args.max_classes, args.max_per_class)):
        raise RetailKlipError("--max-classes and --max-per-class must be >= 1")
    if args.max_classes is not None or args.max_per_class is not None:
        ds = ds.limited(args.max_classes, args.max_per_class)
    if args.encoder is not None:
        encoder = create_encoder(args.encoder, weights=args.weights, device=args.device, **dict(args.encoder_option))
        k, seed = K_DEFAULT, 0
    else:
        if args.weights is not None or args.encoder_option:
            raise RetailKlipError("--weights and --encoder-option go with --encoder")
        cat = Catalog.open(_catalog_dir(args), db_url=args.db_url, device=args.device)
        st = cat.settings()
        encoder, k, seed = cat.encoder(), st["augmentations"], st["seed"]
    k = args.augmentations if args.augmentations is not None else k
    seed = args.seed if args.seed is not None else seed
    if k < 1:
        raise RetailKlipError(f"--augmentations must be >= 1, got {k}")
    result = evaluate_zero_shot(ds, encoder, k=k, seed=seed, progress=sys.stderr.isatty() or args.verbose > 0)
    if args.json:
        print(json.dumps(result.to_dict(), ensure_ascii=False, indent=1))
    else:
        print(f"{result.dataset} {result.split}: {result.classes} classes, {result.queries} images, K={k}, encoder {result.encoder}")
        print(f"top-1 {result.top1:.4f}  per-class average {result.per_class_average:.4f}  ({result.seconds:.0f} s)")
    return 0


def cmd_rebuild(args) -> int:
    cat = Catalog.open(_catalog_dir(args), db_url=args.db_url, device=args.device)
    info = cat.rebuild(
        encoder=args.encoder, weights=args.weights, encoder_options=dict(args.encoder_option) or None,
        random_init=args.random_init, center_photos=image_list(args.center_photos) if args.center_photos else None,
        index_type=args.index_type, memory_budget=args.memory_budget, target_recall=args.target_recall, keep=args.keep,
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

    cat = Catalog.open(_catalog_dir(args), db_url=args.db_url, device=args.device)
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
    cat = Catalog.open(_catalog_dir(args), db_url=args.db_url)
    versions = cat.versions()
    if args.json:
        print(json.dumps([v.to_dict() for v in versions], indent=1))
        return 0
    print(f"{'':2}{'id':>5}  {'created (UTC)':16}  {'status':8}  {'index':14}  {'vectors':>9}  {'recall@1':>8}  encoder")
    for v in versions:
        print(f"{'*' if v.active else ' ':2}{v.id:>5}  {v.created:%Y-%m-%d %H:%M}  {v.status:8}  {v.factory:14}  "
              f"{v.vectors:>9}  {_fraction(v.recall_at_1):>8}  {v.encoder_key}")
    return 0


def cmd_rollback(args) -> int:
    cat = Catalog.open(_catalog_dir(args), db_url=args.db_url, device=args.device)
    info = cat.rollback(args.version, progress=sys.stderr.isatty())
    print(f"rollback: version {info.id} active: {info.factory}, {info.vectors} vectors, encoder {info.encoder_key}")
    return 0


COMMANDS = {
    "init": cmd_init, "add": cmd_add, "import": cmd_import, "list": cmd_list, "remove": cmd_remove,
    "info": cmd_info, "recognize": cmd_recognize, "calibrate": cmd_calibrate, "eval": cmd_eval,
    "rebuild": cmd_rebuild, "upgrade": cmd_upgrade, "versions": cmd_versions, "rollback": cmd_rollback, "check": cmd_check,
}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``catalog`` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return COMMANDS[args.command](args)
    except RetailKlipError as e:
        print(f"catalog: error: {' '.join(str(e).split())}", file=sys.stderr)
        return int(getattr(e, "exit_code", 1))
    except SQLAlchemyError as e:  # e.g. "database is locked" after the busy timeout
        msg = str(getattr(e, "orig", None) or e).splitlines()[0]
        print(f"catalog: error: database error: {msg}", file=sys.stderr)
        return 1
    except OSError as e:  # e.g. an unwritable --save-segments / --overlay path, a full disk
        if is_no_space(e):
            e = no_space_error(_catalog_dir(args), str(e))
        print(f"catalog: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("catalog: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
