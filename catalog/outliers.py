"""Outlier references: reference images of products that are *not* in the catalog (``catalog
outliers add / import / list / remove``).

A store adds, besides its SKUs, images of products it does not sell, e.g. the packshots of the
products the encoder was finetuned on.  They are never an SKU and never a match: recognition
measures each photo's cosine distance to the nearest of them, ``outlier_distance``, and the
``outlier-ratio`` open-set score is ``distance / outlier_distance`` (:mod:`retailklip.open_set`):
a photo that is about as close to a product the store does not sell as to its nearest SKU is
probably not that SKU.  Under class-disjoint cross-validation this score separated known from
unknown products better than the distance (AUROC +0.247 [0.196, 0.296] on the finetuned
encoder; docs/finetune.md, "Third round").

Storage (tables ``outlier_references`` / ``outlier_embeddings``, migration 0004) mirrors the SKU
references: the image file in the same content-addressed image store, written atomically while
the writers' lock is held; K vectors per encoder made by
:func:`retailklip.references.embed_reference` with the catalog's K and seed; every write is
all-or-nothing and bumps the generation, so recognizers pick it up on their next call.  ``catalog
rebuild`` / ``rollback`` embed them with the new version's encoder (:mod:`catalog.vectors`,
``kind=OUTLIERS``); ``catalog check`` verifies their files and vectors.  An image is an SKU's
reference or an outlier, never both.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from sqlalchemy import delete, func, select

from retailklip.datasets import DatasetError, read_csv_rows
from retailklip.errors import RetailKlipError
from retailklip.open_set import OUTLIER_SCORE

from .codec import encode_vector
from .errors import CatalogError, DuplicateSKUError, InvalidSKUError
from .faults import crash_point
from .fileio import atomic_write
from .imagestore import image_relpath
from .models import OutlierEmbedding, OutlierReference, ReferenceImage
from .skus import validate_name
from .writes import CatalogWriter, read_and_embed

if TYPE_CHECKING:  # pragma: no cover
    from retailklip.encoders import Encoder

logger = logging.getLogger(__name__)


class UnknownOutlierError(CatalogError, KeyError):
    """An outlier-reference id that is not in the catalog was named."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else "unknown outlier reference"


@dataclass(frozen=True)
class OutlierInfo:
    """An outlier reference as listed by ``catalog outliers list``.

    Attributes:
        id: its id (``catalog outliers remove ID``).
        label: free text (default: the image file's name without extension).
        sha256: content hash of the image file; filename: the stored copy, relative to the
            catalog directory.
        width, height: pixels.
        vectors: its vectors of the catalog's active encoder (K once embedded).
        created: UTC time it was added.
    """

    id: int
    label: str | None
    sha256: str
    filename: str
    width: int
    height: int
    vectors: int
    created: datetime

    def to_dict(self) -> dict:
        return {"id": self.id, "label": self.label, "sha256": self.sha256, "filename": self.filename,
                "width": self.width, "height": self.height, "vectors": self.vectors,
                "created": self.created.isoformat()}


@dataclass(frozen=True)
class _Prepared:
    label: str | None
    data: bytes
    sha256: str
    ext: str
    width: int
    height: int
    vectors: np.ndarray  # float32 (K, D)
    encoder_id: int


class _EncoderChanged(Exception):
    pass


def validate_label(label: str | None) -> str | None:
    """An outlier label in Unicode NFC (the rules of an SKU's display name: at most 512
    characters, no control characters but tab and newline).

    Raises:
        InvalidSKUError: with the reason.
    """
    try:
        return validate_name(label)
    except InvalidSKUError as e:
        raise InvalidSKUError(str(e).replace("SKU name", "outlier label")) from None


class OutlierWriter(CatalogWriter):
    """An open catalog's outlier references (module docstring), on top of its SKU writes."""

    # ------------------------------------------------------------------ reads
    def list_outliers(self) -> list[OutlierInfo]:
        """All outlier references, by id, with their vector count of the active encoder."""
        with self.sessions() as s:
            enc_id = self.state(s).encoder_id
            vecs = (
                select(OutlierEmbedding.reference_id, func.count(OutlierEmbedding.id).label("n"))
                .where(OutlierEmbedding.encoder_id == enc_id)
                .group_by(OutlierEmbedding.reference_id)
                .subquery()
            )
            rows = s.execute(
                select(OutlierReference.id, OutlierReference.label, OutlierReference.sha256, OutlierReference.filename,
                       OutlierReference.width, OutlierReference.height, func.coalesce(vecs.c.n, 0),
                       OutlierReference.created)
                .outerjoin(vecs, vecs.c.reference_id == OutlierReference.id)
                .order_by(OutlierReference.id)
            ).all()
        return [OutlierInfo(*r) for r in rows]

    def outlier_count(self) -> int:
        """How many outlier references the catalog holds."""
        with self.sessions() as s:
            return int(s.scalar(select(func.count(OutlierReference.id))))

    # ------------------------------------------------------------------ writes
    def add_outliers(self, images: Sequence[str | os.PathLike], labels: Sequence[str | None] | None = None, *,
                     progress: bool = False) -> list[OutlierInfo]:
        """Add outlier references (images of products not in the catalog), all or nothing.

        Each image is embedded as K views with the catalog's encoder, K and seed, exactly as an
        SKU's reference image is; recognizers use them from their next call.

        Args:
            images: image files (any format PIL reads), at least one.
            labels: one label per image (None: the file name without extension).
            progress: progress bar while embedding.

        Returns:
            The new references' :class:`OutlierInfo`, in the given order.

        Raises:
            CatalogError: no image, or ``labels`` of another length.
            InvalidImageError, InvalidSKUError (a bad label), DuplicateSKUError (an image given
            twice, already an outlier reference, or an SKU's reference image),
            ReadOnlyCatalogError, NoSpaceError.  On any error nothing is written.
        """
        self.require_writable("add outlier references")
        paths = [Path(p) for p in images]
        if not paths:
            raise CatalogError("no outlier image given")
        if labels is None:
            labels = [p.stem for p in paths]
        if len(labels) != len(paths):
            raise CatalogError(f"{len(paths)} images but {len(labels)} labels")
        labels = [validate_label(x) for x in labels]
        st = self.settings()

        def embed(enc_id: int, enc: Encoder) -> list[_Prepared]:
            it = list(zip(paths, labels))
            if progress:
                from tqdm import tqdm

                it = tqdm(it, desc="embedding outliers", unit="image")
            return [_Prepared(label, *read_and_embed(p, enc, st["augmentations"], st["seed"]), enc_id) for p, label in it]

        prepared = self._embed_and_write_outliers(embed)
        ids = {p.sha256 for p in prepared}
        by_hash = {o.sha256: o for o in self.list_outliers() if o.sha256 in ids}
        return [by_hash[p.sha256] for p in prepared]

    def import_outliers(self, csv_path: str | os.PathLike, *, progress: bool = False) -> list[OutlierInfo]:
        """Add the outlier references of a CSV with columns ``image[,label]`` (image paths
        relative to the CSV), all or nothing (:meth:`add_outliers`).

        Raises:
            CatalogError: missing file or column, empty CSV; any error of :meth:`add_outliers`
                (a bad image is named with its CSV line).
        """
        self.require_writable("import outlier references")
        path = Path(csv_path)
        try:
            rows = read_csv_rows(path, ("image",), "image,label")
        except DatasetError as e:
            raise CatalogError(str(e)) from None
        images, labels = [], []
        for n, r in rows:
            img = path.parent / r["image"]
            if not img.is_file():
                raise CatalogError(f"{path}:{n}: {img}: no such image file")
            try:
                labels.append(validate_label(r.get("label") or img.stem))
            except RetailKlipError as e:
                raise type(e)(f"{path}:{n}: {e}") from None
            images.append(img)
        return self.add_outliers(images, labels, progress=progress)

    def remove_outliers(self, ids: Sequence[int]) -> int:
        """Remove outlier references (image rows, vectors and, when no other row names it, the
        stored file), all or nothing.

        Raises:
            UnknownOutlierError: an id that is not an outlier reference (nothing removed).
            CatalogError: the catalog's threshold is on ``outlier-ratio`` and no outlier
                reference would be left (calibrate on another score first).
            ReadOnlyCatalogError.
        """
        self.require_writable("remove outlier references")
        want = sorted({int(i) for i in ids})
        if not want:
            raise CatalogError("no outlier id given")
        with self.sessions.begin() as s:
            self.lock_writers(s)
            rows = list(s.scalars(select(OutlierReference).where(OutlierReference.id.in_(want))))
            missing = sorted(set(want) - {r.id for r in rows})
            if missing:
                raise UnknownOutlierError(f"unknown outlier reference {missing[0]} (see `catalog outliers list`)")
            left = int(s.scalar(select(func.count(OutlierReference.id)))) - len(rows)
            if left == 0 and self.state(s).open_set_score == OUTLIER_SCORE:
                raise CatalogError(
                    "the catalog's threshold is on outlier-ratio, which needs outlier references: removing the last "
                    "would leave recognition without its score; calibrate on another score first "
                    "(`catalog calibrate PHOTOS_CSV --score distance ...`)"
                )
            files = [r.filename for r in rows]
            s.execute(delete(OutlierEmbedding).where(OutlierEmbedding.reference_id.in_(want)))
            s.execute(delete(OutlierReference).where(OutlierReference.id.in_(want)))
            crash_point("remove.before_commit")
        self._delete_unreferenced(files)
        logger.info("removed %d outlier reference(s)", len(want))
        return len(want)

    def _embed_and_write_outliers(self, embed: Callable[[int, Encoder], list[_Prepared]]) -> list[_Prepared]:
        """Embed with the active encoder and write; embed again when a rebuild switched the
        encoder in between (noticed under the writers' lock, as :meth:`CatalogWriter.add` does)."""
        for _attempt in range(3):
            enc_id, enc = self.active_encoder()
            prepared = embed(enc_id, enc)
            self._check_new(prepared)
            try:
                self._write_outliers(prepared)
                return prepared
            except _EncoderChanged:
                logger.info("the active encoder changed while adding outlier references; embedding again")
        raise CatalogError("the active encoder kept changing while adding outlier references; try again")

    def _check_new(self, prepared: Sequence[_Prepared], s=None) -> None:
        """Refuse an image given twice, already an outlier, or an SKU's reference image.

        Raises:
            DuplicateSKUError: naming the image's position and the row it clashes with.
        """
        hashes = [p.sha256 for p in prepared]
        seen: dict[str, int] = {}
        for n, h in enumerate(hashes, start=1):
            if h in seen:
                raise DuplicateSKUError(f"images {seen[h]} and {n} are the same image; an outlier is stored once")
            seen[h] = n
        own = s if s is not None else self.sessions()
        try:
            ref = own.execute(select(ReferenceImage.sha256, ReferenceImage.sku_id)
                              .where(ReferenceImage.sha256.in_(hashes))).first()
            out = own.execute(select(OutlierReference.sha256, OutlierReference.id)
                              .where(OutlierReference.sha256.in_(hashes))).first()
        finally:
            if s is None:
                own.close()
        if ref:
            raise DuplicateSKUError(f"image {seen[ref[0]]} is a reference image of SKU {ref[1]!r}: a product in the "
                                    f"catalog cannot be an outlier")
        if out:
            raise DuplicateSKUError(f"image {seen[out[0]]} is already outlier reference {out[1]}")

    def _write_outliers(self, prepared: Sequence[_Prepared]) -> None:
        """Write files and rows in one transaction under the writers' lock (see
        :meth:`CatalogWriter._write`); a failure removes the files this call created."""
        created: list[Path] = []
        try:
            with self.sessions.begin() as s:
                _gen, active_encoder = self.lock_writers(s)
                if any(p.encoder_id != active_encoder for p in prepared):
                    raise _EncoderChanged()
                self._check_new(prepared, s)  # again under the lock: a concurrent add may have won
                for p in prepared:
                    dest = self.root / image_relpath(p.sha256, p.ext)
                    if not dest.exists():
                        created.append(dest)
                        atomic_write(dest, p.data)
                    else:  # a leftover of an interrupted add: fresh mtime so `catalog check` keeps it
                        os.utime(dest)
                crash_point("add.after_file")
                for p in prepared:
                    ref = OutlierReference(label=p.label, sha256=p.sha256, filename=image_relpath(p.sha256, p.ext),
                                           size_bytes=len(p.data), width=p.width, height=p.height)
                    s.add(ref)
                    s.flush()
                    s.add_all(OutlierEmbedding(reference_id=ref.id, encoder_id=active_encoder, view=v,
                                               vector=encode_vector(vec)) for v, vec in enumerate(p.vectors))
                s.flush()
                crash_point("add.before_commit")
        except BaseException as e:
            failure = self._failed_write(e, created, "an outlier image is already stored")
            if failure is e:
                raise
            raise failure from None
        logger.info("added %d outlier reference(s)", len(prepared))
