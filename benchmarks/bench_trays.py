#!/usr/bin/env python3
"""Tray-level evaluation (issue 13, item 6) on simulated checkout trays: the full pipeline with
the oracle as SAM's decoder, and with the annotated masks, through ``retailklip.tray_eval``
(the code behind ``catalog eval --layout coco``).

No trained SAM weights exist here, so segmentation is simulated: every photo is a synthetic
tray (:mod:`retailklip.segment.synthetic`, GroceryStore packshots on in-store backgrounds,
written as COCO instances), and the segmenter is the product's own (the bounded generator, the
default prompt strategy, retail post-processing, RGBA crops) with the mask decoder played by
:class:`~retailklip.segment.oracle.OracleDecoder` at its stated failure rates.  Recognition is
real: the ImageNet MobileNetV2 encoder (not finetuned) on a catalog of the 81 packshots, the
catalog's default threshold.  Rows:

* ``--masks ground-truth``: recognition of the annotated visible masks (recognition errors only);
* ``oracle segmenter``: segmentation + recognition (adds segmentation errors).

    python benchmarks/bench_trays.py [--n 20] [--seed 1000] [--size 1024x768]
"""

from __future__ import annotations

import argparse
import hashlib
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


class OracleSegmenter:
    """A segmenter for the synthetic trays: the product's automatic path with the oracle decoding
    (the tray is recognised by its pixels, so the recognizer's own decoded photo is used)."""

    def __init__(self, trays: list, options) -> None:
        from retailklip.segment.automatic import MaskGeneratorOptions
        from retailklip.segment.bounded import BoundedMaskGenerator, BoundedOptions
        from retailklip.segment.postprocess import PostprocessOptions

        o = options or MaskGeneratorOptions()
        self.name = "oracle"
        self.postprocess = PostprocessOptions()
        self.trays = {hashlib.sha256(np.asarray(t.image.convert("RGB")).tobytes()).hexdigest(): t for t in trays}
        self.generator = BoundedMaskGenerator(BoundedOptions(max_masks=o.max_masks), o.strategy())
        self.prompts = []

    def segment_image(self, image: Image.Image) -> list:
        from retailklip.segment.oracle import OracleDecoder
        from retailklip.segment.segmenter import segments_from_records

        tray = self.trays[hashlib.sha256(np.asarray(image.convert("RGB")).tobytes()).hexdigest()]
        records = self.generator.generate(OracleDecoder(tray))
        self.prompts.append(self.generator.prompts_used)
        return segments_from_records(image, records, self.postprocess)

    def segment(self, image) -> list:
        from retailklip.images import load_image

        return self.segment_image(load_image(image))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--seed", type=int, default=1000, help="first tray seed (the strategy was chosen on seeds 0-49)")
    ap.add_argument("--size", default="1024x768")
    ap.add_argument("--half-unknown", action="store_true",
                    help="the catalog holds every other class only: the rest must come out unknown")
    args = ap.parse_args()
    W, H = (int(v) for v in args.size.lower().split("x"))

    from catalog import Catalog
    from retailklip import Recognizer
    from retailklip.coco import read_coco
    from retailklip.datasets import read_grocery_store
    from retailklip.segment.synthetic import TrayMaker, write_trays
    from retailklip.tray_eval import evaluate_trays

    store = read_grocery_store(SHARED / "data" / "grocery-store")
    maker = TrayMaker(store)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ann = write_trays(tmp / "trays", args.n, seed=args.seed, size=(W, H), maker=maker)
        trays = [maker.make(args.seed + i, (W, H)) for i in range(args.n)]
        csv = tmp / "skus.csv"
        known = store.classes[::2] if args.half_unknown else store.classes
        csv.write_text("image,sku,name\n" + "".join(f"{c.iconic},{c.name},{c.name}\n" for c in known))
        cat = Catalog.init(tmp / "cat", encoder="timm:mobilenetv2_100",
                           weights=SHARED / "models" / "mobilenetv2_100.imagenet.safetensors",
                           encoder_options={"interpolation": "bilinear"})
        cat.import_csv(csv, progress=False)
        dataset = read_coco(ann)
        gt = evaluate_trays(dataset, Recognizer(cat), masks="ground-truth")
        seg = OracleSegmenter(trays, None)
        pred = evaluate_trays(dataset, Recognizer(cat, segmenter=seg), masks="predicted")
    print(f"{args.n} synthetic trays {W}x{H}, seeds {args.seed}..{args.seed + args.n - 1}; "
          f"MobileNetV2 (ImageNet) catalog of {len(known)} packshots, threshold {cat.threshold}")
    print("\n== recognition of the annotated masks (--masks ground-truth)")
    print(gt.table())
    print(f"\n== oracle segmenter (default strategy, mean {np.mean(seg.prompts):.1f} prompts / tray) + recognition")
    print(pred.table())


if __name__ == "__main__":
    main()
