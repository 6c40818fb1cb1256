"""Reference augmentation: one reference image per SKU -> K views -> K vectors.

RetailKLIP (§4.2, zero-shot evaluation protocol) builds the 1-NN gallery from one reference
image per class plus augmented copies of it, so that the single packshot covers some of the
pose, scale and lighting variation of in-store photos.  The views here, all from
``torchvision.transforms.v2``:

* view 0 is the reference itself (K = 1 means "no augmentation");
* views 1..K-1: random crop of 35-100 % of the area (in-store photos show products close up
  and partly), horizontal flip, rotation up to ±20 degrees, colour jitter (brightness,
  contrast, saturation 0.3, hue 0.03: shop lighting), Gaussian blur with probability 0.3
  (phone motion and focus; the kernel shrinks for images under 9 px, so any size works).

Deterministic: the same (image, K, seed) gives the same views on any machine (each view draws
from its own seeded generator; torchvision's transforms read torch's global RNG, which is forked
and restored around each view, under a lock so concurrent callers do not interleave).

The default K = 1 (no augmented views) was chosen by measurement (docs/augmentation.md): on the
296 GroceryStore val photos with the ImageNet MobileNetV2 encoder, every recipe tried
(geometric, photometric, both, zoom-out, background replacement, tiled "facings") at K = 4-16
*lowered* 1-NN top-1 by 0.7-7 points against the packshot alone, with or without feature
centering.  Augmented views of the wrong SKUs become near neighbours of in-store photos more
often than they help the right SKU.  Cross-validation over the train split confirms it (K = 4
and 8 significantly worse than K = 1, K = 16 not better; docs/evaluation.md, issue 14).  Re-measure with ``catalog eval --augmentations K`` for a
finetuned encoder (trained with ArcFace on augmented data, RetailKLIP §4.1) before raising K.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from PIL import Image

from .rng import seeded

if TYPE_CHECKING:  # pragma: no cover - torchvision is imported when views are made
    from torchvision.transforms import v2

DEFAULT_AUGMENTATIONS = 1

#: Largest Gaussian blur kernel of an augmented view, in pixels (odd).
BLUR_KERNEL = 9


def _blur_kernel(w: int, h: int) -> int:
    """The blur kernel for a (w, h) image: :data:`BLUR_KERNEL`, or the largest odd size whose
    reflect padding fits a smaller image (1 for images under 3 px, i.e. no blur)."""
    return min(BLUR_KERNEL, 2 * ((min(w, h) - 1) // 2) + 1)


def _pipeline(size: tuple[int, int], fill) -> v2.Compose:
    from torchvision.transforms import v2

    w, h = size
    k = _blur_kernel(w, h)
    return v2.Compose(
        [
            v2.RandomResizedCrop((h, w), scale=(0.35, 1.0), ratio=(3 / 4, 4 / 3), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.RandomRotation(20, fill=fill),
            v2.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.03),
            v2.RandomApply([v2.GaussianBlur(kernel_size=k, sigma=(0.5, 2.0))], p=0.3),
        ]
    )


def augment_reference(image: Image.Image, k: int = DEFAULT_AUGMENTATIONS, seed: int = 0) -> list[Image.Image]:
    """Make K views of a reference image (view 0 is the image itself).

    Args:
        image: PIL image of mode ``RGB`` or ``RGBA`` (as from :func:`retailklip.images.load_image`).
        k: number of views, >= 1.
        seed: RNG seed; the same (image, k, seed) gives identical views.

    Returns:
        A list of K PIL images of the same size and mode as ``image``.

    Raises:
        ValueError: ``k < 1`` or an image mode other than RGB / RGBA.
    """
    if k < 1:
        raise ValueError(f"the number of augmented views K must be >= 1, got {k}")
    if image.mode not in ("RGB", "RGBA"):
        raise ValueError(f"augment_reference expects an RGB or RGBA image, got mode {image.mode}")
    # Rotation exposes corners: transparent for RGBA images (composited later like any
    # transparent area), white for RGB (the usual packshot background).
    fill = [0, 0, 0, 0] if image.mode == "RGBA" else [255, 255, 255]
    pipeline = _pipeline(image.size, fill)
    views = [image]
    for i in range(1, k):
        with seeded(seed * 100_003 + i):
            views.append(pipeline(image))
    return views
