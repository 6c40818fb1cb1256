"""The recognizer: image -> segments -> crops -> embeddings -> 1-NN -> recognitions.

POS software opens a catalog once and calls :meth:`Recognizer.recognize` from any number of
threads::

    from retailklip import Recognizer
    rec = Recognizer.open("/var/lib/retailklip/catalog")
    for r in rec.recognize("tray.jpg"):
        print(r.sku or "unknown", r.distance, r.bbox)

Changes to the catalog (``catalog add`` / ``remove`` from any process) are picked up on the next
call: each call reads the catalog's generation counter (one small query) and, when it changed,
applies the difference to the in-memory FAISS index (new vectors added, removed ones dropped).
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from PIL import Image

from .errors import EmptyCatalogError
from .images import ImageSource, load_image
from .index import DEFAULT_FACTORY, VectorIndex
from .matching import Neighbour, SKUMatcher

if TYPE_CHECKING:  # pragma: no cover
    from catalog.store import Catalog

logger = logging.getLogger(__name__)


class SegmentLike(Protocol):
    """What a segmenter yields per segment (see :mod:`retailklip.segment`)."""

    mask: np.ndarray  # bool (H, W)
    bbox: tuple[int, int, int, int]  # (x0, y0, x1, y1) pixels
    score: float
    crop: Image.Image  # RGBA, alpha 0 outside the mask


class SegmenterLike(Protocol):
    def segment(self, image: Image.Image) -> list[SegmentLike]: ...


@dataclass(frozen=True)
class Recognition:
    """One recognised segment of an image.

    Attributes:
        sku: the recognised SKU id, or None ("unknown") when the nearest SKU is farther than
            the threshold.
        nearest_sku: the 1-NN SKU id, always set.
        name: display name of ``nearest_sku``.
        distance: cosine distance (in [0, 2]) from the segment's embedding to ``nearest_sku``.
        threshold: the cosine-distance threshold applied.
        runner_up: the nearest other SKU and its distance (None with a one-SKU catalog).
        bbox: (x0, y0, x1, y1) of the segment in image pixels, x1/y1 exclusive.
        mask: bool (H, W) segment mask in image pixels, or None for a whole-image recognition.
        score: the segmenter's quality score of the segment (1.0 for the whole image).
    """

    sku: str | None
    nearest_sku: str
    name: str | None
    distance: float
    threshold: float
    runner_up: Neighbour | None
    bbox: tuple[int, int, int, int]
    mask: np.ndarray | None = field(default=None, repr=False, compare=False)
    score: float = 1.0

    @property
    def known(self) -> bool:
        """True when :attr:`sku` is set (the match is within the threshold)."""
        return self.sku is not None

    def to_dict(self) -> dict[str, Any]:
        """The JSON form used by ``catalog recognize --json``."""
        return {
            "sku": self.sku,
            "nearest_sku": self.nearest_sku,
            "name": self.name,
            "distance": round(self.distance, 6),
            "runner_up": (
                {"sku": self.runner_up.sku, "distance": round(self.runner_up.distance, 6)} if self.runner_up else None
            ),
            "bbox": list(self.bbox),
            "score": round(float(self.score), 6),
        }


class Recognizer:
    """Recognises SKUs in images against a catalog (see module docstring).

    Args:
        catalog: an open :class:`catalog.store.Catalog`.
        threshold: cosine-distance threshold in [0, 2]; default: the catalog's.
        segmenter: object with ``segment(image) -> list[Segment]`` (see
            :func:`retailklip.segment.load_segmenter`); default: the catalog's remembered
            segmenter, else the whole image is one segment.
        index_factory: FAISS factory string of the in-memory index (default exact ``"Flat"``).

    Thread safety: :meth:`recognize` may be called from many threads at once; catalog changes
    are applied under a lock, and each search sees one complete catalog version.
    """

    def __init__(
        self,
        catalog: "Catalog",
        *,
        threshold: float | None = None,
        segmenter: SegmenterLike | None = None,
        index_factory: str = DEFAULT_FACTORY,
    ) -> None:
        self.catalog = catalog
        self._threshold = threshold
        self.segmenter = segmenter
        self.index_factory = index_factory
        self._lock = threading.RLock()
        self._generation: int | None = None
        self._identity_key: str | None = None
        self._matcher: SKUMatcher | None = None
        self._names: dict[str, str | None] = {}
        self._catalog_threshold = 0.0

    @classmethod
    def open(
        cls,
        catalog_dir: str | os.PathLike,
        *,
        db_url: str | None = None,
        device: str = "cpu",
        threshold: float | None = None,
        segmenter: SegmenterLike | str | None = None,
        checkpoint: str | None = None,
    ) -> "Recognizer":
        """Open the catalog in ``catalog_dir`` and build a recognizer on it.

        Args:
            segmenter: a segmenter object, or a segmenter name for
                :func:`retailklip.segment.load_segmenter` (with ``checkpoint``); default: the
                catalog's remembered segmenter, if any.

        Raises:
            CatalogError: no catalog there.
        """
        from catalog.store import Catalog

        cat = Catalog.open(catalog_dir, db_url=db_url, device=device)
        if segmenter is None:
            st = cat.settings()
            if st["segmenter"]:
                segmenter, checkpoint = st["segmenter"], checkpoint or st["segmenter_checkpoint"]
        if isinstance(segmenter, str):
            from .segment import load_segmenter

            segmenter = load_segmenter(segmenter, checkpoint=checkpoint, device=device)
        return cls(cat, threshold=threshold, segmenter=segmenter)

    # ------------------------------------------------------------------ index sync
    def refresh(self) -> None:
        """Bring the in-memory index up to date with the catalog (cheap when nothing changed)."""
        gen = self.catalog.generation
        if gen == self._generation:
            return
        with self._lock:
            gen = self.catalog.generation
            if gen == self._generation:
                return
            ident = self.catalog.encoder_identity()
            ids, skus = self.catalog.embedding_table()
            if self._matcher is None or ident.key != self._identity_key:
                index = VectorIndex(ident.dim, self.index_factory)
                current = np.zeros(0, np.int64)
            else:
                index = self._matcher.index
                current = index.ids()
            new = np.setdiff1d(ids, current, assume_unique=True)
            gone = np.setdiff1d(current, ids, assume_unique=True)
            index.remove(gone)
            if len(new):
                index.add(new, self.catalog.vectors(new, ident.dim))
            self._matcher = SKUMatcher(index, dict(zip(ids.tolist(), skus)))
            self._names = self.catalog.names()
            self._catalog_threshold = self.catalog.threshold
            self._identity_key = ident.key
            self._generation = gen
            logger.debug("index synced to generation %d: +%d -%d vectors, %d total", gen, len(new), len(gone), index.ntotal)

    @property
    def threshold(self) -> float:
        """The cosine-distance threshold in use."""
        return self._threshold if self._threshold is not None else self._catalog_threshold

    # ------------------------------------------------------------------ recognition
    def recognize(self, image: ImageSource) -> list[Recognition]:
        """Recognise the products in one image.

        Args:
            image: a path, bytes, PIL image (any mode; EXIF orientation applied) or uint8
                numpy array (H, W, 3).

        Returns:
            One :class:`Recognition` per kept segment (with no segmenter: one for the whole
            image), in the segmenter's order.

        Raises:
            InvalidImageError: the image cannot be decoded.
            EmptyCatalogError: the catalog holds no SKU.
            EncoderMismatchError: the encoder's weights changed since the vectors were made.
        """
        return self.recognize_segments(image)[0]

    def recognize_segments(self, image: ImageSource) -> tuple[list[Recognition], list[SegmentLike]]:
        """Like :meth:`recognize`, also returning the segments (with their RGBA crops), e.g. to
        save them; with no segmenter the segment list is empty."""
        im = load_image(image)
        encoder = self.catalog.encoder()
        self.refresh()
        if self._matcher is None or self._matcher.index.ntotal == 0:
            raise EmptyCatalogError("the catalog holds no SKU; add one with `catalog add IMAGE`")
        if self.segmenter is None:
            queries = encoder.embed([im])
            return self._recognitions(queries, [(0, 0, im.width, im.height)], [None], [1.0]), []
        segments = self.segmenter.segment(im)
        if not segments:
            return [], []
        queries = encoder.embed([s.crop for s in segments])
        boxes = [tuple(int(v) for v in s.bbox) for s in segments]
        return self._recognitions(queries, boxes, [s.mask for s in segments], [float(s.score) for s in segments]), segments

    def _recognitions(self, queries, boxes, masks, scores) -> list[Recognition]:
        with self._lock:  # one consistent catalog version for the whole image
            matches = self._matcher.match(queries, self.threshold)
            names, threshold = self._names, self.threshold
        return [
            Recognition(
                sku=m.nearest.sku if m.known else None,
                nearest_sku=m.nearest.sku,
                name=names.get(m.nearest.sku),
                distance=m.nearest.distance,
                threshold=threshold,
                runner_up=m.runner_up,
                bbox=b,
                mask=mk,
                score=sc,
            )
            for m, b, mk, sc in zip(matches, boxes, masks, scores)
        ]
