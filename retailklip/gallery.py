"""What the recognizer needs from a gallery of reference vectors: the :class:`Gallery` protocol,
and :func:`open_gallery`, the one entry point by which the library core opens a gallery
directory without importing the package that implements it.

The library core (``retailklip``) knows nothing of the catalog: ``catalog.store.Catalog``
implements :class:`Gallery`, and registers its opener in the ``retailklip.galleries`` entry-point
group (``pyproject.toml``), which :func:`open_gallery` looks up.  The layering is checked in CI by
an ``import-linter`` contract (``retailklip`` may not import ``catalog`` or ``finetune``).
"""

from __future__ import annotations

import os
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, Protocol

from .errors import RetailKlipError

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

    from .hubness import HubnessReference
    from .index import VectorIndex

#: Entry-point group of gallery openers: ``NAME = "module:callable"``, the callable taking
#: ``(directory, *, db_url=None, device="cpu")`` and returning a :class:`Gallery`.
ENTRY_POINT_GROUP = "retailklip.galleries"
DEFAULT_GALLERY = "catalog"


class GalleryState(Protocol):
    """A gallery's current state, read in one query.

    Attributes:
        generation: change counter (bumped by every change the recognizer must see).
        encoder_id: id of the encoder whose vectors are served.
        version_id: id of the active index snapshot (None: serve from :meth:`Gallery.existing_vectors` alone).
        threshold: the open-set threshold, on ``open_set_score``.
        open_set_score: the score the threshold is on (:mod:`retailklip.open_set`); a state
            without this attribute is on ``"distance"``, a cosine distance in [0, 2].
    """

    generation: int
    encoder_id: int
    version_id: int | None
    threshold: float
    open_set_score: str


class Gallery(Protocol):
    """The reference vectors a :class:`retailklip.recognizer.Recognizer` serves.

    Every method may be called from several threads.
    """

    def snapshot(self) -> GalleryState:
        """The current state (one cheap read; called once per recognition)."""

    def encoder_for(self, encoder_id: int) -> Any:
        """The :class:`retailklip.encoders.Encoder` that made the vectors of ``encoder_id``."""

    def load_index(self, version_id: int | None) -> VectorIndex:
        """The index snapshot of a version; raises a :class:`RetailKlipError` if unreadable."""

    def embedding_table(self, encoder_id: int | None = None) -> tuple[np.ndarray, list[str]]:
        """``(ids, skus)``: int64 (N,) vector ids of ``encoder_id`` (ascending) and each one's SKU."""

    def existing_vectors(self, ids, dim: int) -> tuple[np.ndarray, np.ndarray]:
        """``(found_ids, vectors)``: the float32 (M, dim) vectors of the ids still present."""

    def outlier_table(self, encoder_id: int) -> np.ndarray:
        """int64 (M,) ids (ascending) of the vectors of ``encoder_id`` made from *outlier
        references*: reference images of products that are not in the gallery (never matched;
        the denominator of the ``outlier-ratio`` score, :func:`retailklip.open_set.outlier_ratio`).
        Their ids are a namespace of their own, apart from :meth:`embedding_table`'s.  A gallery
        without outlier references returns an empty array; a gallery class without this method
        is treated so."""

    def existing_outlier_vectors(self, ids, dim: int) -> tuple[np.ndarray, np.ndarray]:
        """``(found_ids, vectors)``: the float32 (M, dim) unit vectors of the outlier-vector ids
        still present (like :meth:`existing_vectors`, for :meth:`outlier_table`'s ids)."""

    def hubness_reference(self, encoder_id: int) -> HubnessReference | None:
        """The unlabeled store photos' embeddings (made by ``encoder_id``) and k for hubness
        reduction at the 1-NN (:mod:`retailklip.hubness`, CSLS), or None: plain 1-NN.  A gallery
        class without this method is treated as returning None."""

    def version_offsets(self, version_id: int | None, hubness: HubnessReference) -> dict[int, float] | None:
        """CSLS offsets stored with an index version (vector id -> offset) if they were computed
        against ``hubness`` (its :attr:`~retailklip.hubness.HubnessReference.fingerprint`), else
        None; raises a :class:`RetailKlipError` if they are damaged.  A gallery class without this
        method is treated as returning None (the recognizer computes every offset)."""

    def names(self) -> dict[str, str | None]:
        """SKU id -> display name."""

    def settings(self) -> dict:
        """Settings; the recognizer reads ``"segmenter"`` and ``"segmenter_checkpoint"``."""


def open_gallery(directory: str | os.PathLike, *, kind: str = DEFAULT_GALLERY, **kwargs) -> Gallery:
    """Open a gallery directory with the opener registered as ``kind`` in the
    :data:`ENTRY_POINT_GROUP` entry-point group (``catalog``: ``catalog.store.Catalog.open``).

    Args:
        directory: the gallery (catalog) directory.
        kind: registered opener name.
        **kwargs: passed to the opener (``db_url``, ``device``).

    Raises:
        RetailKlipError: no opener of that name is installed; the opener's own errors (e.g.
            ``CatalogError``: no catalog there).
    """
    found = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == kind]
    if not found:
        raise RetailKlipError(
            f"no gallery opener {kind!r} is installed (entry point group {ENTRY_POINT_GROUP}); "
            f"install retailklip with `pip install -e .` (it registers the catalog)"
        )
    return found[0].load()(directory, **kwargs)
