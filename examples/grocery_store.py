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


def write_import_csv(dataset: Path, out_csv: Path) -> None:
    """classes.csv -> image,sku,name with image paths relative to ``out_csv``."""
    with open(dataset / "classes.csv", newline="") as f, open(out_csv, "w", newline="") as g:
        w = csv.writer(g)
        w.writerow(["image", "sku", "name"])
        for row in list(csv.reader(f))[1:]:
            name, iconic = row[0], row[4].lstrip("/")
            w.writerow([str((dataset / iconic).resolve()), name, name.replace("-", " ")])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=Path("../shared/data/grocery-store"))
    p.add_argument("--out", type=Path, default=None, help="catalog directory (default: a temporary one)")
    p.add_argument("--encoder", default="timm:mobilenetv2_100")
    p.add_argument("--weights", type=Path, default=Path("../shared/models/mobilenetv2_100.imagenet.safetensors"))
    p.add_argument("--augmentations", type=int, default=None)
    p.add_argument("--split", default="val", choices=["val", "train"])
    p.add_argument("--center-stride", type=int, default=6,
                   help="centre features on every N-th unlabeled train photo (0: no centering)")
    args = p.parse_args(argv)
    dataset = args.data / "dataset"
    out = args.out or Path(tempfile.mkdtemp(prefix="grocery-catalog-"))
    if out.exists() and any(out.iterdir()):
        shutil.rmtree(out)
    cli = [sys.executable, "-m", "catalog", "--catalog", str(out)]
    init = cli + ["init", "--encoder", args.encoder, "--weights", str(args.weights), "--encoder-option", "interpolation=bilinear"]
    if args.augmentations:
        init += ["--augmentations", str(args.augmentations)]
    if args.center_stride:
        train = [ln.split(",")[0].strip() for ln in (dataset / "train.txt").read_text().splitlines()]
        center_list = out.parent / (out.name + "-center.txt")
        center_list.write_text("".join(f"{(dataset / t).resolve()}\n" for t in train[:: args.center_stride]))
        init += ["--center-photos", str(center_list)]
    subprocess.run(init, check=True)
    import_csv = out.parent / (out.name + "-import.csv")
    write_import_csv(dataset, import_csv)
    subprocess.run(cli + ["-v", "import", str(import_csv)], check=True)
    photos = []
    for line in (dataset / f"{args.split}.txt").read_text().splitlines():
        path, fine, _ = (x.strip() for x in line.split(","))
        photos.append((dataset / path, int(fine)))
    names = {int(r[1]): r[0] for r in list(csv.reader(open(dataset / "classes.csv")))[1:]}
    res = subprocess.run(cli + ["recognize", "--json"] + [str(p) for p, _ in photos],
                         check=True, capture_output=True, text=True)
    results = json.loads(res.stdout)
    correct = [r["recognitions"][0]["nearest_sku"] == names[c] for r, (_, c) in zip(results, photos)]
    per_class: dict[int, list[bool]] = {}
    for ok, (_, c) in zip(correct, photos):
        per_class.setdefault(c, []).append(ok)
    top1 = sum(correct) / len(correct)
    avg = sum(sum(v) / len(v) for v in per_class.values()) / len(per_class)
    print(f"catalog: {out} ({len(names)} SKUs, encoder {args.encoder})")
    print(f"{args.split} photos: {len(photos)}  top-1: {top1:.4f}  per-class average: {avg:.4f}  (chance {1 / len(names):.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
