"""The vectors of a catalog's reference images in the database, per encoder: which references
lack them, embedding and storing those (the resumable cache of ``rebuild`` and the repair of
``check``), and the table of one encoder's vectors that an index snapshot is built from.

A vector is identified by (reference image, encoder, view); the K views of a reference come from
:func:`retailklip.references.embed_reference` through :mod:`catalog.embedding` (this process
or Ray), so they are bitwise what ``catalog add`` stores.

The same functions serve the *outlier references* (images of products not in the catalog,
tables ``outlier_references`` / ``outlier_embeddings``): pass ``kind=OUTLIERS``.  A rebuild, a
rollback and ``check --repair`` embed both kinds with the new encoder.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from sqlalchemy import delete, func, select

from .codec import encode_vector
from .connection import CatalogConnection
from .embedding import EmbedJob, RayConnection, embed_local, embed_ray
from .faults import crash_point
from .models import Embedding, OutlierEmbedding, OutlierReference, ReferenceImage

if TYPE_CHECKING:  # pragma: no cover
    from sqlalchemy.orm import Session

    from retailklip.encoders import Encoder

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class VectorKind:
    """Which images and vectors a function works on.

    Attributes:
        images: the image table's model (:class:`ReferenceImage` or :class:`OutlierReference`).
        vectors: its vectors' model (:class:`Embedding` or :class:`OutlierEmbedding`), with
            columns ``reference_id``, ``encoder_id``, ``view``, ``vector``.
        noun: what one image is called in messages.
    """

    images: type
    vectors: type
    noun: str


#: The SKUs' reference images and their vectors (the index snapshots').
REFERENCES = VectorKind(ReferenceImage, Embedding, "reference image")
#: The outlier references (products not in the catalog) and their vectors.
OUTLIERS = VectorKind(OutlierReference, OutlierEmbedding, "outlier reference")


def _lacking_vectors(columns, encoder_id: int, k: int, kind: VectorKind = REFERENCES):
    """SELECT ``columns`` of the images of ``kind`` without all K vectors (views < K) from
    ``encoder_id``."""
    vec, img = kind.vectors, kind.images
    have = (
        select(vec.reference_id, func.count(vec.id).label("n"))
        .where(vec.encoder_id == encoder_id, vec.view < k)
        .group_by(vec.reference_id)
        .subquery()
    )
    return (
        select(*columns)
        .select_from(img)
        .outerjoin(have, have.c.reference_id == img.id)
        .where(func.coalesce(have.c.n, 0) != k)
    )


def references_lacking_vectors(cat: CatalogConnection, encoder_id: int, k: int,
                               kind: VectorKind = REFERENCES) -> list[EmbedJob]:
    """Images of ``kind`` (default: SKU reference images) without all K vectors from
    ``encoder_id``, as embedding jobs (by id)."""
    img = kind.images
    with cat.sessions() as s:
        rows = s.execute(_lacking_vectors([img.id, img.filename], encoder_id, k, kind).order_by(img.id)).all()
    return [EmbedJob(int(i), str(cat.root / f), kind.noun) for i, f in rows]


def count_lacking(s: Session, encoder_id: int, k: int, kind: VectorKind = REFERENCES) -> int:
    """How many images of ``kind`` lack some of their K vectors from ``encoder_id`` (in session ``s``)."""
    return int(s.scalar(_lacking_vectors([func.count(kind.images.id)], encoder_id, k, kind)))


def store_vectors(cat: CatalogConnection, encoder_id: int, batch: Sequence[tuple[int, np.ndarray]],
                  kind: VectorKind = REFERENCES) -> int:
    """Commit one batch of (image id, float32 (K, D) vectors), replacing that encoder's
    vectors of those images (of ``kind``); images removed meanwhile are skipped.

    Returns:
        How many images were stored.
    """
    ids = [r for r, _ in batch]
    img, vec = kind.images, kind.vectors
    with cat.sessions.begin() as s:
        alive = set(s.scalars(select(img.id).where(img.id.in_(ids))))
        s.execute(delete(vec).where(vec.encoder_id == encoder_id, vec.reference_id.in_(list(alive))))
        s.add_all(
            vec(reference_id=r, encoder_id=encoder_id, view=v, vector=encode_vector(x))
            for r, vecs in batch
            if r in alive
            for v, x in enumerate(vecs)
        )
    return len(alive)


def embed_all_missing(cat: CatalogConnection, encoder: Encoder, encoder_id: int, k: int, seed: int,
                      **kwargs) -> tuple[int, int]:
    """:func:`embed_missing` for the SKU references, then for the outlier references.

    Returns:
        ``(references embedded, outlier references embedded)``.
    """
    return (embed_missing(cat, encoder, encoder_id, k, seed, **kwargs),
            embed_missing(cat, encoder, encoder_id, k, seed, kind=OUTLIERS, **kwargs))


def embed_missing(
    cat: CatalogConnection, encoder: Encoder, encoder_id: int, k: int, seed: int, *,
    ray: str | RayConnection | None = None,
    ray_workers: int | None = None, progress: bool = False, batch: int = 64, kind: VectorKind = REFERENCES,
) -> int:
    """Embed every image of ``kind`` (default: SKU reference images) lacking vectors from
    ``encoder_id`` and store them in commits of ``batch`` images (a crash loses at most one
    batch; a rerun embeds only the rest).

    Args:
        cat: the catalog.
        encoder: the built encoder of row ``encoder_id``.
        encoder_id: its ``encoders`` row.
        k: views per reference; ``seed``: augmentation seed (the catalog's settings).
        ray: Ray cluster address, or a :class:`~catalog.embedding.RayConnection` shared with
            other calls, to embed on (None: this process); ``ray_workers``: actors.
        progress: progress bar.
        batch: references per commit (>= 1).
        kind: :data:`REFERENCES` or :data:`OUTLIERS`.

    Returns:
        How many images were embedded.

    Raises:
        RetailKlipError: a stored image cannot be read or decoded (the message names it).
    """
    jobs = references_lacking_vectors(cat, encoder_id, k, kind)
    if not jobs:
        return 0
    logger.info("embedding %d %s(s) (%s)", len(jobs), kind.noun, f"ray {ray}" if ray else "local")
    if ray:
        it: Iterator = embed_ray(
            jobs, cat.encoder_kwargs(encoder_id), k, seed, address=ray, num_workers=ray_workers, progress=progress,
            identity=encoder.identity,
        )
    else:
        it = embed_local(jobs, encoder, k, seed, progress=progress)
    done, pending = 0, []
    for item in it:
        pending.append(item)
        if len(pending) >= batch:
            done += store_vectors(cat, encoder_id, pending, kind)
            pending = []
            crash_point("rebuild.embedded_batch")
    if pending:
        done += store_vectors(cat, encoder_id, pending, kind)
        crash_point("rebuild.embedded_batch")
    return done


@dataclass(frozen=True)
class VectorTable:
    """One encoder's vectors (views < K) of existing reference images, row by row.

    Attributes:
        ids: int64 (N,) embedding row ids, ascending (the ids in the FAISS index).
        references: int64 (N,) reference image id of each row.
        views: int64 (N,) view number of each row (0 = the reference itself).
        n_references: distinct reference images the query found (validation checks that the
            index holds K vectors of each).
    """

    ids: np.ndarray
    references: np.ndarray
    views: np.ndarray
    n_references: int

    def only(self, ids: np.ndarray) -> VectorTable:
        """The rows whose id is in ``ids`` (those still present after SKUs were removed meanwhile)."""
        alive = np.isin(self.ids, ids)
        refs = self.references[alive]
        return VectorTable(self.ids[alive], refs, self.views[alive], len(np.unique(refs)))


def vector_table(cat: CatalogConnection, encoder_id: int, k: int) -> VectorTable:
    """The :class:`VectorTable` of ``encoder_id`` from one query (SKUs added after it are caught
    up by ``rebuild`` before its swap)."""
    with cat.sessions() as s:
        rows = s.execute(
            select(Embedding.id, Embedding.reference_id, Embedding.view)
            .join(ReferenceImage, ReferenceImage.id == Embedding.reference_id)
            .where(Embedding.encoder_id == encoder_id, Embedding.view < k)
            .order_by(Embedding.id)
        ).all()
    a = np.array(rows, np.int64).reshape(-1, 3)
    return VectorTable(a[:, 0], a[:, 1], a[:, 2], len(np.unique(a[:, 1])))
