"""The ``catalog`` command: manage an SKU catalog and recognise products in photos.

Exit codes: 0 success; 1 a clear error (bad image, unknown SKU, missing weights, ...), printed
as one line ``catalog: error: ...`` on stderr; 2 bad command-line usage.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from retailklip.augment import DEFAULT_AUGMENTATIONS
from retailklip.encoders import DEFAULT_ENCODER_SPEC
from retailklip.errors import RetailKlipError

from .store import DEFAULT_THRESHOLD, Catalog, default_catalog_dir

logger = logging.getLogger("catalog")


def _option(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


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
    s.add_argument("--encoder-option", type=_option, action="append", default=[], metavar="KEY=VALUE",
                   help="backend option, repeatable: timm interpolation=bilinear, crop_pct=1.0; open_clip resize_mode=longest")
    s.add_argument("--segment", default=None, metavar="NAME", help="default segmenter for recognize (e.g. efficientvit-sam-l0)")
    s.add_argument("--checkpoint", default=None, metavar="FILE", help="checkpoint of the default segmenter")
    s.add_argument("--random-init", action="store_true", help=argparse.SUPPRESS)  # tests only

    s = sub.add_parser("add", help="add an SKU from one reference image; recognisable at once")
    s.add_argument("image", type=Path)
    s.add_argument("--sku", default=None, metavar="ID", help="SKU id (default: the image file name without extension)")
    s.add_argument("--name", default=None, help="display name")
    s.add_argument("--append", action="store_true", help="add another reference image to an existing SKU")

    s = sub.add_parser("import", help="bulk-add SKUs from a CSV with columns image,sku,name")
    s.add_argument("csv", type=Path)

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
    return p


def _catalog_dir(args) -> Path:
    return args.catalog if args.catalog is not None else default_catalog_dir()


def cmd_init(args) -> int:
    cat = Catalog.init(
        _catalog_dir(args), encoder=args.encoder, weights=args.weights, augmentations=args.augmentations,
        threshold=args.threshold, seed=args.seed, db_url=args.db_url, encoder_options=dict(args.encoder_option),
        random_init=args.random_init, device=args.device,
    )
    if args.segment:
        cat.set_segmenter(args.segment, args.checkpoint)
    st = cat.settings()
    print(f"initialised {cat.root}: encoder {st['encoder_key']}, K={st['augmentations']}, threshold={st['threshold']}")
    return 0


def cmd_add(args) -> int:
    cat = Catalog.open(_catalog_dir(args), db_url=args.db_url, device=args.device)
    info = cat.add(args.image, sku=args.sku, name=args.name, append=args.append)
    print(f"added {info.sku} ({info.references} reference image(s), {info.vectors} vectors)")
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
            print(f"{s.sku}\t{s.name or ''}\t{s.references} ref\t{s.vectors} vec\t{s.created:%Y-%m-%d %H:%M}")
        print(f"{len(skus)} SKU(s)", file=sys.stderr)
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

    rec = Recognizer.open(
        _catalog_dir(args), db_url=args.db_url, device=args.device, threshold=args.threshold,
        segmenter=args.segment, checkpoint=args.checkpoint,
    )
    if args.save_segments is not None and rec.segmenter is None:
        raise RetailKlipError("--save-segments needs a segmenter (--segment NAME)")
    results, failed = [], 0
    for path in args.images:
        try:
            im = load_image(path)
            if args.save_segments is not None:
                from retailklip.segment import save_segment_crops

                recs, segments = rec.recognize_segments(im)
                save_segment_crops(segments, args.save_segments, image_name=path.stem)
            else:
                recs = rec.recognize(im)
        except RetailKlipError as e:
            print(f"catalog: error: {e}", file=sys.stderr)
            failed += 1
            continue
        results.append({"image": str(path), "recognitions": [r.to_dict() for r in recs]})
        if not args.json:
            for r in recs:
                label = r.sku if r.known else f"unknown (nearest {r.nearest_sku})"
                runner = f", runner-up {r.runner_up.sku} {r.runner_up.distance:.3f}" if r.runner_up else ""
                print(f"{path}\t{label}\t{r.name or ''}\tdistance {r.distance:.3f}{runner}\tbbox {list(r.bbox)}")
    if args.json:
        print(json.dumps(results, ensure_ascii=False, indent=1))
    return 1 if failed else 0


COMMANDS = {
    "init": cmd_init, "add": cmd_add, "import": cmd_import, "list": cmd_list, "remove": cmd_remove,
    "info": cmd_info, "recognize": cmd_recognize,
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
        return 1
    except KeyboardInterrupt:
        print("catalog: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
