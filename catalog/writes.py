"""Writing a catalog: ``add`` (one reference image), ``import`` (a CSV of them) and ``remove``.

Every write is all-or-nothing: inputs are decoded, validated and embedded *before* anything is
written; the image file is written atomically (temporary file + rename) into the image store
(:mod:`catalog.imagestore`) while the transaction holds the writers' lock, and the database rows
(SKU, reference image, embeddings, generation bump) are committed in that one transaction.  If
it fails, the files it created are removed again; a crash in between leaves at most an
unreferenced file in the image store, which nothing reads (``catalog check`` removes it).

An ``add`` whose vectors were made by an encoder that a concurrent ``catalog rebuild`` has just
replaced notices it under the lock and embeds again (:meth:`CatalogWriter._embed_and_write`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from sqlalchemy import delete, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from retailklip.datasets import DatasetError, read_csv_rows
from retailklip.errors import RetailKlipError
from retailklip.hubness import even_sample
from retailklip.images import decode_image_bytes, read_image_bytes
from retailklip.references import embed_reference

from .codec import encode_vector
from .connection import DEFAULT_THRESHOLD
from .database import is_no_space, no_space_error
from .errors import CatalogError, DuplicateSKUError, HubReferenceError, UnknownSKUError
from .faults import crash_point
from .fileio import atomic_write
from .imagestore import image_extension, image_relpath, prune_empty_dirs, unlink_all
from .models import SKU, Embedding, OutlierReference, ReferenceImage
from .reads import CatalogReader
from .skus import (STORE_PHOTOS_CHECKED, AddedSKU, ImportedSKU, SKUInfo, StorePhotosTaken, find_sku, hub_limit, validate_name,
                   validate_sku_id)

if TYPE_CHECKING:  # pragma: no cover
    from retailklip.encoders import Encoder

logger = logging.getLogger(__name__)


class _EncoderChanged(Exception):
    """The active encoder changed between embedding and writing (a rebuild swapped it)."""


@dataclass(frozen=True)
class PreparedReference:
    """A validated, embedded reference image, ready to be written.

    Attributes:
        sku, name: SKU id (NFC) and display name.
        data: the file's bytes; ``sha256`` their hash; ``ext`` the stored file's extension.
        width, height: pixels.
        vectors: float32 (K, D) unit rows, view 0 = the image itself.
        encoder_id: the ``encoders`` row that made ``vectors``.
    """

    sku: str
    name: str | None
    data: bytes
    sha256: str
    ext: str
    width: int
    height: int
    vectors: np.ndarray
    encoder_id: int


def prepare_reference(
    image: str | os.PathLike, sku: str | None, name: str | None, encoder: Encoder, k: int, seed: int,
    encoder_id: int,
) -> PreparedReference:
    """Validate, read, decode and embed one reference image (nothing is written).

    Args:
        image: the image file.
        sku, name: SKU id (default: the file name without extension) and display name.
        encoder: the active encoder, row ``encoder_id``; ``k``: views; ``seed``: augmentation seed.

    Returns:
        A :class:`PreparedReference` whose vectors are :func:`retailklip.references.embed_reference`'s.

    Raises:
        InvalidSKUError, InvalidImageError.
    """
    path = Path(image)
    sku = validate_sku_id(sku if sku is not None else path.stem)
    name = validate_name(name)
    return PreparedReference(sku, name, *read_and_embed(path, encoder, k, seed), encoder_id)


def read_and_embed(image: str | os.PathLike, encoder: Encoder, k: int, seed: int
                   ) -> tuple[bytes, str, str, int, int, np.ndarray]:
    """Read, decode and embed one image file as K views (what every stored reference image,
    SKU or outlier, goes through before it is written).

    Returns:
        ``(bytes, sha256 hex, stored file extension, width, height, float32 (K, D) unit vectors)``
        (:func:`retailklip.references.embed_reference`).

    Raises:
        InvalidImageError: missing, unreadable or undecodable file (the message names it).
    """
    path = Path(image)
    data = read_image_bytes(path)
    im = decode_image_bytes(data, str(path))
    vectors = embed_reference(encoder, im, k, seed)
    return data, hashlib.sha256(data).hexdigest(), image_extension(data), im.width, im.height, vectors


def outlier_clash(s, hashes: Sequence[str]):
    """``(sha256, outlier id)`` of the first image among ``hashes`` that is an outlier reference
    (in session ``s``), or None: an image is an SKU's reference or an outlier, never both."""
    return s.execute(select(OutlierReference.sha256, OutlierReference.id)
                     .where(OutlierReference.sha256.in_(list(hashes)))).first()


def outlier_clash_message(outlier_id: int) -> str:
    return (f"this image is outlier reference {outlier_id} (a product not in the catalog); remove it with "
            f"`catalog outliers remove {outlier_id}` before adding it as an SKU")


class CatalogWriter(CatalogReader):
    """An open catalog's writes (module docstring), on top of its reads."""

    def __init__(self, root: Path, engine: Engine, *, device: str = "cpu", read_only: bool = False) -> None:
        super().__init__(root, engine, device=device, read_only=read_only)
        self._recognizer_lock = threading.Lock()
        self._recognizer = None  # the index `add` checks new references against (built on first use)

    def add(self, image: str | os.PathLike, sku: str | None = None, name: str | None = None, *, append: bool = False,
            force: bool = False) -> SKUInfo:
        """Add an SKU from one reference image (or, with ``append``, another reference image to
        an existing SKU).  The SKU is searchable as soon as this returns.

        Where the catalog keeps unlabeled store photos (``init --center-photos``), the new
        reference image is first matched against them (:meth:`_store_photos_taken`): one that
        would take more than :func:`~catalog.skus.hub_limit` of them (twice an average SKU's
        share, at least 1 % of them) from other SKUs is a hub, which other products' photos would be recognised as.  A new SKU is then
        added with a warning; an appended reference image (typically an in-store photo, the
        measured case: docs/evaluation.md, "More references per SKU") is refused unless
        ``force``.

        Args:
            image: reference image path (a packshot; any format PIL reads).
            sku: SKU id (default: the file name without extension).
            name: display name.
            append: add a further reference image to the existing SKU ``sku``.
            force: append even when the new reference image is a hub.

        Returns:
            The SKU's :class:`AddedSKU` (its :class:`SKUInfo`, the other SKUs within the
            threshold of the new reference image, and the store photos it takes; both logged).

        Raises:
            InvalidImageError, InvalidSKUError, DuplicateSKUError (id exists, or this exact image
            is already a reference), UnknownSKUError (``append`` to a missing SKU),
            HubReferenceError (``append`` of a hub without ``force``), ReadOnlyCatalogError,
            NoSpaceError.  On any error nothing is written.
        """
        self.require_writable("add an SKU")
        st = self.settings()
        sku_id = validate_sku_id(sku if sku is not None else Path(image).stem)
        self._check_can_add([(sku_id, None)], append)
        found = {}
        # "within the threshold" is a distance; a catalog whose threshold is a ratio warns at the
        # default distance threshold
        confusable_within = st["threshold"] if st["open_set_score"] == "distance" else DEFAULT_THRESHOLD

        def embed(enc_id: int, enc: Encoder) -> list[PreparedReference]:
            p = prepare_reference(image, sku_id, name, enc, st["augmentations"], st["seed"], enc_id)
            found["confusable"] = self._confusable(p, confusable_within)
            found["taken"] = taken = self._store_photos_taken([p], append)[0]
            if taken is not None and taken.hub and append and not force:
                raise HubReferenceError(
                    f"not appended: this reference image would take {taken.taken} of the catalog's {taken.photos} "
                    f"unlabeled store photos from other SKUs (limit {taken.limit:.1f}), so other products' photos "
                    f"would be recognised as {sku_id}; append a packshot instead, append in-store photos of every SKU at once "
                    f"(`catalog import --append`), or force it (--force)")
            return [p]

        prepared = self._embed_and_write(embed, append=append, what="add")[0]
        confusable, taken = found["confusable"], found["taken"]
        info = self.get(prepared.sku)
        for n in confusable:
            logger.info("SKU %r: its reference image is within the threshold (%.3f) of SKU %r (cosine distance "
                        "%.3f): photos of one may be recognised as the other", info.sku, confusable_within, n.sku,
                        n.distance)
        if taken is not None and taken.hub:
            logger.info("SKU %r: its new reference image takes %d of the catalog's %d unlabeled store photos from "
                        "other SKUs (limit %.1f): it may be a hub", info.sku, taken.taken, taken.photos, taken.limit)
        return AddedSKU(**vars(info), confusable_with=confusable, store_photos=taken)

    def _store_photos_taken(self, prepared: Sequence[PreparedReference], append: bool) -> list[StorePhotosTaken | None]:
        """How many of the catalog's unlabeled store photos (an even sample of at most
        :data:`STORE_PHOTOS_CHECKED`) each of ``prepared``'s reference images would take from
        other SKUs, ranked as recognition ranks (:meth:`Recognizer.switches_to_each`: each
        against the catalog as it is, the photos matched once); None for each when the catalog
        keeps no photos for the encoder (or damaged ones: ``catalog check`` reports those) or
        holds no SKU.  The average share is the photos over the SKUs there will be (``append``:
        no new SKU; else one per reference image)."""
        photos = self._checked_store_photos(prepared)
        if photos is None:
            return [None] * len(prepared)
        taken = self._shared_recognizer().switches_to_each(
            photos, [(p.sku, p.vectors) for p in prepared], self.encoder_for(prepared[0].encoder_id).identity.key)
        if taken is None:
            return [None] * len(prepared)
        skus = len(self) + (0 if append else len(prepared))
        return [StorePhotosTaken(int(t.sum()), len(photos), hub_limit(len(photos), skus)) for t in taken]

    def _store_photos_taken_together(self, prepared: Sequence[PreparedReference]) -> dict[str, StorePhotosTaken] | None:
        """For reference images appended to existing SKUs in one write: how many of the catalog's
        unlabeled store photos each SKU would take from other SKUs once *all* of them are in the
        catalog (:meth:`Recognizer.switched_to`), with the limit of the SKUs there are; None as
        :meth:`_store_photos_taken`."""
        photos = self._checked_store_photos(prepared)
        if photos is None:
            return None
        to = self._shared_recognizer().switched_to(
            photos, [(p.sku, p.vectors) for p in prepared], self.encoder_for(prepared[0].encoder_id).identity.key)
        if to is None:
            return None
        limit, taken = hub_limit(len(photos), len(self)), Counter(t for t in to if t is not None)
        return {p.sku: StorePhotosTaken(taken[p.sku], len(photos), limit) for p in prepared}

    def _checked_store_photos(self, prepared: Sequence[PreparedReference]) -> np.ndarray | None:
        """The even sample of the catalog's unlabeled store photos the hub checks match (float32
        (M, D) unit rows), or None when there are none for ``prepared``'s encoder (or damaged
        ones: logged, the check is skipped)."""
        try:
            photos = self.encoders.unlabeled(prepared[0].encoder_id) if prepared else None
        except RetailKlipError as e:
            logger.warning("the store-photo check of the new reference image%s is skipped: %s",
                           "s" if len(prepared) > 1 else "", str(e).splitlines()[0])
            photos = None
        if photos is None or not len(photos):
            return None
        return photos[even_sample(len(photos), STORE_PHOTOS_CHECKED)]

    def _shared_recognizer(self):
        """The recognizer ``add``'s checks search (built on first use, then kept in step)."""
        from retailklip.recognizer import Recognizer

        with self._recognizer_lock:
            if self._recognizer is None:
                self._recognizer = Recognizer(self)
            return self._recognizer

    def _confusable(self, prepared: PreparedReference, threshold: float) -> tuple:
        """Other SKUs within ``threshold`` of ``prepared``'s reference image (view 0), searched in
        the catalog's current index (the same one recognition uses)."""
        rec = self._shared_recognizer()
        # plain ranking: the SKUs closest to the new image, hubs included (hubness reduction would
        # rank a nearby hub behind farther SKUs)
        matches = rec.match_embeddings(prepared.vectors[:1], self.encoder_for(prepared.encoder_id).identity.key, threshold,
                                       plain=True)
        if matches is None:
            return ()
        m = matches[0]
        near = [n for n in (m.nearest, m.runner_up) if n is not None and n.sku != prepared.sku]
        return tuple(n for n in near if n.distance <= threshold)

    def import_csv(self, csv_path: str | os.PathLike, *, append: bool = False, force: bool = False,
                   progress: bool = True) -> list[ImportedSKU]:
        """Bulk-add SKUs from a CSV with columns ``image,sku,name`` (image paths relative to the
        CSV), or with ``append`` further reference images to existing SKUs (an SKU may have
        several rows).

        All-or-nothing: every row is validated and embedded first; then all rows are written in
        one transaction.  Where the catalog keeps unlabeled store photos, the new reference
        images are checked against them for hubs (:meth:`add`):

        * new SKUs: each as :meth:`add` checks a new SKU's, against the catalog as it was before
          the import (not against the other rows), with the limit of the SKUs after it; a hub is
          imported, with a warning logged;
        * ``append``: all rows together, against the catalog the import makes, since a store that
          photographs every product in the store appends them all (one appended at a time, each
          would look like a hub among packshot-only SKUs: docs/cli.md); an SKU that would take
          more than the limit from other SKUs refuses the whole import unless ``force``.

        Returns:
            One :class:`ImportedSKU` per SKU, in the order of their first row.

        Raises:
            CatalogError: missing file or columns, empty CSV, an SKU id repeated in the CSV
                (without ``append``); ``force`` without ``append``; HubReferenceError (``append``,
                hubs, no ``force``; nothing written); any error of :meth:`add` for a row (prefixed
                with the row number).
        """
        self.require_writable("append reference images" if append else "import SKUs")
        if force and not append:
            raise CatalogError("force applies to append only (a new SKU is never refused as a hub, only warned about)")
        path = Path(csv_path)
        try:
            rows = read_csv_rows(path, ("image", "sku"), "image,sku,name")
        except DatasetError as e:
            raise CatalogError(str(e)) from None
        entries = []
        for n, r in rows:
            try:
                entries.append((validate_sku_id(r["sku"]), validate_name(r.get("name") or None), path.parent / r["image"]))
            except RetailKlipError as e:
                raise type(e)(f"{path}:{n}: {e}") from None
        rows_of = Counter(e[0] for e in entries)
        ids = list(rows_of)  # in the order of their first row
        if append:
            with self.sessions() as s:
                existing = set(s.scalars(select(SKU.id).where(SKU.id.in_(ids))))
            missing = [(n, e[0]) for n, e in enumerate(entries, start=2) if e[0] not in existing]
            if missing:
                raise UnknownSKUError(f"{path}:{missing[0][0]}: unknown SKU {missing[0][1]!r}: cannot append a reference "
                                      f"image to it (import it without --append)")
            named: dict[str, tuple[int, str]] = {}
            for n, (sku, name, _img) in enumerate(entries, start=2):
                if name is not None and named.setdefault(sku, (n, name))[1] != name:
                    raise CatalogError(f"{path}:{n}: SKU {sku!r} is renamed to {name!r} here and to "
                                       f"{named[sku][1]!r} on line {named[sku][0]}; give one name (or none)")
        else:
            dupes = sorted(i for i, c in rows_of.items() if c > 1)
            if dupes:
                raise DuplicateSKUError(f"{path}: SKU id(s) repeated in the CSV: {', '.join(dupes[:5])} (several reference "
                                        f"images of one SKU: import one row of it, then the others with --append)")
            self._check_can_add([(i, None) for i in ids], append=False)
        self._check_distinct_images(path, [img for _sku, _name, img in entries])
        st = self.settings()

        taken: dict[str, StorePhotosTaken | None] = {}

        def embed(enc_id: int, enc: Encoder) -> list[PreparedReference]:
            prepared = []
            it: Iterable = enumerate(entries, start=2)
            if progress:
                from tqdm import tqdm

                it = tqdm(list(it), desc="appending" if append else "importing", unit="image" if append else "SKU")
            for n, (sku, name, img) in it:
                try:
                    prepared.append(prepare_reference(img, sku, name, enc, st["augmentations"], st["seed"], enc_id))
                except RetailKlipError as e:
                    raise type(e)(f"{path}:{n}: {e}") from None
                crash_point("import.row")
            taken.clear()
            if append:
                taken.update(self._store_photos_taken_together(prepared) or {})
                hubs = [(sku, t) for sku, t in taken.items() if t.hub]
                if hubs and not force:
                    hubs.sort(key=lambda h: -h[1].taken)
                    t = hubs[0][1]
                    listed = ", ".join(f"{sku!r} {h.taken}" for sku, h in hubs[:5]) + (", ..." if len(hubs) > 5 else "")
                    raise HubReferenceError(
                        f"{path}: not appended: with these reference images {len(hubs)} of the {len(ids)} SKUs would each "
                        f"take more of the catalog's {t.photos} unlabeled store photos from other SKUs than the limit "
                        f"({t.limit:.1f}): {listed}; other products' photos would be recognised as them; drop those rows, "
                        f"or force it (--force)")
            else:
                taken.update(zip((p.sku for p in prepared), self._store_photos_taken(prepared, append=False)))
            return prepared

        self._embed_and_write(embed, append=append, what="append" if append else "import")
        result = [ImportedSKU(sku, rows_of[sku], taken.get(sku)) for sku in ids]
        hubs = [r for r in result if r.store_photos is not None and r.store_photos.hub]
        for r in hubs:
            t = r.store_photos
            logger.warning("SKU %r: its %s take%s %d of the catalog's %d unlabeled store photos from other SKUs (limit "
                           "%.1f): photos of other products may be recognised as it", r.sku,
                           "new reference images" if append else "reference image", "" if append else "s", t.taken,
                           t.photos, t.limit)
        if len(hubs) > 1:
            logger.warning("%d of the %d %s SKUs may be hubs (above); check their reference images", len(hubs), len(result),
                           "appended-to" if append else "imported")
        return result

    def _embed_and_write(self, embed: Callable[[int, Encoder], list[PreparedReference]], *, append: bool,
                         what: str) -> list[PreparedReference]:
        """Embed with the active encoder and write; when a rebuild switched the encoder between the
        two (the write notices under the writers' lock), embed again with the new one."""
        for _attempt in range(3):
            enc_id, enc = self.active_encoder()
            prepared = embed(enc_id, enc)
            try:
                self._write(prepared, append=append)
                return prepared
            except _EncoderChanged:
                logger.info("the active encoder changed during %s (a rebuild finished); embedding again", what)
        raise CatalogError(f"the active encoder kept changing during {what}; try again")

    def _check_distinct_images(self, csv_path: Path, images: Sequence[Path]) -> None:
        """Refuse a CSV whose rows name one image file (by content) more than once, or an image
        that already is a reference image, before anything is embedded: one image is one SKU's
        reference, on every path (``add`` refuses it too, see :meth:`_write`).

        Raises:
            DuplicateSKUError: naming the CSV lines (row 1 is the header).
            InvalidImageError: an image cannot be read (with its line).
        """
        first: dict[str, int] = {}
        repeated: list[tuple[int, int]] = []
        for n, img in enumerate(images, start=2):
            try:
                digest = hashlib.sha256(read_image_bytes(img)).hexdigest()
            except RetailKlipError as e:
                raise type(e)(f"{csv_path}:{n}: {e}") from None
            if digest in first:
                repeated.append((first[digest], n))
            else:
                first[digest] = n
        if repeated:
            pairs = ", ".join(f"{a} and {b}" for a, b in repeated[:5])
            more = f" (and {len(repeated) - 5} more)" if len(repeated) > 5 else ""
            raise DuplicateSKUError(
                f"{csv_path}: lines {pairs}{more} name the same image; an image can be the reference of one SKU only"
            )
        with self.sessions() as s:
            clash = s.execute(
                select(ReferenceImage.sha256, ReferenceImage.sku_id).where(ReferenceImage.sha256.in_(list(first)))
            ).first()
            outlier = outlier_clash(s, list(first))
        if clash:
            raise DuplicateSKUError(f"{csv_path}:{first[clash[0]]}: this image is already a reference image of SKU {clash[1]!r}")
        if outlier:
            raise DuplicateSKUError(f"{csv_path}:{first[outlier[0]]}: {outlier_clash_message(outlier[1])}")

    def _check_can_add(self, items: Sequence[tuple[str, None]], append: bool) -> None:
        ids = [i for i, _ in items]
        with self.sessions() as s:
            existing = set(s.scalars(select(SKU.id).where(SKU.id.in_(ids))))
        if append:
            missing = [i for i in ids if i not in existing]
            if missing:
                raise UnknownSKUError(f"unknown SKU {missing[0]!r}: cannot append a reference image to it")
        elif existing:
            raise DuplicateSKUError(
                f"SKU {sorted(existing)[0]!r} already exists (remove it first, or use --append to add another reference image)"
            )

    def _write(self, prepared: Sequence[PreparedReference], *, append: bool) -> None:
        # Image files are written only while this transaction holds the writers' lock (taken by
        # lock_writers).  If anything fails, the commit included (a full disk), the files this
        # call created are deleted again by _delete_unreferenced, under the lock again and only
        # if no reference names them: a failed writer never deletes an image that another
        # writer's committed reference names.
        created: list[Path] = []
        try:
            with self.sessions.begin() as s:
                _gen, active_encoder = self.lock_writers(s)
                if any(p.encoder_id != active_encoder for p in prepared):
                    raise _EncoderChanged()
                if not append:
                    taken = s.scalars(select(SKU.id).where(SKU.id.in_([p.sku for p in prepared]))).first()
                    if taken is not None:
                        raise DuplicateSKUError(
                            f"SKU {taken!r} already exists (remove it first, or use --append to add another reference image)"
                        )
                hashes = [p.sha256 for p in prepared]
                if len(set(hashes)) != len(hashes):
                    raise DuplicateSKUError("the same image is given for more than one reference image")
                clash = s.execute(
                    select(ReferenceImage.sha256, ReferenceImage.sku_id).where(ReferenceImage.sha256.in_(hashes))
                ).first()
                if clash:
                    raise DuplicateSKUError(f"this image is already a reference image of SKU {clash[1]!r}")
                outlier = outlier_clash(s, hashes)
                if outlier:
                    raise DuplicateSKUError(outlier_clash_message(outlier[1]))
                for p in prepared:
                    dest = self.root / image_relpath(p.sha256, p.ext)
                    if not dest.exists():
                        created.append(dest)  # before the write: a failed write is cleaned up too
                        atomic_write(dest, p.data)
                    else:  # a leftover of an interrupted add: fresh mtime so `catalog check` keeps it
                        os.utime(dest)
                    crash_point("add.after_each_file")
                crash_point("add.after_file")
                for p in prepared:
                    if append:
                        sku_row = s.get(SKU, p.sku)
                        if sku_row is None:
                            raise UnknownSKUError(f"unknown SKU {p.sku!r}")
                        if p.name:
                            sku_row.name = p.name
                    else:
                        s.add(SKU(id=p.sku, name=p.name))
                    ref = ReferenceImage(
                        sku_id=p.sku, sha256=p.sha256, filename=image_relpath(p.sha256, p.ext),
                        size_bytes=len(p.data), width=p.width, height=p.height,
                    )
                    s.add(ref)
                    s.flush()
                    s.add_all(
                        Embedding(reference_id=ref.id, encoder_id=active_encoder, view=v, vector=encode_vector(vec))
                        for v, vec in enumerate(p.vectors)
                    )
                s.flush()
                crash_point("add.before_commit")
        except BaseException as e:
            failure = self._failed_write(e, created, "SKU already exists or the image is already stored")
            if failure is e:
                raise
            raise failure from None
        crash_point("add.after_commit")
        logger.info("added %d reference image(s): %s", len(prepared), ", ".join(p.sku for p in prepared[:5]))

    def remove(self, sku: str) -> None:
        """Remove an SKU, its reference images and vectors; recognition stops matching it at once.

        Raises:
            UnknownSKUError: no such SKU.
            ReadOnlyCatalogError: the catalog is read-only.
        """
        self.require_writable("remove an SKU")
        with self.sessions.begin() as s:
            self.lock_writers(s)
            row = find_sku(s, sku)
            files = [r.filename for r in row.references]
            s.execute(delete(Embedding).where(Embedding.reference_id.in_([r.id for r in row.references])))
            s.delete(row)
            s.flush()
            crash_point("remove.before_commit")
        crash_point("remove.after_commit")
        self._delete_unreferenced(files)
        logger.info("removed SKU %s", sku)

    def remove_reference(self, sku: str, image: str | os.PathLike) -> SKUInfo:
        """Remove one reference image of an SKU and its vectors (e.g. an in-store photo appended
        with ``--force`` that turned out to be a hub); recognition stops matching them at once.

        Args:
            sku: the SKU id.
            image: the image file that was added (identified by its content, SHA-256), or the
                catalog's stored copy of it.

        Returns:
            The SKU's :class:`SKUInfo` after the removal.

        Raises:
            UnknownSKUError: no such SKU.
            InvalidImageError: the file cannot be read.
            CatalogError: the image is not a reference image of this SKU, or it is the SKU's only
                one (remove the SKU instead).  Nothing is changed on any error.
            ReadOnlyCatalogError: the catalog is read-only.
        """
        self.require_writable("remove a reference image")
        digest = hashlib.sha256(read_image_bytes(image)).hexdigest()
        with self.sessions.begin() as s:
            self.lock_writers(s)
            row = find_sku(s, sku)
            ref = next((r for r in row.references if r.sha256 == digest), None)
            if ref is None:
                raise CatalogError(f"{image} is not a reference image of SKU {row.id!r}")
            if len(row.references) == 1:
                raise CatalogError(f"{image} is the only reference image of SKU {row.id!r}; remove the SKU instead "
                                   f"(catalog remove {row.id})")
            files = [ref.filename]
            s.execute(delete(Embedding).where(Embedding.reference_id == ref.id))
            s.delete(ref)
            s.flush()
        self._delete_unreferenced(files)
        logger.info("removed a reference image of SKU %s", sku)
        return self.get(sku)

    def _failed_write(self, e: BaseException, created: Sequence[Path], duplicate: str) -> BaseException:
        """After a write that raised ``e``: remove the files it ``created``; return the error to
        raise: a :class:`DuplicateSKUError` (``duplicate``: what was already there) for a
        uniqueness violation, a :class:`NoSpaceError` for a full disk, else ``e`` itself."""
        self._remove_created(created)
        if isinstance(e, IntegrityError):
            return DuplicateSKUError(f"{duplicate} ({str(e.orig).splitlines()[0]})")
        if is_no_space(e):
            return no_space_error(self.root, str(e))
        return e

    def _remove_created(self, created: Sequence[Path]) -> None:
        """Delete the image files a failed write created (see :meth:`_write`).  When even that
        cannot take the writers' lock (the disk is full for the database too), the files are
        deleted if no committed reference names them."""
        if not created:
            return
        rel = [str(p.relative_to(self.root)) for p in created]
        try:
            self._delete_unreferenced(rel, prune_dirs=True)
        except Exception as e:  # noqa: BLE001 - best effort: the write's own error is what is raised
            logger.warning("could not take the writers' lock to delete %d new image file(s) (%s); deleting unlocked",
                           len(rel), str(e).splitlines()[0] if str(e) else type(e).__name__)
            try:
                with self.sessions() as s:
                    used = used_filenames(s, rel)
            except Exception:  # noqa: BLE001
                used = set()
            unlink_all(self.root / f for f in rel if f not in used)
            prune_empty_dirs(self.root / f for f in rel)

    def _delete_unreferenced(self, files: Sequence[str], *, prune_dirs: bool = False) -> None:
        """Delete the stored image files among ``files`` that no reference row (of an SKU or an
        outlier) names.  Runs under
        the writers' lock (a no-op UPDATE of ``catalog_state``), like the file writes of
        :meth:`_write`, so an ``add`` of the same image cannot commit a reference to a file
        between the check and the unlink.  A crash before this leaves unreferenced files only."""
        with self.sessions.begin() as s:
            self.lock_writers(s, bump=False)
            used = used_filenames(s, files)
            for f in files:
                if f not in used:
                    (self.root / f).unlink(missing_ok=True)
            if prune_dirs:  # a failed write leaves the image store as it was, shard directories included
                prune_empty_dirs(self.root / f for f in files)


def used_filenames(s, files: Sequence[str]) -> set[str]:
    """The stored image files among ``files`` that a reference row names, an SKU's
    (``reference_images``) or an outlier's (``outlier_references``), in session ``s``."""
    files = list(files)
    return (set(s.scalars(select(ReferenceImage.filename).where(ReferenceImage.filename.in_(files))))
            | set(s.scalars(select(OutlierReference.filename).where(OutlierReference.filename.in_(files)))))
