"""Overlay pictures: what the recognizer saw, drawn on the photo for a person to check.

For each :class:`~retailklip.recognizer.Recognition`: its mask tinted in a colour of its own
(segments only; a whole-image recognition has no mask), its box outlined, and a label with the
SKU (display name if there is one) and the cosine distance, as in the figure of segmented fruit
with confidences of the seed paper ("EfficientViT for Retail").  Unknowns (distance above the
threshold) are drawn in red with the label ``UNKNOWN d=0.71 (nearest <sku>)``; known SKUs never
use red.

Only pixels inside masks, on box outlines (drawn inward, inside the box) and under labels change;
everything else is the photo's own pixels.  Library use::

    from retailklip.images import load_image
    from retailklip.overlay import save_overlay
    im = load_image("tray.jpg")
    save_overlay(im, recognizer.recognize(im), "tray_overlay.png")

``catalog recognize PHOTO --overlay out.png`` does the same (several photos: ``out_0.png``,
``out_1.png``, ... in input order; see :func:`overlay_paths`).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .errors import RetailKlipError
from .images import ImageSource, load_image, to_rgb

#: Output suffixes :func:`save_overlay` writes (PIL picks the format from the suffix).
OVERLAY_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")

#: Colours of known segments (RGB), in segment order; no red, which means "unknown".
KNOWN_PALETTE: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180), (44, 160, 44), (255, 187, 0), (148, 103, 189), (23, 190, 207),
    (140, 86, 75), (188, 189, 34), (227, 119, 194), (0, 128, 128), (127, 127, 255),
)
UNKNOWN_COLOR = (230, 20, 20)


@dataclass(frozen=True)
class OverlayStyle:
    """Drawing parameters.

    Attributes:
        alpha: mask tint opacity in [0, 1] (0 = no tint).
        line_width: box outline width in pixels (default: ``max(2, min(W, H) // 150)``).
        font_size: label text height in pixels (default: ``max(11, min(W, H) // 28)``).
        padding: label padding in pixels.
    """

    alpha: float = 0.45
    line_width: int | None = None
    font_size: int | None = None
    padding: int = 3

    def widths(self, size: tuple[int, int]) -> tuple[int, int]:
        """(line width, font size) in pixels for an image of ``size`` (W, H)."""
        short = min(size)
        return (self.line_width or max(2, short // 150), self.font_size or max(11, short // 28))


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow < 10.1 or no FreeType: the fixed bitmap font
        return ImageFont.load_default()


def label_text(r) -> str:
    """The label of a recognition: ``"<name or sku> d=0.23"``, or
    ``"UNKNOWN d=0.71 (nearest <sku>)"`` when it is unknown."""
    if r.sku is None:
        return f"UNKNOWN d={r.distance:.2f} (nearest {r.nearest_sku})"
    return f"{r.name or r.sku} d={r.distance:.2f}"


def segment_color(i: int, r) -> tuple[int, int, int]:
    """Colour of the ``i``-th recognition: red for unknowns, else the palette in order."""
    return UNKNOWN_COLOR if r.sku is None else KNOWN_PALETTE[i % len(KNOWN_PALETTE)]


def label_boxes(size: tuple[int, int], recognitions: Sequence, style: OverlayStyle | None = None) -> list[tuple[int, int, int, int]]:
    """Where each label goes: ``(x0, y0, x1, y1)`` pixels, x1/y1 exclusive, inside the image.

    A label sits just above its box's top-left corner, or inside the box's top edge when there is
    no room above; it is shifted left to fit the image width.
    """
    style = style or OverlayStyle()
    w, h = size
    _, font_size = style.widths(size)
    font = _font(font_size)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    out = []
    for r in recognitions:
        left, top, right, bottom = probe.textbbox((0, 0), label_text(r), font=font)
        lw = min(right - left + 2 * style.padding, w)
        lh = min(bottom - top + 2 * style.padding, h)
        x0, y0 = int(r.bbox[0]), int(r.bbox[1])
        y = y0 - lh if y0 - lh >= 0 else y0
        y = min(max(y, 0), h - lh)
        x = min(max(x0, 0), w - lw)
        out.append((x, y, x + lw, y + lh))
    return out


def draw_overlay(image: ImageSource, recognitions: Sequence, style: OverlayStyle | None = None) -> Image.Image:
    """Draw recognitions on a photo.

    Args:
        image: the photo the recognitions were made on (path, bytes, PIL image or uint8
            array; decoded and EXIF-transposed like :meth:`Recognizer.recognize` does).
        recognitions: :class:`~retailklip.recognizer.Recognition` objects (anything with
            ``sku``, ``nearest_sku``, ``name``, ``distance``, ``bbox`` (x0, y0, x1, y1) pixels
            with exclusive x1/y1, and ``mask``: bool (H, W) or None).
        style: drawing parameters.

    Returns:
        A new PIL ``RGB`` image of the photo's size (transparent photos are put on white).

    Raises:
        InvalidImageError: the image cannot be decoded.
        ValueError: a mask whose shape is not the photo's (H, W).
    """
    style = style or OverlayStyle()
    im = to_rgb(load_image(image), (255, 255, 255)).copy()
    w, h = im.size
    line, font_size = style.widths(im.size)
    font = _font(font_size)
    px = np.asarray(im, dtype=np.float32).copy()
    for i, r in enumerate(recognitions):
        if r.mask is None:
            continue
        m = np.asarray(r.mask, dtype=bool)
        if m.shape != (h, w):
            raise ValueError(f"mask of shape {m.shape} does not match the image's (H, W) = {(h, w)}")
        px[m] = (1.0 - style.alpha) * px[m] + style.alpha * np.array(segment_color(i, r), np.float32)
    out = Image.fromarray(np.rint(px).clip(0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(out)
    for i, r in enumerate(recognitions):
        x0, y0, x1, y1 = (int(v) for v in r.bbox)
        x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
        if x1 > x0 and y1 > y0:
            draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=segment_color(i, r), width=line)
    for i, (r, (lx0, ly0, lx1, ly1)) in enumerate(zip(recognitions, label_boxes(im.size, recognitions, style))):
        color = segment_color(i, r)
        draw.rectangle([lx0, ly0, lx1 - 1, ly1 - 1], fill=color)
        text_color = (0, 0, 0) if 0.299 * color[0] + 0.587 * color[1] + 0.114 * color[2] > 150 else (255, 255, 255)
        left, top, _, _ = draw.textbbox((0, 0), label_text(r), font=font)
        draw.text((lx0 + style.padding - left, ly0 + style.padding - top), label_text(r), fill=text_color, font=font)
    return out


def check_overlay_path(path: str | os.PathLike) -> Path:
    """Check that an overlay can be written to ``path`` (suffix, existing folder) before any work.

    Raises:
        RetailKlipError: unsupported suffix, or the folder does not exist.
    """
    p = Path(path)
    if p.suffix.lower() not in OVERLAY_SUFFIXES:
        raise RetailKlipError(f"--overlay {p}: use one of the suffixes {', '.join(OVERLAY_SUFFIXES)}")
    if not p.parent.is_dir():
        raise RetailKlipError(f"--overlay {p}: folder {p.parent} does not exist")
    return p


def overlay_paths(path: str | os.PathLike, n: int) -> list[Path]:
    """Output paths for ``n`` photos: ``[path]`` for one photo, else ``<stem>_<i><suffix>`` for
    i = 0 .. n-1 in input order (``out.png`` -> ``out_0.png``, ``out_1.png``, ...)."""
    p = Path(path)
    if n == 1:
        return [p]
    return [p.with_name(f"{p.stem}_{i}{p.suffix}") for i in range(n)]


def save_overlay(image: ImageSource, recognitions: Sequence, path: str | os.PathLike, style: OverlayStyle | None = None) -> Path:
    """Draw (:func:`draw_overlay`) and write atomically (temporary file + rename) to ``path``.

    Returns:
        The written path.

    Raises:
        RetailKlipError: see :func:`check_overlay_path`; InvalidImageError / ValueError: see
            :func:`draw_overlay`.  Nothing is written on error.
    """
    p = check_overlay_path(path)
    picture = draw_overlay(image, recognitions, style)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=".tmp-", suffix=p.suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            picture.save(f, format=Image.registered_extensions()[p.suffix.lower()])
        os.chmod(tmp, 0o644)
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return p
