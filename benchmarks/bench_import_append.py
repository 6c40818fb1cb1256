"""In-store reference images for every SKU, appended one ``catalog add --append`` at a time or
in one ``catalog import --append``: how many the store-photo hub check refuses, and the wall time
of each way.

    python3 benchmarks/bench_import_append.py [--every 1] [--center-every 6] [--hubness-k 30]

Catalog: the iconic packshot of every ``--every``-th GroceryStore class (default all 81) with the
ImageNet MobileNetV2 of ``../shared/models`` (bilinear), every ``--center-every``-th train photo
kept as its unlabeled store photos (default 440, hubness reduction CSLS k = 30, as the main job's
catalog).  Each SKU then gets R in {1, 2} of its other train photos (not stored ones; evenly spaced
in the split's order) as further reference images, in a copy of the catalog each way:

* ``add --append``, SKU after SKU, each checked against the catalog the previous ones left
  (``Catalog.add(append=True)``; a hub is refused: :class:`catalog.errors.HubReferenceError`);
* ``import --append`` (``Catalog.import_csv(append=True, force=True)``): all rows counted
  together against the catalog the import makes.

Printed: refused / hubs, the largest share an SKU takes, and wall seconds (embedding included),
with the ratio of the import's time to the one-at-a-time adds' (measured in the same run).  Train
photos only (val and test are never read).  The appended photos are not kept apart from the stored
photos' capture sessions, so both ways count some near-copies; the comparison is between the two
ways on the same photos.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from catalog import Catalog  # noqa: E402
from catalog.errors import HubReferenceError  # noqa: E402
from retailklip.datasets import read_grocery_store  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=SHARED / "data" / "grocery-store")
    p.add_argument("--weights", type=Path, default=None, help="MobileNetV2 safetensors (default: the one in ../shared/models)")
    p.add_argument("--every", type=int, default=1, help="every n-th class is an SKU")
    p.add_argument("--center-every", type=int, default=6, help="every n-th train photo is a stored store photo")
    p.add_argument("--hubness-k", type=int, default=30)
    args = p.parse_args(argv)
    weights = args.weights or next((SHARED / "models").rglob("*.safetensors"))
    store = read_grocery_store(args.data)
    train = store.photos("train")
    classes = sorted({ph.label for ph in train})[:: args.every]
    unlabeled = [ph.path for ph in train[:: args.center_every]]
    iconic = {c.name: c.iconic for c in store.classes}
    stored = set(unlabeled)
    others = {c: [ph.path for ph in train if ph.label == c and ph.path not in stored] for c in classes}
    tmp = Path(tempfile.mkdtemp(prefix="bench-import-append-"))
    try:
        cat = Catalog.init(tmp / "base", encoder="timm:mobilenetv2_100", weights=weights,
                           encoder_options={"interpolation": "bilinear"}, center_photos=unlabeled, hubness_k=args.hubness_k)
        (tmp / "packshots.csv").write_text("image,sku,name\n" + "".join(f"{iconic[c]},{c},\n" for c in classes))
        cat.import_csv(tmp / "packshots.csv", progress=False)
        cat.close()
        print(f"{len(classes)} SKUs, {len(unlabeled)} stored store photos, CSLS k = {args.hubness_k}\n")
        print("| photos per SKU | way | refused / hubs | largest take (limit) | wall s | import / adds |\n|---|---|---|---|---|---|")
        for r in (1, 2):
            rows = [(others[c][len(others[c]) * (i + 1) // (r + 1)], c) for c in classes for i in range(r)]
            shutil.copytree(tmp / "base", tmp / f"adds{r}")
            one = Catalog.open(tmp / f"adds{r}")
            refused, largest, limit = 0, 0, 0.0
            t0 = time.perf_counter()
            for img, sku in rows:
                try:
                    added = one.add(img, sku=sku, append=True)
                    largest, limit = max(largest, added.store_photos.taken), added.store_photos.limit
                except HubReferenceError:
                    refused += 1
            t_adds = time.perf_counter() - t0
            one.close()
            print(f"| {r} | add --append, one at a time | {refused} / {len(rows)} refused | {largest} of the appended ones "
                  f"({limit:.1f}) | {t_adds:.1f} | |")
            shutil.copytree(tmp / "base", tmp / f"import{r}")
            together = Catalog.open(tmp / f"import{r}")
            (tmp / f"rows{r}.csv").write_text("image,sku,name\n" + "".join(f"{img},{sku},\n" for img, sku in rows))
            t0 = time.perf_counter()
            report = together.import_csv(tmp / f"rows{r}.csv", append=True, force=True, progress=False)
            t_import = time.perf_counter() - t0
            together.close()
            hubs = sum(x.store_photos.hub for x in report)
            top = max(x.store_photos.taken for x in report)
            print(f"| {r} | import --append | {hubs} / {len(report)} SKUs hubs | {top} ({report[0].store_photos.limit:.1f}) | "
                  f"{t_import:.1f} | {t_import / t_adds:.2f} |", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
