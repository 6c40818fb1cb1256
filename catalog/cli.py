"""The ``catalog`` command: manage an SKU catalog and recognise products in photos.

Exit codes: 0 success; 1 a clear error (bad image, unknown SKU, missing weights, ...), printed
as one line ``catalog: error: ...`` on stderr; 2 bad command-line usage; for ``rebuild`` and
``rollback`` also 3 another rebuild is running and 4 the new index failed validation (the
previous version keeps serving in every failure case).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from sqlalchemy.exc import SQLAlchemyError

from retailklip.augment import DEFAULT_AUGMENTATIONS
from retailklip.encoders import DEFAULT_ENCODER_SPEC
from retailklip.errors import RetailKlipError
from retailklip.hubness import DEFAULT_HUBNESS_K
from retailklip.open_set import OPEN_SET_SCORES
from retailklip.weights import parse_key_value

from .commands import (
    catalog_dir,
    cmd_add,
    cmd_calibrate,
    cmd_check,
    cmd_eval,
    cmd_import,
    cmd_info,
    cmd_init,
    cmd_list,
    cmd_outliers,
    cmd_rebuild,
    cmd_recognize,
    cmd_remove,
    cmd_rollback,
    cmd_upgrade,
    cmd_versions,
)
from .connection import open_connections
from .database import is_no_space, no_space_error
from .store import DEFAULT_THRESHOLD

logger = logging.getLogger("catalog")


def _distance(text: str) -> float:
    v = float(text)
    if not 0.0 <= v <= 2.0:
        raise argparse.ArgumentTypeError(f"a cosine distance is in [0, 2], got {v}")
    return v


def _threshold(text: str) -> float:
    v = float(text)
    if not (v >= 0.0 and v != float("inf")):
        raise argparse.ArgumentTypeError(
            f"a threshold is a cosine distance in [0, 2] (on --score ratio: in [0, 1]; outlier-ratio: finite, >= 0), got {text}")
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
    s.add_argument("--hubness-k", type=int, default=None, metavar="K",
                   help="with --center-photos: rank the 1-NN by CSLS hubness reduction against those photos, each "
                        "reference's hubness measured on its K most similar ones; 0: plain 1-NN "
                        f"(default: {DEFAULT_HUBNESS_K} with --center-photos, else 0; docs/evaluation.md)")
    s.add_argument("--segment", default=None, metavar="NAME", help="default segmenter for recognize (e.g. efficientvit-sam-l0)")
    s.add_argument("--checkpoint", default=None, metavar="FILE", help="checkpoint of the default segmenter")
    s.add_argument("--random-init", action="store_true", help=argparse.SUPPRESS)  # tests only

    s = sub.add_parser("add", help="add an SKU from one reference image; recognisable at once")
    s.add_argument("image", type=Path)
    s.add_argument("--sku", default=None, metavar="ID", help="SKU id (default: the image file name without extension)")
    s.add_argument("--name", default=None, help="display name")
    s.add_argument("--append", action="store_true", help="add another reference image to an existing SKU")
    s.add_argument("--force", action="store_true",
                   help="with --append: append even a reference image that would take many store photos from other SKUs")
    s.add_argument("--json", action="store_true", help="print the SKU as JSON, with the SKUs it could be confused with")

    s = sub.add_parser("import", help="bulk-add SKUs from a CSV with columns image,sku,name (or, --append, more "
                                      "reference images of existing SKUs)")
    s.add_argument("csv", type=Path)
    s.add_argument("--append", action="store_true",
                   help="append each row's image to its existing SKU (several rows per SKU allowed); the store-photo "
                        "hub check counts all rows together")
    s.add_argument("--force", action="store_true",
                   help="with --append: append even when some SKUs would take many store photos from other SKUs")
    s.add_argument("--json", action="store_true", help="print one JSON object per SKU with the store photos it takes")

    sub.add_parser("upgrade", help="migrate the catalog's database to the schema this retailklip needs")

    s = sub.add_parser("list", help="list the SKUs (or, --references, their stored reference images)")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.add_argument("--references", nargs="?", const="", default=None, metavar="SKU",
                   help="list the stored reference images (of every SKU, or of SKU): sha256, size, stored copy")

    s = sub.add_parser("remove", help="remove an SKU (or, --reference, one of its reference images)")
    s.add_argument("sku")
    s.add_argument("--reference", type=Path, default=None, metavar="IMAGE",
                   help="remove only this reference image of the SKU (the file that was added: its content identifies it)")

    s = sub.add_parser("info", help="show the catalog's settings")
    s.add_argument("--json", action="store_true", help="print JSON")

    s = sub.add_parser("outliers", help="outlier references: images of products NOT in the catalog (for --score outlier-ratio)",
                       description="Outlier references are images of products the store does not sell (e.g. the packshots of "
                                   "the products the encoder was finetuned on). They are never recognised; each photo's distance "
                                   "to the nearest of them is the denominator of the outlier-ratio open-set score "
                                   "(docs/threshold.md).")
    osub = s.add_subparsers(dest="outliers_command", required=True, metavar="ACTION")
    o = osub.add_parser("add", help="add outlier images (files, or directories searched recursively), all or nothing")
    o.add_argument("images", type=Path, nargs="+", metavar="IMAGE|DIR")
    o.add_argument("--label", default=None, help="label of every image given (default: each file's name without extension)")
    o.add_argument("--json", action="store_true", help="print the new outlier references as JSON")
    o = osub.add_parser("import", help="add the outlier images of a CSV with columns image[,label], all or nothing")
    o.add_argument("csv", type=Path)
    o.add_argument("--json", action="store_true", help="print the new outlier references as JSON")
    o = osub.add_parser("list", help="list the outlier references")
    o.add_argument("--json", action="store_true", help="print JSON")
    o = osub.add_parser("remove", help="remove outlier references by id (see list), all or nothing")
    o.add_argument("ids", type=int, nargs="+", metavar="ID")

    s = sub.add_parser("recognize", help="recognise the products in photos")
    s.add_argument("images", type=Path, nargs="+", metavar="IMAGE",
                   help="photo files, or directories (every image under them, sorted)")
    s.add_argument("--json", action="store_true", help="print JSON: one object per image")
    s.add_argument("--threshold", type=_threshold, default=None, metavar="T",
                   help="override the catalog's threshold (and its score): T on --score, a cosine distance by default")
    s.add_argument("--score", choices=OPEN_SET_SCORES, default=None,
                   help="the open-set score --threshold is on: distance (default), ratio (nearest / runner-up distance) "
                        "or outlier-ratio (nearest distance / distance to the nearest outlier reference; needs `catalog outliers add`)")
    s.add_argument("--segment", default=None, metavar="NAME", help="segmenter (default: the catalog's, else whole image)")
    s.add_argument("--checkpoint", default=None, metavar="FILE", help="segmenter checkpoint file")
    s.add_argument("--save-segments", type=Path, default=None, metavar="DIR", help="save each segment's RGBA crop as [image]_segment_[x].png")
    s.add_argument("--overlay", type=Path, default=None, metavar="FILE",
                   help="write a picture of the recognitions (.png/.jpg/.webp); several images: FILE_0.png, FILE_1.png, ... in input order")
    s.add_argument("--points-per-side", type=int, default=None, metavar="N",
                   help="segmenter point grid N x N (default 32; 16 is ~4x faster on the CPU)")
    s.add_argument("--segment-option", type=parse_key_value, action="append", default=[], metavar="KEY=VALUE",
                   help="automatic mask generation parameter, repeatable, e.g. pred_iou_thresh=0.8 (see docs/segmentation.md)")
    s.add_argument("--boxes", type=Path, default=None, metavar="FILE",
                   help="where the products are (a POS detector, a fixed tray layout): JSON list of [x0, y0, x1, y1] pixel "
                        "boxes, or a COCO file (the boxes of the image with the photo's file name); one segment per box")

    s = sub.add_parser("rebuild", help="re-embed every SKU, build a new index version, validate it and switch to it atomically")
    s.add_argument("--encoder", default=None, metavar="SPEC", help="new encoder (default: the catalog's), e.g. after a finetune")
    s.add_argument("--weights", type=Path, default=None, metavar="FILE", help="local weights of the encoder (e.g. finetune output)")
    s.add_argument("--encoder-option", type=parse_key_value, action="append", default=[], metavar="KEY=VALUE", help="backend option, repeatable")
    s.add_argument("--center-photos", type=Path, default=None, metavar="DIR|LIST",
                   help="unlabeled in-store photos for the new encoder's feature centre (SimpleShot CL2N) and hubness reduction")
    s.add_argument("--hubness-k", type=int, default=None, metavar="K",
                   help="CSLS hubness reduction's K for the new version, 0: off (default: the catalog's; needs unlabeled photos, "
                        "from --center-photos now or before)")
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

    s = sub.add_parser("calibrate", help="choose the open-set threshold from labelled photos (CSV image,sku)")
    s.add_argument("csv", type=Path, metavar="PHOTOS_CSV",
                   help="CSV with columns image,sku (paths relative to the CSV); an sku not in the catalog = should be unknown")
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--target-precision", type=float, default=None, metavar="P",
                   help="largest threshold whose known precision on the photos is >= P (0 < P <= 1)")
    g.add_argument("--match-softmax-cutoff", type=float, default=None, metavar="C",
                   help="reject at least as many unknown photos as a softmax head with confidence cutoff C (the old system: 0.78)")
    s.add_argument("--score", choices=OPEN_SET_SCORES, default=None,
                   help="the open-set score to threshold, stored with the threshold: outlier-ratio (the default when the "
                        "catalog has outlier references: nearest distance / distance to the nearest outlier, the best AUROC "
                        "under class-disjoint CV, docs/threshold.md), ratio (the default without outliers: nearest / "
                        "runner-up distance) or distance (the 1-NN cosine distance)")
    s.add_argument("--dry-run", "--no-store", dest="dry_run", action="store_true", help="report only; keep the stored threshold")
    s.add_argument("--json", action="store_true", help="print JSON")

    from retailklip.datasets import LAYOUTS

    s = sub.add_parser("eval", help="RetailKLIP zero-shot protocol (a dataset directory), or checkout trays (--layout coco)")
    s.add_argument("root", type=Path, metavar="DATASET_DIR|ANNOTATIONS.json")
    s.add_argument("--layout", required=True, choices=[*LAYOUTS, "coco"],
                   help="dataset directory layout, or coco: tray photos with COCO instance annotations, category name = "
                        "SKU id, through the whole pipeline (see docs/evaluation.md)")
    s.add_argument("--images", type=Path, default=None, metavar="DIR",
                   help="coco: directory of the photos' file_names (default: the annotation file's directory)")
    s.add_argument("--masks", choices=["predicted", "ground-truth"], default=None,
                   help="coco: segment with the segmenter (predicted, default) or recognise the annotated masks (ground-truth)")
    s.add_argument("--segment", default=None, metavar="NAME", help="coco: segmenter (default: the catalog's, else whole image)")
    s.add_argument("--checkpoint", default=None, metavar="FILE", help="coco: segmenter checkpoint file")
    s.add_argument("--points-per-side", type=int, default=None, metavar="N", help="coco: segmenter point grid N x N")
    s.add_argument("--segment-option", type=parse_key_value, action="append", default=[], metavar="KEY=VALUE",
                   help="coco: automatic mask generation parameter, repeatable")
    s.add_argument("--threshold", type=_distance, default=None, metavar="D", help="coco: override the catalog's distance threshold")
    s.add_argument("--iou-threshold", type=float, default=None, metavar="T",
                   help="coco: mask IoU at which a prediction matches an annotated object (default 0.5)")
    s.add_argument("--split", default=None, help="query split (default: val for grocery-store, else test)")
    s.add_argument("--encoder", default=None, metavar="SPEC", help="encoder to evaluate (default: the catalog's)")
    s.add_argument("--weights", type=Path, default=None, metavar="FILE", help="local weights of --encoder")
    s.add_argument("--encoder-option", type=parse_key_value, action="append", default=[], metavar="KEY=VALUE", help="backend option of --encoder, repeatable")
    s.add_argument("--augmentations", type=int, default=None, metavar="K",
                   help=f"views per reference (default: the catalog's K; with --encoder {DEFAULT_AUGMENTATIONS})")
    s.add_argument("--seed", type=int, default=None, help="augmentation seed (default: the catalog's; with --encoder 0)")
    s.add_argument("--max-classes", type=int, default=None, metavar="N", help="only the first N classes (quick runs)")
    s.add_argument("--max-per-class", type=int, default=None, metavar="N", help="at most N query images per class")
    s.add_argument("--json", action="store_true", help="print JSON (per-class counts; coco: per-photo and per-SKU results)")
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


COMMANDS = {
    "init": cmd_init, "add": cmd_add, "import": cmd_import, "list": cmd_list, "remove": cmd_remove,
    "info": cmd_info, "outliers": cmd_outliers, "recognize": cmd_recognize, "calibrate": cmd_calibrate, "eval": cmd_eval,
    "rebuild": cmd_rebuild, "upgrade": cmd_upgrade, "versions": cmd_versions, "rollback": cmd_rollback, "check": cmd_check,
}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``catalog`` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("huggingface_hub").propagate = False  # it prints through its own handler: not twice
    opened_before = open_connections()
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
            e = no_space_error(catalog_dir(args), str(e))
        print(f"catalog: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("catalog: interrupted", file=sys.stderr)
        return 130
    finally:
        # Release the database connections (and files) of the catalogs this command opened, now:
        # in-process callers run many commands, and a catalog lives until the next cyclic GC.
        for cat in open_connections() - opened_before:
            cat.close()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
