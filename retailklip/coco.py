"""COCO instance annotations: reading a file, decoding its masks, the boxes of one photo.

The format is COCO's object-detection format (Lin et al., "Microsoft COCO: Common Objects in
Context", ECCV 2014; https://cocodataset.org/#format-data), as pycocotools reads it::

    {"images":      [{"id": 1, "file_name": "tray_000.jpg", "width": 1920, "height": 1080}, ...],
     "categories":  [{"id": 7, "name": "Oatly-Oat-Milk"}, ...],
     "annotations": [{"id": 1, "image_id": 1, "category_id": 7, "bbox": [x, y, w, h],
                      "segmentation": RLE or polygons}, ...]}

``bbox`` is ``[x, y, width, height]`` in pixels; ``segmentation`` is a list of polygons
(``[[x0, y0, x1, y1, ...], ...]``), an uncompressed RLE (``{"size": [h, w], "counts": [..]}``)
or a compressed one (``counts`` a string); all three are decoded by ``pycocotools.mask``
(``frPyObjects`` / ``decode``, as ``COCO.annToRLE``; extra ``pip install 'retailklip[coco]'``).  For the tray
evaluation a category's ``name`` is the SKU id in the catalog.

:func:`read_boxes` reads the ``--boxes FILE`` of ``catalog recognize``: either a JSON list of
``[x0, y0, x1, y1]`` pixel boxes, or a COCO file whose image of the photo's file name gives the
boxes (:meth:`BoxFile.boxes_for`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import RetailKlipError


class CocoError(RetailKlipError, ValueError):
    """A COCO annotation file or box file that cannot be used (missing, not JSON, a missing or
    malformed field); the message names the file and the entry."""


@dataclass(frozen=True)
class CocoAnnotation:
    """One annotated object.

    Attributes:
        id: the annotation's id.
        category: its category's ``name`` (the SKU id for tray evaluation).
        bbox: ``(x, y, width, height)`` pixels, COCO's order.
        segmentation: the raw ``segmentation`` entry (polygons or RLE), or None.
    """

    id: int
    category: str
    bbox: tuple[float, float, float, float]
    segmentation: object = field(default=None, repr=False)

    @property
    def xyxy(self) -> tuple[float, float, float, float]:
        """The box as ``(x0, y0, x1, y1)`` pixels."""
        x, y, w, h = self.bbox
        return (x, y, x + w, y + h)


@dataclass(frozen=True)
class CocoImage:
    """One annotated photo: ``file_name`` (relative to the images directory), its size in
    pixels and its annotations in file order."""

    id: int
    file_name: str
    width: int
    height: int
    annotations: tuple[CocoAnnotation, ...]


@dataclass(frozen=True)
class CocoDataset:
    """A parsed COCO file: ``path``, the photos in file order, category id -> name."""

    path: Path
    images: tuple[CocoImage, ...]
    categories: dict[int, str]

    def find_image(self, name: str | os.PathLike) -> CocoImage:
        """The image whose ``file_name`` is ``name``, or ends in its base name.

        Raises:
            CocoError: no such image, or several with that base name.
        """
        name = str(name)
        exact = [im for im in self.images if im.file_name == name]
        if len(exact) == 1:
            return exact[0]
        base = Path(name).name
        found = [im for im in self.images if Path(im.file_name).name == base]
        if not found:
            raise CocoError(f"{self.path}: no image with file_name {base!r}")
        if len(found) > 1:
            raise CocoError(f"{self.path}: {len(found)} images named {base!r}; give the file_name's full path")
        return found[0]


def _load_json(path: Path, what: str) -> object:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CocoError(f"{what} {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CocoError(f"{what} {path}: cannot read it: {e}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise CocoError(f"{what} {path}: not JSON ({e.msg} at line {e.lineno})") from None


def _number(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
        raise CocoError(f"{where}: expected a finite number, got {value!r}")
    return float(value)


def _int(entry: dict, key: str, where: str) -> int:
    value = entry.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise CocoError(f"{where}: {key!r} must be an integer, got {value!r}")
    return value


def parse_coco(data: object, path: str | os.PathLike = "<COCO>") -> CocoDataset:
    """Parse COCO instance annotations already loaded from JSON (see module docstring).

    Args:
        data: the JSON object.
        path: the file's name, for messages.

    Returns:
        A :class:`CocoDataset`.

    Raises:
        CocoError: not an object with ``images``, ``annotations`` and ``categories`` lists; an
            entry without its required fields; an annotation of an unknown image or category;
            a duplicate image id; a bbox that is not four numbers with width, height > 0.
    """
    path = Path(path)
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "annotations", "categories")):
        raise CocoError(f"{path}: not a COCO annotation file (an object with lists 'images', 'annotations', 'categories')")
    categories: dict[int, str] = {}
    for n, c in enumerate(data["categories"]):
        where = f"{path}: categories[{n}]"
        if not isinstance(c, dict) or not isinstance(c.get("name"), str) or not c["name"]:
            raise CocoError(f"{where}: needs an integer 'id' and a non-empty 'name'")
        categories[_int(c, "id", where)] = c["name"]
    images: dict[int, dict] = {}
    for n, im in enumerate(data["images"]):
        where = f"{path}: images[{n}]"
        if not isinstance(im, dict) or not isinstance(im.get("file_name"), str) or not im["file_name"]:
            raise CocoError(f"{where}: needs 'id', 'file_name', 'width', 'height'")
        image_id = _int(im, "id", where)
        if image_id in images:
            raise CocoError(f"{where}: duplicate image id {image_id}")
        images[image_id] = dict(im, annotations=[], width=_int(im, "width", where), height=_int(im, "height", where))
    for n, a in enumerate(data["annotations"]):
        where = f"{path}: annotations[{n}]"
        if not isinstance(a, dict):
            raise CocoError(f"{where}: not an object")
        image_id, category_id = _int(a, "image_id", where), _int(a, "category_id", where)
        if image_id not in images:
            raise CocoError(f"{where}: image_id {image_id} is not in 'images'")
        if category_id not in categories:
            raise CocoError(f"{where}: category_id {category_id} is not in 'categories'")
        bbox = a.get("bbox")
        if not isinstance(bbox, list) or len(bbox) != 4:
            raise CocoError(f"{where}: 'bbox' must be [x, y, width, height], got {bbox!r}")
        x, y, w, h = (_number(v, f"{where} bbox") for v in bbox)
        if w <= 0 or h <= 0:
            raise CocoError(f"{where}: bbox width and height must be > 0, got {bbox!r}")
        ann_id = a.get("id", n)
        images[image_id]["annotations"].append(
            CocoAnnotation(int(ann_id), categories[category_id], (x, y, w, h), a.get("segmentation"))
        )
    parsed = tuple(
        CocoImage(i, im["file_name"], im["width"], im["height"], tuple(im["annotations"])) for i, im in images.items()
    )
    return CocoDataset(path, parsed, categories)


def read_coco(path: str | os.PathLike) -> CocoDataset:
    """Read a COCO instance annotation file (:func:`parse_coco`).

    Raises:
        CocoError: missing, unreadable or not JSON, or malformed (see :func:`parse_coco`).
    """
    path = Path(path)
    return parse_coco(_load_json(path, "COCO file"), path)


def decode_segmentation(annotation: CocoAnnotation, height: int, width: int) -> np.ndarray:
    """The mask of an annotation: polygons, uncompressed or compressed RLE (pycocotools).

    Args:
        annotation: the annotation; without a ``segmentation`` its bbox is the mask.
        height, width: the photo's size in pixels.

    Returns:
        bool (height, width).

    Raises:
        CocoError: a malformed segmentation, an RLE of another size, or an empty mask.
        ImportError: pycocotools is not installed (message: the pip command).
    """
    try:
        from pycocotools import mask as mask_utils
    except ImportError:
        raise ImportError("COCO masks need pycocotools: pip install 'retailklip[coco]' (or pip install pycocotools)") from None
    segm, where = annotation.segmentation, f"annotation {annotation.id}"
    if segm is None or segm == []:
        x0, y0, x1, y1 = annotation.xyxy
        mask = np.zeros((height, width), dtype=bool)
        mask[max(int(y0), 0):int(np.ceil(y1)), max(int(x0), 0):int(np.ceil(x1))] = True
    else:
        if isinstance(segm, dict):
            size = segm.get("size")
            if not isinstance(size, list) or [int(v) for v in size] != [height, width] or "counts" not in segm:
                raise CocoError(f"{where}: an RLE needs 'counts' and 'size' [{height}, {width}], got size {size!r}")
        elif not (isinstance(segm, list) and all(isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0 for p in segm)):
            raise CocoError(f"{where}: 'segmentation' must be an RLE object or polygons [[x0, y0, x1, y1, x2, y2, ...], ...]")
        try:
            if isinstance(segm, dict) and isinstance(segm["counts"], (str, bytes)):  # compressed RLE
                counts = segm["counts"]
                rle = {"size": [height, width], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
            else:  # polygons, uncompressed RLE (as pycocotools' COCO.annToRLE)
                rles = mask_utils.frPyObjects(segm, height, width)
                rle = mask_utils.merge(rles) if isinstance(rles, list) else rles
            mask = mask_utils.decode(rle).astype(bool)
        except (TypeError, ValueError, OverflowError, UnicodeEncodeError) as e:
            raise CocoError(f"{where}: cannot decode its segmentation: {e}") from None
    if not mask.any():
        raise CocoError(f"{where}: its mask is empty")
    return mask


@dataclass(frozen=True)
class BoxFile:
    """A parsed ``--boxes`` file: a fixed list of boxes, or a COCO dataset (:func:`read_boxes`)."""

    path: Path
    boxes: np.ndarray | None  # float32 (N, 4) x0, y0, x1, y1 for every photo; None for COCO
    coco: CocoDataset | None

    def boxes_for(self, image_name: str | os.PathLike) -> np.ndarray:
        """float32 (N, 4) ``(x0, y0, x1, y1)`` pixel boxes of one photo, N >= 0.

        Raises:
            CocoError: a COCO file without an image of that name.
        """
        if self.coco is None:
            return self.boxes
        image = self.coco.find_image(image_name)
        return np.asarray([a.xyxy for a in image.annotations], dtype=np.float32).reshape(-1, 4)


def read_boxes(path: str | os.PathLike) -> BoxFile:
    """Read a ``--boxes`` file (``catalog recognize``).

    Args:
        path: JSON file: a list of ``[x0, y0, x1, y1]`` pixel boxes (used for every photo: a
            fixed tray layout), or a COCO file (the boxes of the image whose ``file_name`` is
            the photo's, :meth:`CocoDataset.find_image`; ``bbox`` converted from x, y, w, h).

    Returns:
        A :class:`BoxFile`; ``boxes_for(photo)`` gives a photo's boxes.

    Raises:
        CocoError: missing or unreadable file, not JSON, neither a box list nor COCO, or a box
            that is not four numbers with x1 > x0 and y1 > y0.
    """
    path = Path(path)
    data = _load_json(path, "boxes file")
    if isinstance(data, dict):
        return BoxFile(path, None, parse_coco(data, path))
    if not isinstance(data, list):
        raise CocoError(f"boxes file {path}: expected a JSON list of [x0, y0, x1, y1] boxes or a COCO annotation file")
    boxes = []
    for n, box in enumerate(data):
        if not isinstance(box, list) or len(box) != 4:
            raise CocoError(f"boxes file {path}: box {n} is not [x0, y0, x1, y1]: {box!r}")
        x0, y0, x1, y1 = (_number(v, f"boxes file {path}: box {n}") for v in box)
        if x1 <= x0 or y1 <= y0:
            raise CocoError(f"boxes file {path}: box {n} needs x1 > x0 and y1 > y0: {box!r}")
        boxes.append((x0, y0, x1, y1))
    return BoxFile(path, np.asarray(boxes, dtype=np.float32).reshape(-1, 4), None)
