"""Segment parsing: a binary mask becomes an RGBA crop of its bounding box.

Source: seed 000 ("EfficientViT for Retail"), eq. 1: for a mask M over image I with bounding
box B, the crop is ``C = I[B]`` with alpha ``A = 255 * M[B]``: pixels outside the mask are fully
transparent (alpha exactly 0), pixels inside keep their colour unchanged (the RGB of the whole
box is kept, so a caller may still ignore the alpha). How transparency is composited before an
encoder sees the crop is the encoder side's choice (``retailklip.images.to_rgb``, onto
``Encoder.background``, default grey 128: measured against black, white, the ImageNet mean, the
segment's mean colour and noise, see docs/segmentation.md, "Compositing transparency").

Boxes are ``(x0, y0, x1, y1)`` in pixels with **exclusive** ``x1, y1`` (PIL's ``Image.crop``
and numpy slicing convention): the crop is ``image[y0:y1, x0:x1]``, its size is
``(x1 - x0, y1 - y0)``.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ..images import IMAGE_SUFFIXES

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class Segment:
    """One product segment of a photo.

    Attributes:
        mask: bool (H, W) over the whole (EXIF-upright) photo; True inside the segment.
        bbox: tight box of ``mask``, ``(x0, y0, x1, y1)`` pixels, x1/y1 exclusive.
        score: SAM's predicted IoU of the mask (in [0, 1] for trained weights) for model
            segments, 1.0 for ``whole-image``.
        crop: PIL ``RGBA`` image of size ``(x1 - x0, y1 - y0)``: the photo's pixels inside the
            box, alpha exactly 0 where ``mask`` is False, colour unchanged where True (alpha 255,
            or the photo's own alpha if it has one).
        stability_score: SAM's stability score, or 1.0 where not applicable.
    """

    mask: np.ndarray
    bbox: tuple[int, int, int, int]
    score: float
    crop: Image.Image
    stability_score: float = field(default=1.0)

    @property
    def area(self) -> int:
        """Number of mask pixels."""
        return int(np.count_nonzero(self.mask))

    def __repr__(self) -> str:
        return f"Segment(bbox={self.bbox}, area={self.area}, score={self.score:.3f})"


def mask_to_bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    """Tight bounding box of a mask.

    Args:
        mask: bool (H, W).

    Returns:
        ``(x0, y0, x1, y1)`` pixels, x1/y1 exclusive.

    Raises:
        ValueError: ``mask`` is not 2-D or has no True pixel.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D (H, W), got shape {mask.shape}")
    ys = np.flatnonzero(mask.any(axis=1))
    xs = np.flatnonzero(mask.any(axis=0))
    if ys.size == 0:
        raise ValueError("mask is empty: it has no bounding box")
    return int(xs[0]), int(ys[0]), int(xs[-1]) + 1, int(ys[-1]) + 1


def crop_segment(image: Image.Image, mask: np.ndarray, bbox: tuple[int, int, int, int] | None = None) -> Image.Image:
    """RGBA crop of ``mask``'s box with alpha 0 outside the mask (seed 000, eq. 1).

    Args:
        image: PIL ``RGB`` or ``RGBA`` image of size (W, H) (other modes are converted to RGB).
        mask: bool (H, W).
        bbox: box to crop, x1/y1 exclusive (default: :func:`mask_to_bbox`).

    Returns:
        PIL ``RGBA`` image of the box; RGB unchanged, alpha = 0 outside the mask, inside it 255
        (or the image's own alpha for ``RGBA`` input).

    Raises:
        ValueError: mask shape differs from the image's (H, W), or the mask is empty.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != (image.height, image.width):
        raise ValueError(f"mask shape {mask.shape} does not match the image's (H, W) = {(image.height, image.width)}")
    x0, y0, x1, y1 = bbox if bbox is not None else mask_to_bbox(mask)
    if image.mode not in ("RGB", "RGBA"):
        image = image.convert("RGB")
    pixels = np.asarray(image.crop((x0, y0, x1, y1)))
    rgba = np.empty(pixels.shape[:2] + (4,), dtype=np.uint8)
    rgba[..., :3] = pixels[..., :3]
    inside = mask[y0:y1, x0:x1]
    own_alpha = pixels[..., 3] if image.mode == "RGBA" else np.uint8(255)
    rgba[..., 3] = np.where(inside, own_alpha, np.uint8(0))
    return Image.fromarray(rgba, "RGBA")


def make_segment(image: Image.Image, mask: np.ndarray, score: float, stability_score: float = 1.0) -> Segment:
    """Build a :class:`Segment` (box + RGBA crop) from a mask over ``image``.

    Raises:
        ValueError: mask shape differs from the image's or the mask is empty.
    """
    mask = np.asarray(mask, dtype=bool)
    bbox = mask_to_bbox(mask)
    return Segment(mask=mask, bbox=bbox, score=float(score), crop=crop_segment(image, mask, bbox), stability_score=float(stability_score))



def whole_image_segment(image: Image.Image) -> Segment:
    """The one segment that is the whole photo: mask all True, box ``(0, 0, W, H)``, score 1.0,
    crop the photo as ``RGBA`` (its own alpha, else 255).  What ``whole-image`` segments, what
    ``fallback_whole_image`` returns, and what the recognizer embeds with no segmenter.

    Args:
        image: PIL ``RGB`` or ``RGBA`` image of size (W, H), as ``retailklip.images.load_image``
            returns it (other modes are converted to RGB).

    Returns:
        A :class:`Segment` (mask bool (H, W)).
    """
    mask = np.ones((image.height, image.width), dtype=bool)
    bbox = (0, 0, image.width, image.height)
    return Segment(mask=mask, bbox=bbox, score=1.0, crop=crop_segment(image, mask, bbox))

def segment_filename(image_name: str | os.PathLike, index: int) -> str:
    """File name ``[image name]_segment_[index].png`` of a saved segment crop.

    Args:
        image_name: the photo's name or path; its directory and an image suffix (``.jpg``,
            ``.png``, ...) are dropped, e.g. ``"shots/shelf.jpg"`` -> ``"shelf"``.
        index: position of the segment in the list returned by ``segment`` (0-based).

    Raises:
        ValueError: empty name or negative index.
    """
    name = Path(image_name).name
    if Path(name).suffix.lower() in IMAGE_SUFFIXES:
        name = Path(name).stem
    if not name or name in (".", ".."):
        raise ValueError(f"cannot derive a file name from image name {str(image_name)!r}")
    if index < 0:
        raise ValueError(f"segment index must be >= 0, got {index}")
    name = re.sub(r"[\x00-\x1f/\\]", "_", name)
    return f"{name}_segment_{index}.png"


def save_segments(
    segments: Sequence[Segment], directory: str | os.PathLike, image_name: str | os.PathLike
) -> list[Path]:
    """Save each segment's RGBA crop as ``directory/[image name]_segment_[x].png``.

    ``x`` is the segment's 0-based index in ``segments``; existing files of the same name are
    overwritten; ``directory`` is created if needed. PNG keeps the alpha channel losslessly.

    Args:
        segments: segments of one photo.
        directory: output directory.
        image_name: the photo's name or path (see :func:`segment_filename`).

    Returns:
        The written paths, in ``segments`` order.

    Raises:
        NotADirectoryError: ``directory`` exists and is not a directory.
        ValueError: bad ``image_name``.
    """
    out = Path(directory)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--save-segments {out}: exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, segment in enumerate(segments):
        path = out / segment_filename(image_name, index)
        segment.crop.save(path, format="PNG")
        paths.append(path)
    logger.info("saved %d segment crops of %s to %s", len(paths), image_name, out)
    return paths
