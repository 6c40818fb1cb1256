#!/usr/bin/env python3
"""Checkout-speed segmentation (issue 13): time and peak RSS of one photo through the segmenter
and through the whole ``Recognizer.recognize``, per photo size and generator mode / prompt
strategy, as ratios against in-run baselines.

Rows, for a 1920x1080 and a 4000x3000 (12 MP) photo (a real GroceryStore photo resized):

* ``segment``: ``SamSegmenter.segment`` with EfficientViT-SAM-L0 (random weights) for
  ``sam`` mode (segment_anything's ``SamAutomaticMaskGenerator``, the baseline; skipped for
  12 MP, where it needs > 6 GiB), ``exact`` and ``fast`` with SAM's 16 x 16 and 32 x 32 grids,
  and the default (fast, the default prompt strategy, 128 at most, the factored mask decoder)
  and the same with the image-shared torch decoder (``runtime="torch"``) and in ONNX Runtime
  (``runtime="onnxruntime"``).
  (the 32 x 32 row at 1080p only.)
* ``recognize``: ``Recognizer.recognize`` end to end (segment + embed + match) with the
  default segmenter options on a catalog of the 81 GroceryStore packshots (MobileNetV2).

Every measurement runs in a fresh subprocess (peak RSS = the child's ``VmHWM``, so one
configuration's memory cannot hide another's); time is the median of ``--repeats`` calls after
one warm-up call ("first s": that first call, which also builds the ONNX Runtime decoder
graph or loads it from its cache, in the onnxruntime row).  Random weights: the thresholds (0.88 / 0.95) reject almost every mask, which
is the worst case for the prompt budget (nothing found: every round runs) — the time a trained
model needs is at most this.

    python benchmarks/bench_checkout.py [--repeats 2] [--threads 2] [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
PHOTO = SHARED / "data" / "grocery-store" / "dataset" / "train" / "Packages" / "Milk" / "Arla-Standard-Milk" / "Arla-Standard-Milk_001.jpg"


def _vmhwm_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(cfg: dict) -> dict:
    import torch
    from PIL import Image

    torch.set_num_threads(cfg["threads"])
    torch.set_flush_denormal(True)
    torch.manual_seed(0)
    from retailklip.segment import MaskGeneratorOptions, load_segmenter

    photo = Image.open(cfg["photo"]).convert("RGB").resize(tuple(cfg["size"]))
    opts = MaskGeneratorOptions(**cfg["options"])
    seg = load_segmenter("efficientvit-sam-l0", random_init=True, generator_options=opts)
    if cfg["task"] == "segment":
        run = lambda: seg.segment(photo)
    else:
        from catalog import Catalog
        from retailklip import Recognizer

        rec = Recognizer(Catalog.open(cfg["catalog"]), segmenter=seg)
        rec.recognize(photo.resize((64, 64)))  # load the index and the encoder
        run = lambda: rec.recognize(photo)
    t = time.perf_counter()
    run()  # the first photo: builds (or loads from its cache) the ONNX Runtime decoder graph
    first = time.perf_counter() - t
    times = []
    for _ in range(cfg["repeats"]):
        t = time.perf_counter()
        out = run()
        times.append(time.perf_counter() - t)
    prompts = getattr(seg.generator, "prompts_used", None)
    return {"median_s": statistics.median(times), "min_s": min(times), "first_s": first, "peak_mib": _vmhwm_mib(),
            "prompts": prompts, "items": len(out)}


def _run(cfg: dict) -> dict:
    r = subprocess.run([sys.executable, __file__, "--child", json.dumps(cfg)], capture_output=True, text=True,
                       cwd=REPO, check=False)
    if r.returncode != 0:
        return {"error": (r.stderr.strip().splitlines() or ["?"])[-1][:120]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def _catalog(tmp: Path) -> Path:
    from catalog import Catalog
    from retailklip.datasets import read_grocery_store

    store = read_grocery_store(SHARED / "data" / "grocery-store")
    csv = tmp / "skus.csv"
    csv.write_text("image,sku,name\n" + "".join(f"{c.iconic},{c.name},{c.name}\n" for c in store.classes))
    cat = Catalog.init(tmp / "cat", encoder="timm:mobilenetv2_100",
                       weights=SHARED / "models" / "mobilenetv2_100.imagenet.safetensors",
                       encoder_options={"interpolation": "bilinear"})
    cat.import_csv(csv, progress=False)
    return cat.root


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="1080p only, no 32x32 rows")
    ap.add_argument("--only", default=None, metavar="TEXT", help="only the segment configurations whose label contains TEXT")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    configs = [
        ("sam, grid 16x16 (baseline)", {"mode": "sam", "points_per_side": 16}),
        ("exact, grid 16x16", {"mode": "exact", "prompts": "grid", "points_per_side": 16}),
        ("fast, grid 16x16", {"mode": "fast", "prompts": "grid", "points_per_side": 16}),
        ("fast, grid 32x32", {"mode": "fast", "prompts": "grid", "points_per_side": 32}),
        ("fast, default prompts <= 128, torch", {"runtime": "torch"}),
        ("fast, default prompts <= 128, ORT", {"runtime": "onnxruntime"}),
        ("default: fast, prompts <= 128, factored", {}),
    ]
    if args.quick:
        configs = [c for c in configs if "32x32" not in c[0]]
    if args.only:
        configs = [c for c in configs if args.only in c[0]]
    sizes = [(1920, 1080)] + ([] if args.quick else [(4000, 3000)])
    with tempfile.TemporaryDirectory() as tmp:
        cat = _catalog(Path(tmp))
        rows = []
        for size in sizes:
            base = None
            for label, options in configs:
                if size == (4000, 3000) and options.get("points_per_side") == 32:
                    continue  # 1024 prompts: the 1080p row shows the cost; 12 MP adds only upsampling
                if size == (4000, 3000) and options.get("mode") == "sam":
                    rows.append((f"{size[0]}x{size[1]}", "segment", label, None, "skipped: > 6 GiB"))
                    continue
                cfg = {"task": "segment", "photo": str(PHOTO), "size": size, "options": options, "threads": args.threads,
                           "repeats": args.repeats, "catalog": str(cat)}
                res = _run(cfg)
                base = base or (res if "error" not in res else None)
                rows.append((f"{size[0]}x{size[1]}", "segment", label, res, base))
            res = _run({"task": "recognize", "photo": str(PHOTO), "size": size, "options": {}, "threads": args.threads,
                            "repeats": args.repeats, "catalog": str(cat)})
            rows.append((f"{size[0]}x{size[1]}", "recognize", "default, end to end", res, base))
    print(f"{'photo':10} {'task':10} {'configuration':40} {'median s':>9} {'min s':>7} {'x base':>7} "
          f"{'peak MiB':>9} {'x base':>7} {'prompts':>8} {'first s':>8}")
    for photo, task, label, res, base in rows:
        if res is None:
            print(f"{photo:10} {task:10} {label:40} {base}")
            continue
        if "error" in res:
            print(f"{photo:10} {task:10} {label:40} error: {res['error']}")
            continue
        bt = f"{res['median_s'] / base['median_s']:.2f}" if isinstance(base, dict) else "-"
        bm = f"{res['peak_mib'] / base['peak_mib']:.2f}" if isinstance(base, dict) else "-"
        print(f"{photo:10} {task:10} {label:40} {res['median_s']:9.2f} {res['min_s']:7.2f} {bt:>7} "
              f"{res['peak_mib']:9.0f} {bm:>7} {res['prompts']!s:>8} {res['first_s']:8.2f}")
    print("base = the first row of the photo size (sam mode for 1080p; exact 16x16 for 12 MP, where sam mode "
          "cannot run); random weights; threads", args.threads)


if __name__ == "__main__":
    main()
