"""The recognizer: image -> segments -> crops -> embeddings -> 1-NN -> recognitions.

POS software opens a catalog once and calls :meth:`Recognizer.recognize` from any number of
threads::

    from retailklip import Recognizer
    rec = Recognizer.open("/var/lib/retailklip/catalog")
    for r in rec.recognize("tray.jpg"):
        print(r.sku or "unknown", r.distance, r.bbox)

Changes to the catalog are picked up on the next call: each call reads the catalog's state (one
small query: generation, active encoder, active index version, threshold).  When ``catalog add``
/ ``remove`` changed it, the difference is applied to the in-memory FAISS index (new vectors
added, removed ones dropped).  When ``catalog rebuild`` / ``rollback`` switched the active
version, the new version's index snapshot is loaded *beside* the old one and swapped in at once,
together with its encoder: a search sees one catalog version, never a mix.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from PIL import Image

from .errors import EmptyCatalogError, RetailKlipError
from .images import ImageSource, load_image
from .index import VectorIndex
from .matching import Match, Neighbour, SKUMatcher, score_of, switched_to, switches_to
from .open_set import (
    DEFAULT_OPEN_SET_SCORE,
    OUTLIER_SCORE,
    check_score,
    no_outliers_error,
)

if TYPE_CHECKING:  # pragma: no cover
    from .gallery import Gallery

logger = logging.getLogger(__name__)


class SegmentLike(Protocol):
    """What a segmenter yields per segment (see :mod:`retailklip.segment`)."""

    mask: np.ndarray  # bool (H, W)
    bbox: tuple[int, int, int, int]  # (x0, y0, x1, y1) pixels
    score: float
    crop: Image.Image  # RGBA, alpha 0 outside the mask


class SegmenterLike(Protocol):
    """What the recognizer needs of a segmenter: ``segment(image)`` of the decoded photo (an
    upright ``RGB``/``RGBA`` PIL image from :func:`retailklip.images.load_image`).  A segmenter
    that also has ``segment_image(image)`` (every :mod:`retailklip.segment` segmenter: their
    ``segment`` decodes its input first) is called through that, so the photo is decoded once.
    Box / point prompts (``recognize(image, boxes=...)``) go to ``segment_prompts(image, boxes=,
    points=)`` where the segmenter has it."""

    def segment(self, image: Image.Image) -> list[SegmentLike]: ...


@dataclass(frozen=True)
class Recognition:
    """One recognised segment of an image.

    Attributes:
        sku: the recognised SKU id, or None ("unknown") when the open-set score is above the
            threshold.
        nearest_sku: the 1-NN SKU id, always set (with hubness reduction, :mod:`retailklip.hubness`:
            the SKU of smallest adjusted distance, which need not be the closest one).
        name: display name of ``nearest_sku``.
        distance: cosine distance (in [0, 2]) from the segment's embedding to ``nearest_sku``.
        threshold: the threshold applied, on ``open_set_score``.
        runner_up: the nearest other SKU and its distance (None with a one-SKU catalog; with
            hubness reduction the second by adjusted distance, which may be closer than
            ``nearest_sku``).
        bbox: (x0, y0, x1, y1) of the segment in image pixels, x1/y1 exclusive.
        mask: bool (H, W) segment mask in image pixels, or None for a whole-image recognition.
        score: the segmenter's quality score of the segment (1.0 for the whole image).
        open_set_score: the score ``threshold`` is on: ``"distance"`` (``distance``),
            ``"ratio"`` (:attr:`ratio`) or ``"outlier-ratio"`` (:attr:`outlier_ratio`); see
            :mod:`retailklip.open_set`.
        outlier_distance: cosine distance in [0, 2] from the segment's embedding to the nearest
            outlier reference (a product not in the catalog, never a match); None when the
            catalog has no outlier references.
        adjusted_distance: with hubness reduction, ``distance`` plus the chosen vector's CSLS
            offset, by which the SKUs were ranked (the ``ratio`` score is on these); None with
            plain 1-NN.
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
    open_set_score: str = DEFAULT_OPEN_SET_SCORE
    outlier_distance: float | None = None
    adjusted_distance: float | None = None

    @property
    def known(self) -> bool:
        """True when :attr:`sku` is set (the match is within the threshold)."""
        return self.sku is not None

    @property
    def ratio(self) -> float:
        """Lowe's ratio ``distance / runner_up.distance`` in [0, 1] (runner-up distance 2 with a
        one-SKU catalog; :func:`retailklip.open_set.distance_ratio`); with hubness reduction the
        ratio of the adjusted distances (:attr:`adjusted_distance`)."""
        return score_of(self._match(), "ratio")

    @property
    def outlier_ratio(self) -> float | None:
        """``distance / outlier_distance`` in [0, inf) (:func:`retailklip.open_set.outlier_ratio`;
        above 1 an outlier product is nearer than every SKU); None without outlier references."""
        if self.outlier_distance is None:
            return None
        return score_of(self._match(), OUTLIER_SCORE)

    def _match(self) -> Match:
        """This recognition as the matcher's :class:`~retailklip.matching.Match` (for
        :func:`~retailklip.matching.score_of`: one place decides what each score is on)."""
        nearest = Neighbour(self.nearest_sku, self.distance, self.adjusted_distance)
        return Match(nearest, self.runner_up, self.known, self.outlier_distance)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form used by ``catalog recognize --json`` (``outlier_distance`` and
        ``outlier_ratio`` only when the catalog has outlier references; an infinite ratio, a
        segment identical to an outlier reference, is written as the string ``"inf"``;
        ``adjusted_distance``, also the runner-up's, only with hubness reduction)."""
        d = {
            "sku": self.sku,
            "nearest_sku": self.nearest_sku,
            "name": self.name,
            "distance": round(self.distance, 6),
            "ratio": round(self.ratio, 6),
            "open_set_score": self.open_set_score,
            "threshold": round(float(self.threshold), 6),
            "runner_up": (
                {"sku": self.runner_up.sku, "distance": round(self.runner_up.distance, 6)} if self.runner_up else None
            ),
            "bbox": list(self.bbox),
            "score": round(float(self.score), 6),
        }
        if self.adjusted_distance is not None:
            d["adjusted_distance"] = round(float(self.adjusted_distance), 6)
            if self.runner_up is not None and self.runner_up.adjusted is not None:
                d["runner_up"]["adjusted_distance"] = round(float(self.runner_up.adjusted), 6)
        if self.outlier_distance is not None:
            r = self.outlier_ratio
            d["outlier_distance"] = round(float(self.outlier_distance), 6)
            d["outlier_ratio"] = round(r, 6) if np.isfinite(r) else "inf"
        return d


@dataclass(frozen=True)
class _View:
    """One catalog version as the recognizer serves it (replaced as a whole, never mutated
    except by :meth:`Recognizer.refresh` under the recognizer's lock)."""

    generation: int
    encoder_id: int
    version_id: int | None
    encoder: Any
    matcher: SKUMatcher
    present: np.ndarray  # int64 ids in the index (including vectors of removed SKUs it cannot delete)
    names: dict
    threshold: float
    open_set_score: str
    outlier_present: np.ndarray  # int64 ids in the matcher's outlier index
    hubness: Any = None  # the gallery's retailklip.hubness.HubnessReference of this encoder, or None


class Recognizer:
    """Recognises SKUs in images against a catalog (see module docstring).

    Args:
        catalog: a :class:`retailklip.gallery.Gallery`, e.g. an open :class:`catalog.store.Catalog`.
        threshold: threshold on ``open_set_score``; default: the catalog's threshold, on the
            catalog's score.
        open_set_score: the score ``threshold`` is on, ``"distance"`` (cosine distance in
            [0, 2]), ``"ratio"`` or ``"outlier-ratio"`` (:mod:`retailklip.open_set`; needs the
            catalog's outlier references); default: ``"distance"`` when
            ``threshold`` is given (what a bare threshold always meant), else the catalog's;
            only together with ``threshold``.
        segmenter: object with ``segment(image) -> list[Segment]`` (see
            :func:`retailklip.segment.load_segmenter`); default: the catalog's remembered
            segmenter, else the whole image is one segment.

    The index is the catalog's active index version (``catalog versions``) plus the SKUs added
    since it was built; its type (exact Flat, HNSW, IVF-PQ) is chosen by ``catalog rebuild``.

    Thread safety: :meth:`recognize` may be called from many threads at once; catalog changes
    are applied under a lock, and each search sees one complete catalog version.
    """

    def __init__(
        self,
        catalog: Gallery,
        *,
        threshold: float | None = None,
        segmenter: SegmenterLike | None = None,
        open_set_score: str | None = None,
    ) -> None:
        self.catalog = catalog
        self._threshold = threshold
        if open_set_score is not None:
            check_score(open_set_score)
            if threshold is None:
                raise RetailKlipError("an open-set score goes with the threshold on it: give threshold too")
        elif threshold is not None:
            open_set_score = DEFAULT_OPEN_SET_SCORE
        self._score = open_set_score  # None: the catalog's, with the catalog's threshold
        self.segmenter = segmenter
        self._lock = threading.Lock()  # guards searches and in-place index updates
        self._refresh_lock = threading.Lock()  # one refresher at a time
        self._view: _View | None = None

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
        segmenter_options: dict | None = None,
        open_set_score: str | None = None,
    ) -> Recognizer:
        """Open the catalog in ``catalog_dir`` and build a recognizer on it.

        Args:
            segmenter: a segmenter object, or a segmenter name for
                :func:`retailklip.segment.load_segmenter` (with ``checkpoint``); default: the
                catalog's remembered segmenter, if any.
            segmenter_options: automatic mask generation parameters for a named segmenter
                (fields of :class:`retailklip.segment.MaskGeneratorOptions`, e.g.
                ``{"points_per_side": 16}``).
            threshold, open_set_score: as in :class:`Recognizer`.

        Raises:
            CatalogError: no catalog there.
        """
        from .gallery import open_gallery

        cat = open_gallery(catalog_dir, db_url=db_url, device=device)
        if segmenter is None:
            st = cat.settings()
            if st["segmenter"]:
                segmenter, checkpoint = st["segmenter"], checkpoint or st["segmenter_checkpoint"]
        if isinstance(segmenter, str):
            from .segment import MaskGeneratorOptions, load_segmenter

            options = MaskGeneratorOptions(**segmenter_options) if segmenter_options else None
            segmenter = load_segmenter(segmenter, checkpoint=checkpoint, device=device, generator_options=options)
        elif segmenter_options:
            raise RetailKlipError("segmenter options need a named segmenter (--segment NAME)")
        return cls(cat, threshold=threshold, segmenter=segmenter, open_set_score=open_set_score)

    # ------------------------------------------------------------------ index sync
    def refresh(self) -> None:
        """Bring the in-memory index up to date with the catalog (one small query when nothing
        changed)."""
        self._current()

    def _current(self) -> _View:
        snap = self.catalog.snapshot()
        view = self._view
        if view is not None and view.generation == snap.generation:
            return view
        with self._refresh_lock:
            view = self._view
            snap = self.catalog.snapshot()
            if view is not None and view.generation == snap.generation:
                return view
            if view is None or (view.encoder_id, view.version_id) != (snap.encoder_id, snap.version_id):
                new = self._load(snap)  # built beside the old view, swapped in below
                with self._lock:
                    self._view = new
            else:
                self._apply_changes(view, snap)
            return self._view

    def _load(self, snap) -> _View:
        """A fresh view: the active version's index snapshot plus changes made since."""
        encoder = self.catalog.encoder_for(snap.encoder_id)
        try:
            if snap.version_id is None:  # a catalog from before index versions: all from the database
                index = VectorIndex(encoder.dim)
            else:
                index = self.catalog.load_index(snap.version_id)
        except RetailKlipError as e:
            # The database holds every vector: keep recognising (exactly, from the database)
            # while the index files are repaired.
            logger.error("%s; serving from the database's vectors instead", e)
            index = VectorIndex(encoder.dim)
        ids, skus = self.catalog.embedding_table(snap.encoder_id)
        present = index.ids()
        new, vectors, gone = self._changes(present, ids, index.dim)
        present = self._apply(index, present, new, vectors, gone)  # not shared yet: no lock
        outliers = VectorIndex(index.dim)  # exact; outlier references are few (products not sold here)
        o_present = self._apply(outliers, np.zeros(0, np.int64), *self._outlier_changes(snap.encoder_id, np.zeros(0, np.int64), index.dim))
        hubness = self._hubness(snap.encoder_id, index.dim)
        offsets = None
        if hubness is not None:
            stored = self._stored_offsets(snap.version_id, hubness)
            offsets = self._offsets(hubness, ids, index.dim, stored, new, vectors)
        logger.debug("loaded index version %s (%d vectors, +%d since the snapshot; %d outlier vectors; hubness "
                     "reduction %s)", snap.version_id, index.ntotal, len(new), outliers.ntotal,
                     "off" if hubness is None else f"k={hubness.k} on {len(hubness.photos)} photos")
        return _View(
            snap.generation, snap.encoder_id, snap.version_id, encoder,
            SKUMatcher(index, dict(zip(ids.tolist(), skus)), outliers, offsets),
            present, self.catalog.names(), snap.threshold, _snapshot_score(snap), o_present, hubness,
        )

    def _hubness(self, encoder_id: int, dim: int):
        """The gallery's :class:`~retailklip.hubness.HubnessReference` for ``encoder_id`` (Gallery
        ``hubness_reference``; a gallery without the method, or with hubness reduction off: None;
        damaged photo embeddings: None, with an error logged)."""
        get = getattr(self.catalog, "hubness_reference", None)
        try:
            hub = None if get is None else get(encoder_id)
            if hub is not None and hub.dim != dim:
                raise RetailKlipError(f"the catalog's unlabeled photo embeddings have dimension {hub.dim}, "
                                      f"its vectors {dim}")
        except RetailKlipError as e:
            # Recognition goes on without hubness reduction rather than not at all.
            logger.error("%s; matching by plain 1-NN until it is repaired (`catalog check --repair`, then "
                         "`catalog rebuild --center-photos ...`)", str(e).splitlines()[0])
            return None
        return hub

    def _stored_offsets(self, version_id: int | None, hubness) -> dict[int, float]:
        """The offsets stored with the version (Gallery ``version_offsets``) for the vectors it
        holds; {} when there are none for this hubness reference, or they are damaged (logged:
        every offset is then computed, as for a version without them)."""
        get = getattr(self.catalog, "version_offsets", None)
        try:
            stored = None if get is None else get(version_id, hubness)
        except RetailKlipError as e:
            logger.warning("%s; computing the CSLS offsets instead", str(e).splitlines()[0])
            return {}
        return stored or {}

    def _offsets(self, hubness, ids: np.ndarray, dim: int, known: dict[int, float],
                 new: np.ndarray | None = None, vectors: np.ndarray | None = None, chunk: int = 8192) -> dict[int, float]:
        """CSLS offsets (:meth:`HubnessReference.offsets`) of the vectors ``ids``: those in
        ``known`` kept, those in ``new`` (with their ``vectors``) computed, the rest read from
        the gallery in chunks of ``chunk`` (memory bounded by it)."""
        out = {i: known[i] for i in ids.tolist() if i in known}
        if new is not None and len(new):
            out.update(zip(new.tolist(), hubness.offsets(vectors).tolist()))
        todo = np.array([i for i in ids.tolist() if i not in out], np.int64)
        for s in range(0, len(todo), chunk):
            found, vecs = self.catalog.existing_vectors(todo[s: s + chunk], dim)
            out.update(zip(found.tolist(), hubness.offsets(vecs).tolist()))
        return out

    def _apply_changes(self, view: _View, snap) -> None:
        """Apply SKUs added / removed since ``view`` (same encoder and index version)."""
        ids, skus = self.catalog.embedding_table(snap.encoder_id)
        index, outliers = view.matcher.index, view.matcher.outliers
        new, vectors, gone = self._changes(view.present, ids, index.dim)  # database reads outside the lock
        o_changes = self._outlier_changes(snap.encoder_id, view.outlier_present, index.dim)
        names = self.catalog.names()
        offsets = view.matcher.offsets
        if view.hubness is not None:
            offsets = self._offsets(view.hubness, ids, index.dim, offsets, new, vectors)
        with self._lock:
            present = self._apply(index, view.present, new, vectors, gone)
            o_present = self._apply(outliers, view.outlier_present, *o_changes)
            self._view = replace(
                view, generation=snap.generation,
                matcher=SKUMatcher(index, dict(zip(ids.tolist(), skus)), outliers, offsets),
                present=present, names=names, threshold=snap.threshold, open_set_score=_snapshot_score(snap),
                outlier_present=o_present,
            )
        logger.debug("index synced to generation %d: +%d -%d vectors", snap.generation, len(new), len(gone))

    def _changes(self, present: np.ndarray, ids: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Difference between the ids an index holds and the database's: ``(new ids, their
        float32 (N, dim) vectors, gone ids)``; SKUs removed while reading are skipped."""
        new, vectors = self.catalog.existing_vectors(_sorted_diff(ids, present), dim)
        return new, vectors, _sorted_diff(present, ids)

    def _outlier_changes(self, encoder_id: int, present: np.ndarray, dim: int
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Like :meth:`_changes` for the outlier vectors of ``encoder_id`` (Gallery
        ``outlier_table`` / ``existing_outlier_vectors``; a gallery without them has none)."""
        table = getattr(self.catalog, "outlier_table", None)
        ids = np.zeros(0, np.int64) if table is None else np.asarray(table(encoder_id), np.int64)
        new_ids = _sorted_diff(ids, present)
        if len(new_ids):
            new, vectors = self.catalog.existing_outlier_vectors(new_ids, dim)
        else:
            new, vectors = new_ids, np.zeros((0, dim), np.float32)
        return new, vectors, _sorted_diff(present, ids)

    @staticmethod
    def _apply(index: VectorIndex, present: np.ndarray, new: np.ndarray, vectors: np.ndarray,
               gone: np.ndarray) -> np.ndarray:
        """Apply :meth:`_changes` to ``index``; returns the ids it now holds.  Gone vectors are
        removed if the index type can; otherwise they stay as tombstones that the matcher skips
        (their ids are no longer mapped to an SKU)."""
        if len(gone) and index.supports_remove:
            index.remove(gone)
            present = _sorted_diff(present, gone)
        if len(new):
            index.add(new, vectors)
            present = np.union1d(present, new)
        return present

    @property
    def matcher(self) -> SKUMatcher:
        """The current :class:`SKUMatcher` (index + vector id -> SKU map), brought up to date."""
        return self._current().matcher

    @property
    def version(self) -> int | None:
        """The catalog index version being served (see ``catalog versions``)."""
        return self._current().version_id

    @property
    def threshold(self) -> float:
        """The threshold in use, on :attr:`open_set_score`."""
        if self._threshold is not None:
            return self._threshold
        return self._current().threshold

    @property
    def has_outliers(self) -> bool:
        """Whether the catalog holds outlier references (vectors of its current encoder), so
        that the ``outlier-ratio`` score is available."""
        return self._current().matcher.has_outliers

    @property
    def open_set_score(self) -> str:
        """The score the threshold is on (``"distance"``, ``"ratio"`` or ``"outlier-ratio"``,
        :mod:`retailklip.open_set`)."""
        return self._score if self._score is not None else self._current().open_set_score

    def _operating_point(self, view: _View) -> tuple[float, str]:
        """(threshold, score) of this recognizer on ``view``: both given, or both the catalog's."""
        if self._threshold is not None:
            return self._threshold, self._score
        return view.threshold, view.open_set_score

    # ------------------------------------------------------------------ recognition
    def _view_for(self, encoder_key: str) -> _View | None:
        """The current view, if it serves vectors of ``encoder_key`` (embeddings of two encoders
        are not comparable) and holds at least one SKU; else None."""
        view = self._current()
        return view if view.encoder.identity.key == encoder_key and view.matcher.sku_of else None

    def match_embeddings(self, embeddings: np.ndarray, encoder_key: str, threshold: float | None = None,
                         open_set_score: str = DEFAULT_OPEN_SET_SCORE, plain: bool = False) -> list | None:
        """1-NN matches (:class:`retailklip.matching.Match`: nearest SKU, runner-up, known) of
        embeddings made elsewhere, e.g. a new reference image's before it is stored.

        Args:
            embeddings: float32 (N, D) L2-normalised embeddings.
            encoder_key: :attr:`EncoderIdentity.key` of the encoder that made them.
            threshold: threshold on ``open_set_score`` (default: the recognizer's threshold, on
                the recognizer's score).
            open_set_score: the score of a given ``threshold`` (``"distance"``: cosine distance).
            plain: rank by plain cosine distance even with hubness reduction on
                (:meth:`SKUMatcher.match`), e.g. for the SKUs closest to a new reference image.

        Returns:
            One match per row, or None when the catalog's current encoder is not ``encoder_key``
            (embeddings of two encoders are not comparable) or the catalog holds no SKU.
        """
        view = self._view_for(encoder_key)
        if view is None:
            return None
        t, score = (threshold, open_set_score) if threshold is not None else self._operating_point(view)
        with self._lock:
            return view.matcher.match(np.asarray(embeddings, np.float32), t, score=score, plain=plain)

    def switches_to(self, queries: np.ndarray, vectors: np.ndarray, encoder_key: str, sku: str) -> np.ndarray | None:
        """Which of ``queries`` (e.g. the catalog's unlabeled store photos) a new reference
        image's ``vectors`` would take from another SKU, ranked as recognition ranks now (with
        hubness reduction: the new vectors' CSLS offsets against the same photos);
        :func:`retailklip.matching.switches_to`.

        Args:
            queries: float32 (M, D) unit embeddings.
            vectors: float32 (V, D) unit embeddings of SKU ``sku``'s new reference image.
            encoder_key: :attr:`EncoderIdentity.key` of the encoder that made both.
            sku: the SKU the vectors would belong to (new or existing).

        Returns:
            bool (M,), or None when the catalog's current encoder is not ``encoder_key`` or the
            catalog holds no SKU.
        """
        each = self.switches_to_each(queries, [(sku, vectors)], encoder_key)
        return None if each is None else each[0]

    def switches_to_each(self, queries: np.ndarray, references: Sequence[tuple[str, np.ndarray]],
                         encoder_key: str) -> list[np.ndarray] | None:
        """:meth:`switches_to` for several new reference images, each judged on its own against
        the catalog as it is now (not against the others): ``queries`` are matched once.

        Args:
            queries: float32 (M, D) unit embeddings.
            references: (SKU id, float32 (V, D) unit embeddings of its new reference image) pairs.
            encoder_key: :attr:`EncoderIdentity.key` of the encoder that made them.

        Returns:
            One bool (M,) per reference, or None as :meth:`switches_to`.
        """
        now = self._ranked_now(queries, encoder_key)
        if now is None:
            return None
        queries, current, offsets = now
        return [switches_to(current, queries, vectors, offsets(vectors), sku) for sku, vectors in references]

    def switched_to(self, queries: np.ndarray, references: Sequence[tuple[str, np.ndarray]],
                    encoder_key: str) -> np.ndarray | None:
        """The SKU each of ``queries`` would be recognised as instead of its current nearest SKU
        once *all* the new reference images are in the catalog together (e.g. in-store photos
        appended to every SKU at once), ranked as recognition ranks now;
        :func:`retailklip.matching.switched_to`.

        Args:
            queries: float32 (M, D) unit embeddings.
            references: (SKU id, float32 (V, D) unit embeddings of a new reference image) pairs;
                an SKU may come more than once.
            encoder_key: :attr:`EncoderIdentity.key` of the encoder that made them.

        Returns:
            object (M,): the new nearest SKU id or None (unchanged) per query, or None as
            :meth:`switches_to`.
        """
        now = self._ranked_now(queries, encoder_key)
        if now is None:
            return None
        queries, current, offsets = now
        if not references:
            return np.full(len(queries), None, object)
        vectors = np.concatenate([np.asarray(v, np.float32) for _sku, v in references])
        skus = [sku for sku, v in references for _ in range(len(v))]
        return switched_to(current, queries, vectors, skus, offsets(vectors))

    def _ranked_now(self, queries: np.ndarray, encoder_key: str):
        """What the switch predictions start from: (float32 queries, their matches now, the CSLS
        offsets of new vectors under the current ranking: a function of float32 (V, D) returning
        float (V,), or None for plain 1-NN), or None when the current encoder is not
        ``encoder_key`` or the catalog holds no SKU."""
        view = self._view_for(encoder_key)
        if view is None:
            return None
        queries = np.asarray(queries, np.float32)
        with self._lock:
            current = view.matcher.match(queries, np.inf)
        hub = view.hubness if view.matcher.offsets is not None else None
        return queries, current, (lambda vectors: None) if hub is None else hub.offsets

    def recognize(
        self, image: ImageSource, *, boxes: object = None, points: object = None, masks: object = None,
    ) -> list[Recognition]:
        """Recognise the products in one image.

        Args:
            image: a path, bytes, PIL image (any mode; EXIF orientation applied) or uint8
                numpy array (H, W, 3).
            boxes: where the products are, when a detector or a fixed tray layout knows it:
                float (N, 4) ``(x0, y0, x1, y1)`` pixels of the upright photo. The segmenter
                cuts out one segment per box (``segment_prompts``, SAM's box prompts); with no
                segmenter, or one without a model, each box itself is the segment.
            points: float (M, 2) ``(x, y)`` pixels, one positive point per product (needs a
                model segmenter); recognised after the boxes.
            masks: bool (H, W) masks of the products (e.g. annotated ones): recognised as
                given, no segmenter runs; not together with ``boxes`` / ``points``.

        Returns:
            One :class:`Recognition` per kept segment (with no segmenter and no prompts: one
            for the whole image), in the segmenter's order (with prompts: the prompts' order).

        Raises:
            InvalidImageError: the image cannot be decoded.
            EmptyCatalogError: the catalog holds no SKU.
            EncoderMismatchError: the encoder's weights changed since the vectors were made.
            RetailKlipError: bad prompts or masks (``SegmenterOptionError`` for prompts), or
                prompts the segmenter cannot take; the score ``"outlier-ratio"`` on a catalog
                without outlier references (one line, nothing recognised).
        """
        return self.recognize_segments(image, boxes=boxes, points=points, masks=masks)[0]

    def recognize_segments(
        self, image: ImageSource, *, boxes: object = None, points: object = None, masks: object = None,
    ) -> tuple[list[Recognition], list[SegmentLike]]:
        """Like :meth:`recognize`, also returning the segments (with their RGBA crops), e.g. to
        save them; with no segmenter and no prompts the segment list is empty (the whole photo,
        :func:`retailklip.segment.parsing.whole_image_segment`, is recognised with mask None)."""
        im = load_image(image)  # the one decode: segmenter and encoder get decoded images
        view = self._current()
        if not view.matcher.sku_of:
            raise EmptyCatalogError("the catalog holds no SKU; add one with `catalog add IMAGE`")
        if self._operating_point(view)[1] == OUTLIER_SCORE and not view.matcher.has_outliers:
            raise no_outliers_error()  # before any segmenting or embedding
        segments = self._given_segments(im, boxes, points, masks)
        if segments is None and self.segmenter is None:
            from .segment.parsing import whole_image_segment

            whole = whole_image_segment(im)
            crops, boxes, masks, scores, segments = [whole.crop], [whole.bbox], [None], [whole.score], []
        else:
            if segments is None:
                segment = getattr(self.segmenter, "segment_image", None) or self.segmenter.segment
                segments = segment(im)
            if not segments:
                return [], []
            crops = [s.crop for s in segments]
            boxes = [tuple(int(v) for v in s.bbox) for s in segments]
            masks, scores = [s.mask for s in segments], [float(s.score) for s in segments]
        for _attempt in range(3):
            queries = view.encoder.embed(crops, decoded=True)
            with self._lock:  # one consistent catalog version for the whole image
                current = self._view
                if current.encoder_id == view.encoder_id:
                    if not current.matcher.sku_of:
                        raise EmptyCatalogError("the catalog holds no SKU; add one with `catalog add IMAGE`")
                    threshold, score = self._operating_point(current)
                    matches = current.matcher.match(queries, threshold, score=score)
                    names = current.names
                    break
            view = current  # a rebuild switched encoders while we embedded: embed again
        else:
            raise RetailKlipError("the catalog's encoder kept changing during recognition; try again")
        return self._recognitions(matches, names, threshold, score, boxes, masks, scores), segments

    def _given_segments(self, im: Image.Image, boxes, points, masks) -> list[SegmentLike] | None:
        """The segments of prompts or given masks (None when there are none: the segmenter's
        own segments are recognised)."""
        if masks is not None:
            if boxes is not None or points is not None:
                raise RetailKlipError("give masks, or boxes / points, not both")
            from .segment.prompted import mask_segments

            return mask_segments(im, masks)
        if boxes is None and points is None:
            return None
        prompted = getattr(self.segmenter, "segment_prompts", None)
        if prompted is not None:
            return prompted(im, boxes=boxes, points=points)
        if self.segmenter is not None:
            raise RetailKlipError(f"segmenter {type(self.segmenter).__name__} takes no box or point prompts")
        from .segment.prompted import box_segments

        if points is not None and len(np.asarray(points)):
            raise RetailKlipError("point prompts need a model segmenter (--segment NAME)")
        return box_segments(im, boxes if boxes is not None else [])

    @staticmethod
    def _recognitions(matches, names, threshold, open_set_score, boxes, masks, scores) -> list[Recognition]:
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
                open_set_score=open_set_score,
                outlier_distance=m.outlier_distance,
                adjusted_distance=m.nearest.adjusted,
            )
            for m, b, mk, sc in zip(matches, boxes, masks, scores)
        ]


def _sorted_diff(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Sorted int64 ids in ``a`` but not in ``b``."""
    return np.setdiff1d(np.asarray(a, np.int64), np.asarray(b, np.int64)).astype(np.int64)


def _snapshot_score(snap) -> str:
    """The open-set score of a gallery state (``"distance"`` for galleries that predate it)."""
    return check_score(getattr(snap, "open_set_score", DEFAULT_OPEN_SET_SCORE))
