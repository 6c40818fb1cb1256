"""Reading an open catalog: SKUs, reference images, the vectors of an encoder (of the SKUs'
references, and of the outlier references: products not in the catalog) and index snapshots.

:class:`CatalogReader` is what :class:`retailklip.recognizer.Recognizer` needs of a catalog (the
:class:`retailklip.gallery.Gallery` protocol) and what ``rebuild`` and ``check`` read with.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from sqlalchemy import func, select

from retailklip.hubness import HubnessReference

from . import index_store
from .codec import decode_vector
from .connection import CatalogConnection
from .errors import CatalogError, UnknownSKUError
from .models import SKU, Embedding, IndexVersion, OutlierEmbedding, ReferenceImage
from .skus import ReferenceImageInfo, SKUInfo, find_sku, id_forms

if TYPE_CHECKING:  # pragma: no cover
    from retailklip.index import VectorIndex


class CatalogReader(CatalogConnection):
    """An open catalog's reads (module docstring); every method is one short read transaction."""

    def get(self, sku: str) -> SKUInfo:
        """One SKU's :class:`SKUInfo`.  Raises :class:`UnknownSKUError`."""
        infos = self.list_skus(id_forms(sku))
        if not infos:
            raise UnknownSKUError(f"unknown SKU {sku!r}")
        return infos[0]

    def reference_images(self, sku: str | None = None) -> list[ReferenceImageInfo]:
        """The stored reference images of every SKU (or of ``sku``), by SKU id, oldest first.
        Raises :class:`UnknownSKUError` for an ``sku`` that does not exist."""
        with self.sessions() as s:
            q = select(ReferenceImage).order_by(ReferenceImage.sku_id, ReferenceImage.id)
            if sku is not None:
                q = q.where(ReferenceImage.sku_id == find_sku(s, sku).id)
            return [ReferenceImageInfo(r.sku_id, r.sha256, self.root / r.filename, r.width, r.height, r.created)
                    for r in s.scalars(q)]

    def list_skus(self, only: Sequence[str] | None = None) -> list[SKUInfo]:
        """All SKUs (or those in ``only``), sorted by id, with reference and vector counts."""
        with self.sessions() as s:
            enc_id = self.state(s).encoder_id
            refs = (
                select(ReferenceImage.sku_id, func.count(ReferenceImage.id).label("n"))
                .group_by(ReferenceImage.sku_id)
                .subquery()
            )
            vecs = (
                select(ReferenceImage.sku_id, func.count(Embedding.id).label("n"))
                .join(Embedding, Embedding.reference_id == ReferenceImage.id)
                .where(Embedding.encoder_id == enc_id)
                .group_by(ReferenceImage.sku_id)
                .subquery()
            )
            q = (
                select(SKU.id, SKU.name, SKU.created, func.coalesce(refs.c.n, 0), func.coalesce(vecs.c.n, 0))
                .outerjoin(refs, refs.c.sku_id == SKU.id)
                .outerjoin(vecs, vecs.c.sku_id == SKU.id)
                .order_by(SKU.id)
            )
            if only is not None:
                q = q.where(SKU.id.in_(list(only)))
            return [SKUInfo(*r) for r in s.execute(q)]

    def __len__(self) -> int:
        with self.sessions() as s:
            return int(s.scalar(select(func.count(SKU.id))))

    def embedding_table(self, encoder_id: int | None = None) -> tuple[np.ndarray, list[str]]:
        """Ids of all vectors made by the catalog's active encoder (or ``encoder_id``) and the SKU
        of each.

        Returns:
            ``(ids, skus)``: int64 (N,) embedding row ids (ascending) and the SKU id of each row.
        """
        with self.sessions() as s:
            enc_id = self.state(s).encoder_id if encoder_id is None else encoder_id
            rows = s.execute(
                select(Embedding.id, ReferenceImage.sku_id)
                .join(ReferenceImage, Embedding.reference_id == ReferenceImage.id)
                .where(Embedding.encoder_id == enc_id)
                .order_by(Embedding.id)
            ).all()
        return np.array([r[0] for r in rows], np.int64), [r[1] for r in rows]

    def vectors(self, ids: Sequence[int], dim: int, chunk: int = 10_000) -> np.ndarray:
        """The float32 vectors (N, dim) of the given embedding row ids, in the given order.

        Raises:
            UnknownSKUError: an id has no row (removed meanwhile; see :meth:`existing_vectors`).
            CatalogError: a stored vector has the wrong length.
        """
        found, out = self.existing_vectors(ids, dim, chunk)
        if len(found) != len(ids):
            missing = sorted(set(int(i) for i in ids) - set(found.tolist()))
            raise UnknownSKUError(f"{len(missing)} vector(s) are no longer in the catalog, e.g. id {missing[0]}")
        return out

    def existing_vectors(self, ids: Sequence[int], dim: int, chunk: int = 10_000) -> tuple[np.ndarray, np.ndarray]:
        """Like :meth:`vectors`, skipping ids whose rows are gone (an SKU removed meanwhile).

        Returns:
            ``(found_ids, vectors)``: int64 (M,) ids in the given order and float32 (M, dim).
        """
        return self._existing(Embedding, ids, dim, chunk)

    def outlier_table(self, encoder_id: int | None = None) -> np.ndarray:
        """Ids of the outlier references' vectors made by the active encoder (or ``encoder_id``):
        int64 (M,), ascending; empty when the catalog has no outlier references (see
        :class:`retailklip.gallery.Gallery`)."""
        with self.sessions() as s:
            enc_id = self.state(s).encoder_id if encoder_id is None else encoder_id
            ids = s.scalars(select(OutlierEmbedding.id).where(OutlierEmbedding.encoder_id == enc_id)
                            .order_by(OutlierEmbedding.id)).all()
        return np.array(ids, np.int64)

    def existing_outlier_vectors(self, ids: Sequence[int], dim: int, chunk: int = 10_000
                                 ) -> tuple[np.ndarray, np.ndarray]:
        """``(found_ids, vectors)`` of outlier-vector ids (:meth:`outlier_table`) still present:
        int64 (M,) and float32 (M, dim) unit rows.

        Raises:
            CatalogError: a stored vector has the wrong length.
        """
        return self._existing(OutlierEmbedding, ids, dim, chunk)

    def _existing(self, model, ids: Sequence[int], dim: int, chunk: int) -> tuple[np.ndarray, np.ndarray]:
        """Vectors of ``model`` (:class:`Embedding` or :class:`OutlierEmbedding`) by id, skipping
        gone rows."""
        out = np.empty((len(ids), dim), np.float32)
        seen = np.zeros(len(ids), bool)
        pos = {int(i): n for n, i in enumerate(ids)}
        with self.sessions() as s:
            for c in range(0, len(ids), chunk):
                part = [int(i) for i in ids[c : c + chunk]]
                for i, blob in s.execute(select(model.id, model.vector).where(model.id.in_(part))):
                    try:
                        out[pos[i]] = decode_vector(blob, dim)
                    except ValueError:
                        what = "outlier vector" if model is OutlierEmbedding else "vector"
                        raise CatalogError(
                            f"{what} {i} in the database has {len(blob)} bytes, not {4 * dim}; run `catalog check --repair`"
                        ) from None
                    seen[pos[i]] = True
        return np.asarray(ids, np.int64)[seen], out[seen]

    def hubness_reference(self, encoder_id: int | None = None, k: int | None = None) -> HubnessReference | None:
        """What hubness reduction at the 1-NN ranks against (:mod:`retailklip.hubness`, CSLS):
        the unlabeled photos' embeddings stored with encoder ``encoder_id`` (default: the active
        one) and ``k`` (default: the catalog's); None when k is 0 or that encoder has no photos
        (a catalog made without ``--center-photos``, or from before migration 0005).

        Raises:
            CatalogError: no such encoder row, or damaged photo embeddings.
        """
        with self.sessions() as s:
            st = self.state(s)
            enc_id = st.encoder_id if encoder_id is None else encoder_id
            k = int(st.hubness_k if k is None else k)
        photos = self.encoders.unlabeled(enc_id) if k else None
        return None if photos is None else HubnessReference(photos, k)

    def version_offsets(self, version_id: int | None, hubness: HubnessReference) -> dict[int, float] | None:
        """The CSLS offsets stored with index version ``version_id`` (vector id -> offset;
        :func:`catalog.index_store.read_offsets`), if computed against ``hubness``; else None.

        Raises:
            IndexFileError: the version's offsets file is damaged; CatalogError: no such version.
        """
        if version_id is None:
            return None
        with self.sessions() as s:
            v = s.get(IndexVersion, version_id)
            if v is None:
                raise CatalogError(f"no index version {version_id}")
            path = v.path
        found = index_store.read_offsets(self.root, path, hubness.fingerprint)
        return None if found is None else dict(zip(found[0].tolist(), found[1].tolist()))

    def load_index(self, version_id: int | None, *, verify: bool = False) -> VectorIndex:
        """The index snapshot of an index version (see :mod:`catalog.index_store`).

        Raises:
            IndexFileError: the version's files are missing or do not match its record.
            CatalogError: no such version.
        """
        if version_id is None:
            raise CatalogError("the catalog has no active index version; run `catalog rebuild`")
        with self.sessions() as s:
            v = s.get(IndexVersion, version_id)
            if v is None:
                raise CatalogError(f"no index version {version_id}")
            path, sha = v.path, v.index_sha256
        return index_store.read_version(self.root, path, expected_sha256=sha, verify=verify)

    def names(self) -> dict[str, str | None]:
        """SKU id -> display name."""
        with self.sessions() as s:
            return dict(s.execute(select(SKU.id, SKU.name)).all())

    def reference_path(self, sku: str) -> list[Path]:
        """Paths of the stored reference images of an SKU."""
        with self.sessions() as s:
            sku = find_sku(s, sku).id
            return [self.root / f for f in s.scalars(select(ReferenceImage.filename).where(ReferenceImage.sku_id == sku))]
