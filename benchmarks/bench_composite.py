"""Compositing transparency before the encoder (issue 3 item 5): which colour should the pixels
outside a segment's mask become before the encoder sees the crop?  A quality measurement, with
each choice as a ratio to the current default (grey 128) measured in the same run.

    flock /tmp/retailklip-bench.lock python3 benchmarks/bench_composite.py [--shared ../shared] [--threads 2]

No trained SAM weights exist here, so the segment masks are built without SAM, label-free, from
the real GroceryStore images (Klasson et al., WACV 2019):

* references: the 81 iconic packshots (``classes.csv`` column 4). They are photographed on pure
  white (255, 255, 255), so ``packshot_mask`` = not-white (min channel < 250 or chroma > 6)
  pixels, after removing the white that is connected to the image border (white product parts
  inside the outline stay), 3x3 opening, hole filling, components >= 0.5 % of the image;
* queries: the 296 in-store val photos (``val.txt``), two mask kinds:

  - ``ellipse``: the ellipse inscribed in the photo (smooth, product-agnostic; the crop's box is
    the whole photo, ~21 % of it transparent, in the corners);
  - ``region``: the colour region at the photo's centre, a SAM-like irregular segment whose
    boundary follows the image: k-means (k = 4, seeded) on CIE-Lab colours (lightness weighted
    0.5) of the photo shrunk to 96 px and blurred (sigma 1), the cluster most frequent in the
    central third, 3x3 closing + opening, its connected parts touching the central third, holes
    filled, upsampled bilinearly to the photo (threshold 0.5). It selects e.g. the apples of a
    pile (the gaps between them transparent), a carton's dominant colour, sometimes the hand
    holding a carton: a plausible mix of the wholes and parts SAM returns.

Each mask becomes an RGBA crop with ``retailklip.segment.parsing.crop_segment`` (the segmenter's
own function: tight box, alpha 0 outside the mask, RGB unchanged), then is composited:

* ``grey 128`` (baseline, the library default), ``black``, ``white``, ``ImageNet mean``
  (124, 116, 104): flat colours through ``retailklip.images.to_rgb``;
* ``segment mean``: flat, the mean colour of the crop's own mask pixels;
* ``noise``: uniform random RGB per pixel (seeded per image);
* ``no alpha``: the plain box crop (alpha ignored), a reference point: it keeps the real
  background a segment would hide.

Embeddings: the real ImageNet MobileNetV2 (``timm:mobilenetv2_100``, ``interpolation=bilinear``),
``Encoder.prepare`` + ``Encoder.features`` (the library path), then L2 normalisation either of the
raw features or after subtracting the catalog's feature centre (the mean feature of every 6th
*train* photo, whole, as ``tests/test_grocery_store.py`` and ``examples/grocery_store.py`` build
their catalogs). 1-NN over ``faiss.IndexFlatIP`` with one reference per SKU (K = 1, the default).
Two reference sides:

* ``both``: references are segmented packshots composited the same way as the queries;
* ``mixed``: references are the whole packshots (what ``catalog add`` stores), queries composited.

Reported per choice: top-1 and per-class accuracy, ratio to grey 128, paired wins/losses against
grey 128 (queries right only with this choice / only with grey) with McNemar's exact p, and the
mean cosine distance of the correct matches.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import faiss
import numpy as np
import torch
from PIL import Image, ImageCms, ImageFilter
from scipy import ndimage as ndi
from scipy.cluster.vq import kmeans2
from scipy.stats import binomtest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, ahead of any installed copy

from finetune.backgrounds import packshot_mask
from retailklip import create_encoder
from retailklip.datasets import read_grocery_store
from retailklip.images import load_image, to_rgb
from retailklip.segment.parsing import crop_segment

IMAGENET_MEAN = (124, 116, 104)  # (0.485, 0.456, 0.406) * 255, rounded
CENTER_STRIDE = 6


# ------------------------------------------------------------------------------------ masks
def ellipse_mask(size: tuple[int, int]) -> np.ndarray:
    """The ellipse inscribed in a (W, H) image: bool (H, W)."""
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    return ((x + 0.5 - w / 2) / (w / 2)) ** 2 + ((y + 0.5 - h / 2) / (h / 2)) ** 2 <= 1.0


_SRGB_TO_LAB = ImageCms.buildTransformFromOpenProfiles(
    ImageCms.createProfile("sRGB"), ImageCms.createProfile("LAB"), "RGB", "LAB"
)


def region_mask(rgb: Image.Image, k: int = 4, side: int = 96, seed: int = 0) -> np.ndarray:
    """Label-free colour region at the centre of a photo (see the module docstring): bool (H, W)."""
    big_w, big_h = rgb.size
    s = side / max(big_w, big_h)
    w, h = max(1, round(big_w * s)), max(1, round(big_h * s))
    small = rgb.convert("RGB").resize((w, h), Image.BILINEAR).filter(ImageFilter.GaussianBlur(1))
    lab = np.asarray(ImageCms.applyTransform(small, _SRGB_TO_LAB)).astype(np.float64).reshape(-1, 3)
    lab[:, 0] *= 0.5  # shading changes lightness across one product: weigh colour more
    _, labels = kmeans2(lab, k, minit="++", seed=np.random.default_rng(seed), iter=30)
    labels = labels.reshape(h, w)
    cy0, cy1, cx0, cx1 = h // 3, h - h // 3, w // 3, w - w // 3
    target = np.bincount(labels[cy0:cy1, cx0:cx1].ravel(), minlength=k).argmax()
    m = ndi.binary_closing(labels == target, structure=np.ones((3, 3)))
    m = ndi.binary_opening(m, structure=np.ones((3, 3)))
    comp, _ = ndi.label(m)
    central = np.unique(comp[cy0:cy1, cx0:cx1])
    m = ndi.binary_fill_holes(np.isin(comp, central[central > 0]))
    if not m.any():  # opening removed everything: keep the raw cluster
        m = labels == target
    up = Image.fromarray(m.astype(np.uint8) * 255).resize((big_w, big_h), Image.BILINEAR)
    return np.asarray(up) >= 128


# ------------------------------------------------------------------------------ compositing
def flat(colour: tuple[int, int, int]) -> Callable[[Image.Image, int], Image.Image]:
    return lambda crop, _seed: to_rgb(crop, colour)


def segment_mean(crop: Image.Image, _seed: int) -> Image.Image:
    a = np.asarray(crop)
    colour = a[..., :3][a[..., 3] > 0].mean(0)
    return to_rgb(crop, tuple(int(c) for c in np.rint(colour)))


def noise(crop: Image.Image, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    canvas = Image.fromarray(rng.integers(0, 256, (crop.height, crop.width, 3), dtype=np.uint8), "RGB")
    canvas.paste(crop, mask=crop.getchannel("A"))
    return canvas


def no_alpha(crop: Image.Image, _seed: int) -> Image.Image:
    return crop.convert("RGB")  # crop_segment keeps the RGB of the whole box


CHOICES: dict[str, Callable[[Image.Image, int], Image.Image]] = {
    "grey 128 (baseline)": flat((128, 128, 128)),
    "black": flat((0, 0, 0)),
    "white": flat((255, 255, 255)),
    "ImageNet mean (124,116,104)": flat(IMAGENET_MEAN),
    "segment mean": segment_mean,
    "noise": noise,
    "no alpha (box crop)": no_alpha,
}
BASELINE = "grey 128 (baseline)"


# ------------------------------------------------------------------------------- evaluation
def features(enc, images: list[Image.Image], batch: int = 64) -> np.ndarray:
    out = []
    for s in range(0, len(images), batch):
        out.append(enc.features(torch.stack([enc.prepare(im) for im in images[s : s + batch]])).numpy())
    return np.concatenate(out).astype(np.float32)


def normalise(f: np.ndarray, center: np.ndarray | None) -> np.ndarray:
    if center is not None:
        f = f - center
    return f / np.linalg.norm(f, axis=1, keepdims=True)


def nearest(refs: np.ndarray, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    index = faiss.IndexFlatIP(refs.shape[1])
    index.add(refs)
    sims, ids = index.search(queries, 1)
    return ids[:, 0], 1.0 - sims[:, 0]


def scores(pred: np.ndarray, dist: np.ndarray, truth: np.ndarray) -> dict:
    ok = pred == truth
    per_class = float(np.mean([ok[truth == c].mean() for c in np.unique(truth)]))
    return {"ok": ok, "top1": float(ok.mean()), "per_class": per_class, "dist": float(dist[ok].mean()) if ok.any() else float("nan")}


def ratio(a: float, b: float) -> str:
    return f"{a / b:.3f}" if b else "-"


def paired(ok: np.ndarray, base: np.ndarray) -> tuple[int, int, float]:
    wins, losses = int((ok & ~base).sum()), int((~ok & base).sum())
    p = binomtest(min(wins, losses), wins + losses, 0.5).pvalue if wins + losses else 1.0
    return wins, losses, float(p)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[2] / "shared")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--limit", type=int, default=None, help="first N val / centre photos only (smoke test)")
    p.add_argument("--save-examples", type=Path, default=None, help="write a few composited crops here (PNG)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    data = args.shared / "data" / "grocery-store" / "dataset"
    weights = args.shared / "models" / "mobilenetv2_100.imagenet.safetensors"
    store = read_grocery_store(data)
    names = [c.name for c in store.classes]
    packshots = [load_image(c.iconic).convert("RGB") for c in store.classes]
    val = store.photos("val")[: args.limit]
    photos = [load_image(v.path).convert("RGB") for v in val]
    truth = np.array([names.index(v.label) for v in val])
    train = [t.path for t in store.photos("train")]

    enc = create_encoder("timm:mobilenetv2_100", weights=weights, interpolation="bilinear", batch_size=64)
    center = features(enc, [load_image(t) for t in train[::CENTER_STRIDE][: args.limit]]).mean(0)

    ref_crops = [crop_segment(im, packshot_mask(im)) for im in packshots]
    query_crops = {
        "ellipse": [crop_segment(im, ellipse_mask(im.size)) for im in photos],
        "region": [crop_segment(im, region_mask(im)) for im in photos],
    }
    coverage = {"packshot": ref_crops, **query_crops}
    for name, crops in coverage.items():
        fr = [float((np.asarray(c)[..., 3] > 0).mean()) for c in crops]
        print(f"{name} masks: mask / box area mean {np.mean(fr):.2f} (min {np.min(fr):.2f}, max {np.max(fr):.2f})")

    plain_refs = features(enc, packshots)
    ref_feats = {c: features(enc, [fn(cr, 10_000 + i) for i, cr in enumerate(ref_crops)]) for c, fn in CHOICES.items()}
    query_feats = {
        (kind, c): features(enc, [fn(cr, 20_000 + i) for i, cr in enumerate(crops)])
        for kind, crops in query_crops.items() for c, fn in CHOICES.items()
    }
    if args.save_examples:
        args.save_examples.mkdir(parents=True, exist_ok=True)
        for c, fn in CHOICES.items():
            tag = c.split(" (")[0].replace(" ", "_")
            fn(ref_crops[50], 0).save(args.save_examples / f"packshot_{tag}.png")
            for kind, crops in query_crops.items():
                fn(crops[0], 0).save(args.save_examples / f"{kind}_{tag}.png")

    n = len(photos)
    print(f"\n{len(packshots)} SKUs (one packshot each), {n} val photos, MobileNetV2 ImageNet, "
          f"torch threads {args.threads}; chance {1 / len(packshots):.4f}")
    for kind in query_crops:
        for feat, c_vec in (("raw features", None), ("centred features", center)):
            results = {}
            for c in CHOICES:
                q = normalise(query_feats[(kind, c)], c_vec)
                results[(c, "both")] = scores(*nearest(normalise(ref_feats[c], c_vec), q), truth)
                results[(c, "mixed")] = scores(*nearest(normalise(plain_refs, c_vec), q), truth)
            print(f"\nqueries: {kind} segments of the {n} val photos, {feat}")
            print("| compositing | side | top-1 | ratio | per-class | ratio | wins/losses vs grey | McNemar p | cos dist (correct) |")
            print("|---|---|---|---|---|---|---|---|---|")
            for side in ("both", "mixed"):
                base = results[(BASELINE, side)]
                for c in CHOICES:
                    r = results[(c, side)]
                    w, l, pv = paired(r["ok"], base["ok"])
                    print(f"| {c} | {side} | {r['top1']:.4f} | {ratio(r['top1'], base['top1'])} | {r['per_class']:.4f} | "
                          f"{ratio(r['per_class'], base['per_class'])} | {'-' if c == BASELINE else f'+{w} / -{l}'} | "
                          f"{'-' if c == BASELINE else f'{pv:.3f}'} | {r['dist']:.4f} |")
    print(f"\ntotal time {time.perf_counter() - t_start:.0f} s ({os.cpu_count()} CPUs visible)")


if __name__ == "__main__":
    main()
