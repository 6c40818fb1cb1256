"""Packshots pasted onto in-store backgrounds: a training augmentation for reference images.

A catalog's reference image is a packshot on pure white, the photos it must recognise are
in-store; the finetune trains on both (``--train-iconic``, ``--reference-copies``).
``--reference-backgrounds P`` replaces, with probability P per draw, a packshot's white studio
background by a random crop of one of the training set's in-store photos before the random
training transform, so that the encoder learns to embed the product and not its background
(copy-paste augmentation, Ghiasi et al., CVPR 2021, §3; for retail packshots, Tonioni & Di
Stefano, ICIAP 2017, and the synthetic shelves of Wei et al., RPC 2019, §4.2).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage as ndi

from retailklip.images import load_image, to_rgb


def packshot_mask(rgb: Image.Image, white: int = 250, max_chroma: int = 6) -> np.ndarray:
    """Product mask of a packshot photographed on pure white: bool (H, W), True on the product.

    Near-white pixels (every channel >= ``white``, channel spread <= ``max_chroma``) connected to
    the image border are the background (white parts inside the product outline stay product),
    then a 3x3 opening, hole filling and components of >= 0.5 % of the image.
    """
    a = np.asarray(rgb.convert("RGB")).astype(np.int16)
    near_white = (a.min(-1) >= white) & ((a.max(-1) - a.min(-1)) <= max_chroma)
    lab, _ = ndi.label(near_white, structure=np.ones((3, 3)))
    border = np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]]))
    mask = ~np.isin(lab, border[border > 0])
    mask = ndi.binary_opening(mask, structure=np.ones((3, 3)))
    mask = ndi.binary_fill_holes(mask)
    comp, n = ndi.label(mask, structure=np.ones((3, 3)))
    if n:
        sizes = ndi.sum(mask, comp, range(1, n + 1))
        mask = np.isin(comp, np.flatnonzero(sizes >= 0.005 * mask.size) + 1)
    return mask


def paste_on_background(packshot: Image.Image, background: Image.Image, rng: random.Random) -> Image.Image:
    """``packshot`` (RGB) with its white background replaced by a random crop of ``background``
    (RGB, any size) of the packshot's aspect ratio, resized to the packshot's size; unchanged when
    no product is found (an all-white or all-product image)."""
    mask = packshot_mask(packshot)
    if mask.all() or not mask.any():
        return packshot
    w, h = packshot.size
    bw, bh = background.size
    scale = min(bw / w, bh / h) * rng.uniform(0.5, 1.0)  # a crop of 50-100 % of the largest that fits
    cw, ch = max(1, int(w * scale)), max(1, int(h * scale))
    x0, y0 = rng.randint(0, bw - cw), rng.randint(0, bh - ch)
    bg = background.crop((x0, y0, x0 + cw, y0 + ch)).resize((w, h), Image.BILINEAR)
    out = np.where(mask[..., None], np.asarray(packshot), np.asarray(bg))
    return Image.fromarray(out.astype(np.uint8))


class BackgroundPaster:
    """Callable for :class:`finetune.data.ImageDataset`: with probability ``p``, a reference image
    gets a random one of ``backgrounds`` (in-store photo files) behind it.

    Args:
        backgrounds: image files (the training set's ``query`` photos); at least one.
        p: probability per draw, in [0, 1].
        background_fill: RGB colour transparent pixels are composited onto (the encoder's).

    Raises:
        ValueError: no backgrounds, or ``p`` outside [0, 1].
    """

    def __init__(self, backgrounds: Sequence[str | Path], p: float, background_fill: tuple[int, int, int]) -> None:
        if not backgrounds:
            raise ValueError("--reference-backgrounds needs in-store photos (training rows of role 'query')")
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"--reference-backgrounds must be in [0, 1], got {p}")
        self.backgrounds = [Path(b) for b in backgrounds]
        self.p = p
        self.fill = tuple(background_fill)

    def __call__(self, packshot: Image.Image) -> Image.Image:
        """``packshot`` (RGB) with an in-store background (probability ``p``), else unchanged.
        Draws from :mod:`random` (seeded per epoch and DataLoader worker by the finetune)."""
        if self.p == 0.0 or random.random() >= self.p:
            return packshot
        bg = to_rgb(load_image(random.choice(self.backgrounds)), self.fill)
        return paste_on_background(packshot, bg, random.Random(random.getrandbits(32)))
