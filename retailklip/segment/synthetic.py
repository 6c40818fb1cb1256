"""Synthetic checkout trays with ground-truth instance masks, written in COCO instance format.

No trained SAM weights exist here, so prompt strategies are compared in a simulation (issue 13,
item 3): a tray is composed from real GroceryStore images (Klasson et al., WACV 2019) --
iconic packshots cut from their white background are dropped at random positions, scales and
rotations onto a real background (a crop of an in-store photo of the train split, blurred like
an out-of-focus counter); later objects lie on top of earlier ones, and the ground truth is each
object's *visible* part.  Everything is deterministic from a seed.

Ground truth is a label map (``Tray.labels`` int16 (H, W): 0 = background, k + 1 = object k,
topmost visible), so a 12 MP tray costs 24 MB, not one bool plane per object.  The COCO file
(``write_trays``) has ``images``, ``annotations`` (compressed RLE ``segmentation`` from
``pycocotools.mask.encode``, ``bbox`` XYWH pixels, ``area`` pixels, ``iscrowd`` 0) and
``categories`` (all 81 fine classes, ``id`` = class index + 1, ``name`` = the SKU id = the fine
class name, ``supercategory`` = the coarse class).

CLI: ``python -m retailklip.segment.synthetic --out DIR --n 20 [--seed 0] [--size 1024x768]``.
Needs ``scipy`` and ``pycocotools`` (the ``sim`` and ``test`` extras).
"""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter
from scipy import ndimage as ndi

from ..datasets import GroceryStore, read_grocery_store
from .errors import SegmenterOptionError


def packshot_mask(rgb: np.ndarray, white: int = 250, max_chroma: int = 8, erode: int = 2) -> np.ndarray:
    """The product of a packshot on a white background.

    The near-white pixels (every channel >= ``white``, max - min channel <= ``max_chroma``)
    connected to the border are background; the rest is closed (5 x 5), opened (3 x 3), reduced
    to its largest connected component, its holes are filled and it is eroded by ``erode``
    pixels (the JPEG's anti-aliased white rim stays out).

    Args:
        rgb: uint8 (H, W, 3).
    Returns:
        bool (H, W); all False when nothing but white is found.
    """
    a = np.asarray(rgb).astype(np.int16)
    near_white = (a.min(-1) >= white) & ((a.max(-1) - a.min(-1)) <= max_chroma)
    lab, _ = ndi.label(near_white)
    border = np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]]))
    mask = ~np.isin(lab, border[border > 0])
    mask = ndi.binary_closing(np.pad(mask, 4), np.ones((5, 5), bool))[4:-4, 4:-4]
    mask = ndi.binary_opening(mask, np.ones((3, 3), bool))
    comp, n = ndi.label(mask)
    if n == 0:
        return mask
    largest = int(np.argmax(ndi.sum(mask, comp, range(1, n + 1)))) + 1
    mask = ndi.binary_fill_holes(comp == largest)
    return ndi.binary_erosion(mask, np.ones((3, 3), bool), iterations=erode) if erode else mask


@dataclass(frozen=True)
class TrayOptions:
    """How trays are composed.

    Attributes:
        min_objects / max_objects: objects per tray, uniform in [min, max] (3-15).
        min_scale / max_scale: an object's longer side as a fraction of the tray's shorter
            side, log-uniform in [min, max] (0.12-0.40).
        min_visible: every object keeps at least this fraction of its own area visible after
            the objects above it are dropped (0.4); a placement that would break it for any
            object is tried again elsewhere (at most 30 times, then the object is skipped).
        background_blur: Gaussian blur radius of the background, fraction of the tray's longer
            side (0.004).
    """

    min_objects: int = 3
    max_objects: int = 15
    min_scale: float = 0.12
    max_scale: float = 0.40
    min_visible: float = 0.4
    background_blur: float = 0.004

    def __post_init__(self) -> None:
        if not 1 <= self.min_objects <= self.max_objects:
            raise SegmenterOptionError(f"need 1 <= min_objects <= max_objects, got {self.min_objects}, {self.max_objects}")
        if not 0 < self.min_scale <= self.max_scale <= 1:
            raise SegmenterOptionError(f"need 0 < min_scale <= max_scale <= 1, got {self.min_scale}, {self.max_scale}")
        if not 0 <= self.min_visible <= 1 or self.background_blur < 0:
            raise SegmenterOptionError("min_visible must be in [0, 1] and background_blur >= 0")


@dataclass
class Tray:
    """One synthetic tray.

    Attributes:
        image: PIL RGB (W, H).
        labels: int16 (H, W): 0 = background, k + 1 = visible pixel of object k.
        skus: SKU id (GroceryStore fine class name) of each object, bottom to top.
    """

    image: Image.Image
    labels: np.ndarray
    skus: list[str]

    def masks(self) -> np.ndarray:
        """bool (k, H, W) visible masks, one per object (memory: k x H x W bytes)."""
        return self.labels[None] == np.arange(1, len(self.skus) + 1, dtype=np.int16)[:, None, None]


class TrayMaker:
    """Composes trays from a GroceryStore dataset (packshots cut once, then reused).

    Args:
        store: ``retailklip.datasets.read_grocery_store(root)``; its iconic images are the
            objects, its ``train`` photos the backgrounds (the val and test splits are not read).
        options: :class:`TrayOptions`.
    """

    def __init__(self, store: GroceryStore, options: TrayOptions | None = None) -> None:
        self.options = options or TrayOptions()
        self.skus = [c.name for c in store.classes]
        self.coarse = [c.coarse_name for c in store.classes]
        self._cutouts: list[tuple[np.ndarray, np.ndarray]] = []
        for c in store.classes:
            rgb = np.asarray(Image.open(c.iconic).convert("RGB"))
            m = packshot_mask(rgb)
            if not m.any():
                raise SegmenterOptionError(f"{c.iconic}: no product found on the white background")
            ys, xs = np.nonzero(m)
            box = np.s_[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
            self._cutouts.append((rgb[box], m[box]))
        self._backgrounds = [p.path for p in store.photos("train")]

    def make(self, seed: int, size: tuple[int, int] = (1024, 768)) -> Tray:
        """The tray of ``seed`` at ``size`` = (W, H) pixels (same seed and size -> same tray).

        Raises:
            SegmenterOptionError: a side below 64 pixels.
        """
        W, H = size
        if min(W, H) < 64:
            raise SegmenterOptionError(f"tray size must be at least 64 x 64 pixels, got {W} x {H}")
        o = self.options
        rng = np.random.default_rng([seed, W, H])
        canvas = self._background(rng, W, H)
        labels = np.zeros((H, W), np.int16)
        full_area: list[int] = []
        skus: list[str] = []
        for _ in range(int(rng.integers(o.min_objects, o.max_objects + 1))):
            cls = int(rng.integers(len(self._cutouts)))
            rgb, mask = self._transformed(cls, rng, min(W, H))
            placed = self._place(labels, full_area, mask, rng)
            if placed is None:
                continue
            y, x = placed
            h, w = mask.shape
            k = len(skus) + 1
            region = labels[y : y + h, x : x + w]
            region[mask] = k
            canvas[y : y + h, x : x + w][mask] = rgb[mask]
            full_area.append(int(mask.sum()))
            skus.append(self.skus[cls])
        return Tray(Image.fromarray(canvas), labels, skus)

    def _background(self, rng: np.random.Generator, W: int, H: int) -> np.ndarray:
        path = self._backgrounds[int(rng.integers(len(self._backgrounds)))]
        photo = Image.open(path).convert("RGB")
        pw, ph = photo.size
        frac = rng.uniform(0.5, 1.0)
        cw = min(pw, ph * W / H) * frac
        ch = cw * H / W
        x0, y0 = rng.uniform(0, pw - cw), rng.uniform(0, ph - ch)
        bg = photo.resize((W, H), Image.BILINEAR, box=(x0, y0, x0 + cw, y0 + ch))
        if self.options.background_blur > 0:
            bg = bg.filter(ImageFilter.GaussianBlur(self.options.background_blur * max(W, H)))
        return np.array(bg)

    def _transformed(self, cls: int, rng: np.random.Generator, short: int) -> tuple[np.ndarray, np.ndarray]:
        o = self.options
        rgb, mask = self._cutouts[cls]
        scale = math.exp(rng.uniform(math.log(o.min_scale), math.log(o.max_scale))) * short / max(mask.shape)
        w, h = max(2, round(mask.shape[1] * scale)), max(2, round(mask.shape[0] * scale))
        angle = float(rng.uniform(0, 360))
        img = Image.fromarray(rgb).resize((w, h), Image.BICUBIC).rotate(angle, Image.BICUBIC, expand=True)
        alpha = Image.fromarray(mask.astype(np.uint8) * 255).resize((w, h), Image.BILINEAR)
        alpha = alpha.rotate(angle, Image.BILINEAR, expand=True)
        m = np.asarray(alpha) >= 128
        ys, xs = np.nonzero(m)
        box = np.s_[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
        return np.asarray(img)[box], m[box]

    def _place(self, labels: np.ndarray, full_area: list[int], mask: np.ndarray,
               rng: np.random.Generator) -> tuple[int, int] | None:
        H, W = labels.shape
        h, w = mask.shape
        if h > H or w > W:
            return None
        visible = np.bincount(labels.ravel(), minlength=len(full_area) + 1)[1:]
        need = np.ceil(np.asarray(full_area) * self.options.min_visible)
        for _ in range(30):
            y, x = int(rng.integers(0, H - h + 1)), int(rng.integers(0, W - w + 1))
            hidden = np.bincount(labels[y : y + h, x : x + w][mask], minlength=len(full_area) + 1)[1:]
            if np.all(visible - hidden >= need):
                return y, x
        return None

    def categories(self) -> list[dict]:
        """COCO ``categories``: every fine class, ``id`` = class index + 1, ``name`` = SKU id."""
        return [{"id": i + 1, "name": s, "supercategory": c} for i, (s, c) in enumerate(zip(self.skus, self.coarse))]


def coco_annotations(tray: Tray, image_id: int, first_id: int, category_ids: dict[str, int]) -> list[dict]:
    """COCO ``annotations`` of one tray: compressed RLE (``pycocotools.mask.encode``), ``bbox``
    XYWH pixels, ``area`` pixels, ``iscrowd`` 0; ids from ``first_id`` on."""
    from pycocotools import mask as mask_utils

    out = []
    for k, sku in enumerate(tray.skus):
        m = np.asfortranarray((tray.labels == k + 1).astype(np.uint8))
        rle = mask_utils.encode(m)
        x, y, w, h = (float(v) for v in mask_utils.toBbox(rle))
        out.append({"id": first_id + k, "image_id": image_id, "category_id": category_ids[sku],
                    "segmentation": {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")},
                    "area": int(mask_utils.area(rle)), "bbox": [x, y, w, h], "iscrowd": 0})
    return out


def write_trays(out_dir: str | os.PathLike, n: int, seed: int = 0, size: tuple[int, int] = (1024, 768),
                root: str | os.PathLike | None = None, options: TrayOptions | None = None,
                image_format: str = "png", maker: TrayMaker | None = None) -> Path:
    """Write ``n`` trays (seeds ``seed`` .. ``seed + n - 1``) as ``out_dir/tray_XXXX.png`` (or
    ``.jpg``, quality 95) and ``out_dir/annotations.json`` (COCO instances, module docstring).

    Args:
        root: the GroceryStore root (default ``$RETAILKLIP_GROCERY_STORE`` or
            /work/shared/data/grocery-store); ignored when ``maker`` is given.
        size: (W, H) pixels of every tray.
    Returns:
        The path of ``annotations.json``.
    Raises:
        SegmenterOptionError: ``n < 1`` or an unknown ``image_format``.
        retailklip.datasets.DatasetError: an unreadable GroceryStore root.
    """
    if n < 1:
        raise SegmenterOptionError(f"n must be >= 1, got {n}")
    if image_format not in ("png", "jpg"):
        raise SegmenterOptionError(f"image_format must be png or jpg, got {image_format!r}")
    maker = maker or TrayMaker(read_grocery_store(root or default_root()), options)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    category_ids = {c["name"]: c["id"] for c in maker.categories()}
    images, annotations = [], []
    for i in range(n):
        tray = maker.make(seed + i, size)
        name = f"tray_{seed + i:04d}.{image_format}"
        tray.image.save(out / name, **({"quality": 95} if image_format == "jpg" else {}))
        images.append({"id": i + 1, "file_name": name, "width": size[0], "height": size[1], "seed": seed + i})
        annotations += coco_annotations(tray, i + 1, len(annotations) + 1, category_ids)
    coco = {"info": {"description": f"retailklip synthetic checkout trays, seeds {seed}..{seed + n - 1}"},
            "images": images, "annotations": annotations, "categories": maker.categories()}
    path = out / "annotations.json"
    path.write_text(json.dumps(coco))
    return path


def read_coco_masks(annotations: str | os.PathLike) -> list[tuple[Path, np.ndarray, list[str]]]:
    """Read a COCO instances file back (through :mod:`retailklip.coco`, the one COCO reader):
    per image (photo path, bool (k, H, W) masks, SKU ids), in file order.

    Raises:
        retailklip.coco.CocoError: a malformed file or segmentation.
    """
    from ..coco import decode_segmentation, read_coco

    dataset = read_coco(annotations)
    out = []
    for im in dataset.images:
        masks = np.zeros((len(im.annotations), im.height, im.width), bool)
        for k, a in enumerate(im.annotations):
            masks[k] = decode_segmentation(a, im.height, im.width)
        out.append((dataset.path.parent / im.file_name, masks, [a.category for a in im.annotations]))
    return out


def default_root() -> str:
    """``$RETAILKLIP_GROCERY_STORE`` or /work/shared/data/grocery-store."""
    return os.environ.get("RETAILKLIP_GROCERY_STORE", "/work/shared/data/grocery-store")


def _size(text: str) -> tuple[int, int]:
    w, _, h = text.lower().partition("x")
    return int(w), int(h)


def main(argv: list[str] | None = None) -> None:
    """``python -m retailklip.segment.synthetic --out DIR --n 20``."""
    p = argparse.ArgumentParser(description="Write synthetic checkout trays (COCO instances).")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--n", type=int, default=20, help="number of trays")
    p.add_argument("--seed", type=int, default=0, help="first tray seed")
    p.add_argument("--size", type=_size, default=(1024, 768), help="WxH pixels (default 1024x768)")
    p.add_argument("--root", default=None, help="GroceryStore root")
    p.add_argument("--format", choices=("png", "jpg"), default="png")
    a = p.parse_args(argv)
    path = write_trays(a.out, a.n, a.seed, a.size, a.root, image_format=a.format)
    print(path)


if __name__ == "__main__":
    main()
