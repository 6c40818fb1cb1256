"""End-to-end run on GroceryStoreDataset: build a catalog from the 81 iconic packshots (one
reference image per SKU), then recognise the in-store val photos and report top-1 accuracy.

    python3 examples/grocery_store.py --data ../shared/data/grocery-store --out /tmp/grocery-catalog

It uses the ``catalog`` CLI exactly as a store would: ``catalog init`` (features centred on every
6th *train* photo, used unlabeled), ``catalog import`` (a CSV ``image,sku,name`` written from the
dataset's classes.csv) and ``catalog recognize --json``.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from retailklip.datasets import GroceryStore, read_grocery_store
from retailklip.protocol import bootstrap_ci

#: The main job's encoder options (``catalog init --encoder-option``): the last feature stage of
#: MobileNetV2, average-pooled at three input sizes, chosen by nested cross-validation over the
#: train split (docs/evaluation.md, "Multi-scale, intermediate-stage embedding").
ENCODER_OPTIONS = ("interpolation=bilinear", "crop_pct=1.0", "scales=[224,288,384]", "feature_stage=-1")


def write_import_csv(store: GroceryStore, out_csv: Path) -> None:
    """classes.csv -> image,sku,name with absolute image paths."""
    with open(out_csv, "w", newline="") as g:
        w = csv.writer(g)
        w.writerow(["image", "sku", "name"])
        for c in store.classes:
            w.writerow([str(c.iconic.resolve()), c.name, c.name.replace("-", " ")])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=Path("../shared/data/grocery-store"))
    p.add_argument("--out", type=Path, default=None, help="catalog directory (default: a temporary one)")
    p.add_argument("--encoder", default="timm:mobilenetv2_100")
    p.add_argument("--weights", type=Path, default=Path("../shared/models/mobilenetv2_100.imagenet.safetensors"))
    p.add_argument("--encoder-option", action="append", default=None, metavar="KEY=VALUE",
                   help=f"encoder option for catalog init, repeatable; replaces the defaults {' '.join(ENCODER_OPTIONS)} "
                        "(--encoder-option interpolation=bilinear alone: the single-scale encoder used before)")
    p.add_argument("--augmentations", type=int, default=None)
    p.add_argument("--split", default="val", choices=["val", "train"])
    p.add_argument("--center-stride", type=int, default=6,
                   help="centre features on every N-th unlabeled train photo (0: no centering)")
    args = p.parse_args(argv)
    store = read_grocery_store(args.data)
    out = args.out or Path(tempfile.mkdtemp(prefix="grocery-catalog-"))
    if out.exists() and any(out.iterdir()):
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)  # the centre list and import CSV go beside it
    cli = [sys.executable, "-m", "catalog", "--catalog", str(out)]
    options = args.encoder_option or ENCODER_OPTIONS
    init = cli + ["init", "--encoder", args.encoder, "--weights", str(args.weights)]
    for option in options:
        init += ["--encoder-option", option]
    if args.augmentations:
        init += ["--augmentations", str(args.augmentations)]
    if args.center_stride:
        train = [p.path for p in store.photos("train")]
        center_list = out.parent / (out.name + "-center.txt")
        center_list.write_text("".join(f"{t.resolve()}\n" for t in train[:: args.center_stride]))
        init += ["--center-photos", str(center_list)]
    subprocess.run(init, check=True)
    import_csv = out.parent / (out.name + "-import.csv")
    write_import_csv(store, import_csv)
    subprocess.run(cli + ["-v", "import", str(import_csv)], check=True)
    photos = store.photos(args.split)
    res = subprocess.run(cli + ["recognize", "--json"] + [str(p.path) for p in photos],
                         check=True, capture_output=True, text=True)
    results = json.loads(res.stdout)
    correct = [r["recognitions"][0]["nearest_sku"] == p.label for r, p in zip(results, photos)]
    per_class: dict[str, list[bool]] = {}
    for ok, p in zip(correct, photos):
        per_class.setdefault(p.label, []).append(ok)
    top1 = bootstrap_ci(correct)  # 95 % percentile bootstrap over photos
    avg = bootstrap_ci([sum(v) / len(v) for v in per_class.values()])  # ... over classes
    print(f"catalog: {out} ({len(store.classes)} SKUs, encoder {args.encoder} {' '.join(options)})")
    print(f"{args.split} photos: {len(photos)}  top-1: {top1.mean:.4f} [{top1.low:.4f}, {top1.high:.4f}]  "
          f"per-class average: {avg.mean:.4f} [{avg.low:.4f}, {avg.high:.4f}]  (chance {1 / len(store.classes):.4f}; 95 % bootstrap intervals)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
