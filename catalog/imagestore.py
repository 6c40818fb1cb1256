"""The catalog's content-addressed image store: ``DIR/images/ab/<sha256>.<ext>``.

A reference image is stored once, under the SHA-256 of its bytes (so one image can be the
reference of one SKU only, and ``catalog check`` can verify and restore files by content).
Files are written atomically (:func:`catalog.fileio.atomic_write`) and only while a writer holds
the catalog's writers' lock (:mod:`catalog.writes`); this module knows paths and files, not the
database.
"""

from __future__ import annotations

import io
import shutil
from collections.abc import Iterable
from pathlib import Path

#: The image store's directory inside a catalog directory.
IMAGES_DIR = "images"
#: File extension of a stored image per PIL format (an MPO photo is stored as the JPEG it is).
_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tif", "MPO": "jpg"}


def image_relpath(sha256: str, ext: str) -> str:
    """The stored file of an image, relative to the catalog directory: ``images/ab/<sha256>.<ext>``
    (``ab``: the hash's first two hex digits, so no directory holds more than 1/256 of the store)."""
    return f"{IMAGES_DIR}/{sha256[:2]}/{sha256}.{ext}"


def image_extension(data: bytes) -> str:
    """The file extension to store encoded image bytes under (``jpg``, ``png``, ...; ``img`` for
    a format without one of its own).  The bytes were decoded before, so this never raises."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            return _EXT.get(im.format or "", "img")
    except Exception:  # noqa: BLE001 - already decoded once; fall back to a neutral extension
        return "img"


def remove_new_entries(root: Path, existing: set[Path] | None) -> None:
    """Undo a failed ``init``: remove ``root`` if it did not exist (``existing`` None), else the
    entries in it that are not in ``existing``."""
    if existing is None:
        shutil.rmtree(root, ignore_errors=True)
        return
    if root.is_dir():
        for p in root.iterdir():
            if p not in existing:
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)


def prune_empty_dirs(files: Iterable[Path]) -> None:
    """Remove the (shard) directories of ``files`` that are now empty."""
    for d in {p.parent for p in files}:
        try:
            d.rmdir()
        except OSError:  # not empty (or gone): keep it
            pass


def unlink_all(paths: Iterable[Path]) -> None:
    """Delete files; missing ones are fine."""
    for p in paths:
        p.unlink(missing_ok=True)
