"""GroceryStore split for zero-shot finetuning: ``python -m finetune.grocery --data DIR --out DIR``.

The GroceryStore dataset (Klasson et al., WACV 2019) has 81 fine classes in 42 coarse classes
(e.g. the apples Granny-Smith and Pink-Lady in coarse class Apple), in-store photos
(``train.txt`` / ``val.txt``: ``path, fine_id, coarse_id``) and one iconic packshot per fine
class (``classes.csv``), read by :func:`retailklip.datasets.read_grocery_store`.  The split is **by coarse class**: coarse classes with an odd id
(default; ``--held-out-parity``) train, the others are held out, so no fine class of a trained
coarse class is ever evaluated (no Granny-Smith in training when Pink-Lady is evaluated).

Written to ``--out``:

* ``train.csv`` (``image,label,role``): the in-store ``train.txt`` photos of the training classes
  (role ``query``; ``--train-iconic`` adds their packshots, role ``reference``, which the
  finetune's ``--reference-copies N`` oversamples);
* ``eval.csv`` (``image,label,role``): for each held-out class its iconic image as
  ``reference`` (packshot -> in-store, as a store's catalog would be built) and its in-store
  ``val.txt`` photos as ``query`` (``--train-queries N`` adds up to N ``train.txt`` photos per
  class; they are never trained on either);
* ``split.json``: the coarse and fine classes on each side, and the finetune command.

Labels are the fine class names.  Image paths are relative to the CSVs.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import sys
from collections import defaultdict
from pathlib import Path

from retailklip.datasets import DatasetError, read_grocery_store

from .errors import FinetuneError

MOBILENET_WEIGHTS = "../shared/models/mobilenetv2_100.imagenet.safetensors"


def write_split(root: str | os.PathLike, out: str | os.PathLike, *, held_out_parity: int = 0, train_queries: int = 10,
                train_iconic: bool = False) -> dict:
    """Write ``train.csv``, ``eval.csv`` and ``split.json`` (see module docstring).

    Args:
        root: GroceryStore checkout.
        out: output directory (created).
        held_out_parity: coarse ids with ``id % 2 == held_out_parity`` are held out.
        train_queries: also use up to this many ``train.txt`` photos per held-out class as queries.
        train_iconic: add the training classes' iconic images to ``train.csv``.

    Returns:
        The split description written to ``split.json``.

    Raises:
        FinetuneError: bad dataset or arguments.
    """
    if held_out_parity not in (0, 1) or train_queries < 0:
        raise FinetuneError("--held-out-parity must be 0 or 1 and --train-queries >= 0")
    try:
        store = read_grocery_store(root)
        lists = {split: store.photos(split) for split in ("train", "val")}
    except DatasetError as e:
        raise FinetuneError(str(e)) from None
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    held = {c.name for c in store.classes if c.coarse_id % 2 == held_out_parity}

    def rel(p: Path) -> str:
        return os.path.relpath(p, out)

    with open(out / "train.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "label", "role"])
        for photo in lists["train"]:
            if photo.label not in held:
                w.writerow([rel(photo.path), photo.label, "query"])
        if train_iconic:
            for c in store.classes:
                if c.name not in held:
                    w.writerow([rel(c.iconic), c.name, "reference"])
    queries: dict[str, list[Path]] = defaultdict(list)
    for photo in lists["val"]:
        if photo.label in held:
            queries[photo.label].append(photo.path)
    if train_queries:
        extra: dict[str, int] = defaultdict(int)
        for photo in lists["train"]:
            if photo.label in held and extra[photo.label] < train_queries:
                queries[photo.label].append(photo.path)
                extra[photo.label] += 1
    with open(out / "eval.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "label", "role"])
        for c in sorted((c for c in store.classes if c.name in held), key=lambda c: c.fine_id):
            w.writerow([rel(c.iconic), c.name, "reference"])
            for path in queries[c.name]:
                w.writerow([rel(path), c.name, "query"])
    side = lambda pred: {
        "coarse": sorted({c.coarse_name for c in store.classes if pred(c.name)}),
        "fine": sorted(c.name for c in store.classes if pred(c.name)),
    }
    desc = {
        "dataset": str(store.root.resolve()),
        "rule": f"coarse class id % 2 == {held_out_parity} held out",
        "train": {**side(lambda n: n not in held), "images": sum(1 for p in lists["train"] if p.label not in held)},
        "held_out": {**side(lambda n: n in held), "queries": sum(len(v) for v in queries.values()),
                     "classes_with_queries": sum(1 for v in queries.values() if v)},
        "train_queries_per_class": train_queries,
        "train_iconic": train_iconic,
    }
    trained_coarse, held_coarse = set(desc["train"]["coarse"]), set(desc["held_out"]["coarse"])
    assert not trained_coarse & held_coarse, "a coarse class on both sides"
    (out / "split.json").write_text(json.dumps(desc, indent=1) + "\n")
    return desc


def documented_command(out: str | os.PathLike, run_dir: str | os.PathLike, weights: str = MOBILENET_WEIGHTS) -> str:
    """The CPU finetuning command of docs/finetune.md for these CSVs (a few minutes on 2 cores)."""
    out = Path(out)
    args = ["python", "-m", "finetune", "--data", str(out / "train.csv"), "--eval-data", str(out / "eval.csv"),
            "--encoder", "timm:mobilenetv2_100", "--weights", weights, "--encoder-option", "interpolation=bilinear",
            "--epochs", "3", "--depth", "12", "--batch-size", "16", "--freeze-blocks", "3", "--eval-every", "3",
            "--threads", "1", "--out", str(run_dir)]
    return shlex.join(args)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m finetune.grocery", description=__doc__.splitlines()[0])
    p.add_argument("--data", default="../shared/data/grocery-store", help="GroceryStore checkout")
    p.add_argument("--out", required=True, help="directory for train.csv, eval.csv, split.json")
    p.add_argument("--held-out-parity", type=int, default=0, choices=(0, 1), help="hold out coarse ids with id %% 2 == this")
    p.add_argument("--train-queries", type=int, default=10, metavar="N",
                   help="also query with up to N train photos per held-out class (default: 10; 0 = val photos only)")
    p.add_argument("--train-iconic", action="store_true", help="add the training classes' iconic images to train.csv")
    args = p.parse_args(argv)
    try:
        desc = write_split(args.data, args.out, held_out_parity=args.held_out_parity, train_queries=args.train_queries,
                           train_iconic=args.train_iconic)
    except FinetuneError as e:
        print(f"finetune.grocery: error: {e}", file=sys.stderr)
        return 1
    t, h = desc["train"], desc["held_out"]
    print(f"train: {len(t['fine'])} classes in {len(t['coarse'])} coarse classes, {t['images']} photos -> {args.out}/train.csv")
    print(f"held out: {len(h['fine'])} classes in {len(h['coarse'])} coarse classes, {h['queries']} query photos "
          f"({h['classes_with_queries']} classes with queries) -> {args.out}/eval.csv")
    print("finetune (CPU, minutes):")
    print("  " + documented_command(args.out, Path(args.out) / "run"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
