"""Safe image decoding: every image enters retailklip through :func:`load_image`.

Decoding rules (what a store photo or a packshot may be):

* EXIF orientation is applied (``PIL.ImageOps.exif_transpose``), so a phone photo taken upright
  is upright.
* Output is 8-bit ``RGB``, or ``RGBA`` when the file carries transparency (an alpha channel or a
  palette with a transparent index).  CMYK, YCbCr, LAB, greyscale, 1-bit and palette images are
  converted; 16-bit greyscale is rescaled to 8 bit (not clipped, as a plain ``convert("RGB")``
  would do).
* Refused with :class:`~retailklip.errors.InvalidImageError`: missing paths, directories, 0-byte
  files, files larger than ``max_bytes``, anything PIL cannot decode (text renamed ``.jpg``,
  truncated JPEGs), images with more than ``max_pixels`` pixels (decompression bombs: checked
  from the header, before any pixel is decoded) and multi-frame images (animated GIF, multi-page
  TIFF), whose meaning as one product photo is ambiguous.  A multi-picture JPEG (MPO, written
  by phones) is its primary picture, as in any viewer.
* Image *files* thinner than :data:`MAX_FILE_ASPECT_RATIO` (100:1, e.g. a 1 x 20000 PNG) are
  refused from the header: decoding them costs far more memory than their pixels.  In-memory
  images of any shape (e.g. a thin segment crop) are accepted; the memory of an encoder's
  preprocessing is bounded for every shape by :func:`limit_aspect_ratio`.
"""

from __future__ import annotations

import io
import os
import stat
import struct
import warnings
from pathlib import Path
from typing import BinaryIO, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import InvalidImageError

ImageSource = Union[str, os.PathLike, bytes, BinaryIO, Image.Image, np.ndarray]

#: File suffixes (lower case) of image files: the formats :func:`load_image` decodes with
#: Pillow's own plugins (JPEG, PNG, BMP, GIF, TIFF, WebP).  Directory scans (``catalog``
#: ``--center-photos DIR``, dataset layouts) keep the files with these suffixes, and
#: :func:`~retailklip.segment.parsing.segment_filename` drops them from a photo's name.  HEIC
#: is not among them: Pillow reads it only through the ``pillow-heif`` plugin.
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"})

#: Largest accepted image, in pixels (width x height).  64 MP covers every phone camera; a
#: 30000 x 30000 PNG (900 MP, a classic decompression bomb) is refused from its header.
DEFAULT_MAX_PIXELS = 64_000_000
#: Largest accepted file, in bytes.
DEFAULT_MAX_BYTES = 100 * 1024 * 1024
#: Widest accepted aspect ratio (long side / short side) of an encoded image file, checked from
#: the header.  A thinner strip is no product photo, and decoding one costs far more than its
#: pixels (PIL keeps a row pointer per row: a 1 x 60,000,000 PNG takes 2.5 GB to decode).
#: Within it and :data:`DEFAULT_MAX_PIXELS`, decoding takes at most ~4 bytes x 64 MP = 256 MB.
MAX_FILE_ASPECT_RATIO = 100.0

#: Background that transparent pixels (outside a segment's mask) are composited onto before an
#: encoder sees them (RGB, 0-255).  Grey 128 was kept by measurement against black, white, the
#: ImageNet mean, the segment's mean colour and noise (benchmarks/bench_composite.py, real
#: GroceryStore images, ImageNet MobileNetV2): with the catalog's whole-packshot references it
#: was best or tied in every setting; see docs/segmentation.md, "Compositing transparency".
#: Per encoder: ``create_encoder(..., background=(r, g, b))`` (part of the encoder identity).
DEFAULT_BACKGROUND = (128, 128, 128)


def read_image_bytes(path: str | os.PathLike, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """Read an image file's bytes after checking it is a readable, non-empty regular file.

    Args:
        path: file path. Symbolic links are followed; what they point to must be a regular file.
        max_bytes: size limit in bytes.

    Returns:
        The file content.

    Raises:
        InvalidImageError: missing path, directory or other non-regular file, 0-byte file,
            file over ``max_bytes``, or unreadable file.
    """
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise InvalidImageError(f"{path}: no such file") from None
    except OSError as e:
        raise InvalidImageError(f"{path}: cannot read: {e.strerror or e}") from None
    if p.is_dir():
        raise InvalidImageError(f"{path}: is a directory, not an image file")
    if not p.is_file():
        raise InvalidImageError(f"{path}: not a regular file")
    if st.st_size == 0:
        raise InvalidImageError(f"{path}: empty file (0 bytes)")
    if st.st_size > max_bytes:
        raise InvalidImageError(f"{path}: file of {st.st_size} bytes exceeds the {max_bytes}-byte limit")
    try:
        # O_NONBLOCK: if the path was swapped for a FIFO after the checks above, open() must not
        # wait for a writer; fstat() of the opened file decides what is read.
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise InvalidImageError(f"{path}: not a regular file")
            data = f.read(max_bytes + 1)
    except OSError as e:
        raise InvalidImageError(f"{path}: cannot read: {e.strerror or e}") from None
    if len(data) > max_bytes:  # it grew after the size check
        raise InvalidImageError(f"{path}: more than the {max_bytes}-byte limit")
    return data


def load_image(
    source: ImageSource,
    *,
    name: str | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> Image.Image:
    """Decode an image safely into an upright 8-bit ``RGB`` or ``RGBA`` PIL image.

    Args:
        source: a path, the encoded bytes, a binary file object, a PIL image, or a numpy
            ``uint8`` array of shape (H, W, 3) RGB or (H, W, 4) RGBA or (H, W) greyscale.
        name: how to call the image in error messages (default: the path, or ``"<image>"``).
        max_pixels: pixel-count limit (width x height) against decompression bombs.
        max_bytes: file-size limit in bytes for paths.

    Returns:
        A fully decoded PIL image of mode ``"RGB"`` or ``"RGBA"``, EXIF orientation applied.

    Raises:
        InvalidImageError: the source is not one decodable, single-frame image within the limits.
    """
    label = name or (str(source) if isinstance(source, (str, os.PathLike)) else "<image>")
    if isinstance(source, np.ndarray):
        return _from_array(source, label, max_pixels)
    if isinstance(source, Image.Image):
        im = source
        _check_pixels(im, label, max_pixels)
        if getattr(im, "n_frames", 1) > 1 and im.format != "MPO":  # MPO: its primary picture, see below
            raise InvalidImageError(f"{label}: has {im.n_frames} frames; give a single still image")
        return _normalise(ImageOps.exif_transpose(im), label)
    if isinstance(source, (str, os.PathLike)):
        data = read_image_bytes(source, max_bytes)
    elif isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    elif hasattr(source, "read"):
        data = source.read(max_bytes + 1)
    else:
        raise InvalidImageError(f"{label}: unsupported image source type {type(source).__name__}")
    if len(data) == 0:
        raise InvalidImageError(f"{label}: empty file (0 bytes)")
    if len(data) > max_bytes:
        raise InvalidImageError(f"{label}: more than the {max_bytes}-byte limit")
    return decode_image_bytes(data, label, max_pixels=max_pixels)


def decode_image_bytes(data: bytes, label: str = "<image>", *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode encoded image bytes; see :func:`load_image` for the rules and errors."""
    try:
        with warnings.catch_warnings():
            # Our own pixel limit is stricter than PIL's warning threshold; turn PIL's bomb
            # warning into an error so it can never be silently ignored.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            _check_pixels(im, label, max_pixels)
            _check_aspect(im, label)
            n_frames = getattr(im, "n_frames", 1)
            # A multi-picture JPEG (MPO: what phones write, with previews or gain maps after the
            # photo) is shown by every viewer as its primary picture, frame 0: use that one.
            if n_frames > 1 and im.format != "MPO":
                raise InvalidImageError(f"{label}: has {n_frames} frames (animation or multi-page); give a single still image")
            im.load()
    except InvalidImageError:
        raise
    except UnidentifiedImageError:
        raise InvalidImageError(f"{label}: not a recognised image format") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise InvalidImageError(f"{label}: too many pixels, refused as a decompression bomb ({e})") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, struct.error) as e:
        raise InvalidImageError(f"{label}: corrupt or truncated image ({e})") from None
    ImageOps.exif_transpose(im, in_place=True)  # no copy of a large photo
    return _normalise(im, label)


def _check_aspect(im: Image.Image, label: str) -> None:
    w, h = im.size
    if max(w, h) > MAX_FILE_ASPECT_RATIO * min(w, h):
        raise InvalidImageError(
            f"{label}: {w}x{h} pixels is an aspect ratio over {MAX_FILE_ASPECT_RATIO:g}:1; "
            f"give a photo of the product (crop the image)"
        )


def _check_pixels(im: Image.Image, label: str, max_pixels: int) -> None:
    w, h = im.size
    if w <= 0 or h <= 0:
        raise InvalidImageError(f"{label}: has no pixels ({w}x{h})")
    if w * h > max_pixels:
        raise InvalidImageError(
            f"{label}: {w}x{h} = {w * h} pixels exceeds the limit of {max_pixels} (decompression bomb guard)"
        )


def _has_transparency(im: Image.Image) -> bool:
    return im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (im.mode == "P" and "transparency" in im.info) or (
        im.mode in ("L", "RGB") and "transparency" in im.info
    )


def _normalise(im: Image.Image, label: str) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB or RGBA (see module docstring)."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(im)
        if im.mode == "F":
            lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
            scale = 255.0 / (hi - lo) if hi > lo else 0.0
            arr8 = ((arr - lo) * scale).clip(0, 255).astype(np.uint8)
        else:  # 16-bit samples (PNG 16-bit greyscale decodes as I;16 or I)
            arr8 = (arr.astype(np.uint32).clip(0, 65535) // 257).astype(np.uint8)
        return Image.fromarray(arr8, "L").convert("RGB")
    transparent = _has_transparency(im)
    target = "RGBA" if transparent else "RGB"
    if im.mode == target:
        return im
    try:
        return im.convert(target)
    except (OSError, ValueError) as e:
        raise InvalidImageError(f"{label}: cannot convert image mode {im.mode} to {target} ({e})") from None


def _from_array(arr: np.ndarray, label: str, max_pixels: int) -> Image.Image:
    if arr.dtype != np.uint8:
        raise InvalidImageError(f"{label}: numpy image must be uint8, got {arr.dtype}")
    if arr.ndim == 2:
        im = Image.fromarray(arr, "L").convert("RGB")
    elif arr.ndim == 3 and arr.shape[2] in (3, 4):
        im = Image.fromarray(np.ascontiguousarray(arr), "RGB" if arr.shape[2] == 3 else "RGBA")
    else:
        raise InvalidImageError(f"{label}: numpy image must have shape (H, W), (H, W, 3) or (H, W, 4), got {arr.shape}")
    _check_pixels(im, label, max_pixels)
    return im


#: Widest aspect ratio (long side / short side) an encoder's preprocessing is given; beyond it
#: the image is padded with transparency (see :func:`limit_aspect_ratio`).
MAX_ASPECT_RATIO = 8.0
#: Longest side of an image padded by :func:`limit_aspect_ratio`, in pixels (it is downscaled
#: first when longer).
MAX_PADDED_SIDE = 4096


def limit_aspect_ratio(
    image: Image.Image, max_ratio: float = MAX_ASPECT_RATIO, max_side: int = MAX_PADDED_SIDE
) -> Image.Image:
    """Bound an image's aspect ratio before an encoder's resize, so that preprocessing memory is
    bounded for every shape.

    Encoders resize the *short* side to their input size (e.g. 256 px, then a 224 px centre
    crop): a 1 x 20000 strip would become a 256 x 5,120,000 image (15 GB as float32) before the
    crop.  An image whose long side is more than ``max_ratio`` times its short side is therefore
    downscaled (keeping its shape, each side at least 1 px) until its long side is at most
    ``max_side``, then padded with transparent pixels (composited onto the encoder's background
    like any transparent area) to exactly ``max_ratio``, centred.  Images within the ratio are
    returned unchanged (the same object), so ordinary photos are preprocessed exactly as before.

    Bound: after this, an image has at most ``max_side`` x ``max_side / max_ratio`` pixels
    (4096 x 512 = 2 MP by default) and the encoder's resized image at most ``max_ratio`` x its
    input size squared pixels (e.g. 2048 x 256 for a 256 px resize).

    Args:
        image: PIL image of mode ``RGB`` or ``RGBA``.
        max_ratio: widest accepted long / short side ratio (>= 1).
        max_side: longest side in pixels of a padded result.

    Returns:
        ``image`` itself, or a new ``RGBA`` image of aspect ratio ``max_ratio`` (within 1 px).
    """
    w, h = image.size
    long, short = max(w, h), min(w, h)
    if long <= max_ratio * short:
        return image
    if long > max_side:
        scale = max_side / long
        size = (max_side, max(1, round(h * scale))) if w >= h else (max(1, round(w * scale)), max_side)
        image = image.resize(size, Image.BILINEAR, reducing_gap=3.0)
        w, h = image.size
        long = max(w, h)
    pad_short = max(1, round(long / max_ratio))
    canvas_size = (w, pad_short) if w >= h else (pad_short, h)
    canvas = Image.new("RGBA", canvas_size, (0, 0, 0, 0))
    offset = (0, (pad_short - h) // 2) if w >= h else ((pad_short - w) // 2, 0)
    canvas.paste(image.convert("RGBA"), offset)
    return canvas


def to_rgb(image: Image.Image, background: tuple[int, int, int] = DEFAULT_BACKGROUND) -> Image.Image:
    """Composite an ``RGBA`` image (e.g. a segment crop, alpha 0 outside its mask) onto a flat
    background; ``RGB`` images are returned unchanged.

    Fully transparent pixels become exactly ``background``, opaque ones keep their colour, partly
    transparent ones are blended (``alpha * colour + (1 - alpha) * background``).

    Args:
        image: PIL image of mode ``RGB`` or ``RGBA`` (as returned by :func:`load_image`).
        background: RGB colour, 0-255, that fully transparent pixels become (default
            :data:`DEFAULT_BACKGROUND`, grey 128, the measured choice).

    Returns:
        A PIL ``RGB`` image of the same size.
    """
    if image.mode == "RGB":
        return image
    if image.mode != "RGBA":
        image = image.convert("RGBA")
    canvas = Image.new("RGB", image.size, background)
    canvas.paste(image, mask=image.getchannel("A"))
    return canvas
