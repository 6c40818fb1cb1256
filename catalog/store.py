"""The SKU catalog: a directory with a database, a content-addressed image store and the
catalog's encoder.

Layout of a catalog directory::

    DIR/catalog.db            SQLite database (default; any SQLAlchemy URL can be configured)
    DIR/catalog.json          {"db_url": ...} when the database is not the default SQLite file
    DIR/images/ab/<sha256>.<ext>   stored copies of reference images, named by content hash
    DIR/indexes/v000007/           versioned FAISS index snapshots (see catalog.index_store)

Every write is all-or-nothing: inputs are decoded, validated and embedded *before* anything is
written; the image file is written atomically (temporary file + rename) and the database rows
(SKU, reference image, embeddings, generation bump) in one transaction.  If the transaction
fails, a newly stored file is removed again; a crash in between leaves at most an unreferenced
file in the image store, which nothing reads.

Writers serialise on the single ``catalog_state`` row: every write transaction starts with
``UPDATE catalog_state SET generation = generation + 1`` (a row lock on PostgreSQL, the write lock
on SQLite), so the change counter never loses an update, and an ``add`` whose vectors were made by
an encoder that a concurrent ``catalog rebuild`` has just replaced notices it and re-embeds.

Index versions: the vectors in the database are the source of truth.  ``catalog rebuild`` (see
:mod:`catalog.rebuild`) writes an index *snapshot* into a versioned directory and switches the
active version in one transaction; recognizers load the active snapshot and apply the SKUs added
or removed since from the database, so ``add`` / ``remove`` never wait for a rebuild.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import re
import shutil
import threading
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from sqlalchemy import delete, func, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DatabaseError, IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from retailklip.augment import DEFAULT_AUGMENTATIONS
from retailklip.encoders import DEFAULT_ENCODER_SPEC, EncoderIdentity, create_encoder
from retailklip.errors import (
    CatalogError,
    DuplicateSKUError,
    InvalidSKUError,
    RetailKlipError,
    UnknownSKUError,
)
from retailklip.faults import crash_point
from retailklip.images import decode_image_bytes, read_image_bytes
from retailklip.references import embed_reference

from . import index_store, schema
from .database import DB_FILE, create_catalog_engine, is_no_space, no_space_error, read_only_error, writable
from .fileio import atomic_write
from .models import (
    NAME_MAX,
    SKU,
    SKU_ID_MAX,
    CatalogState,
    Embedding,
    EncoderRow,
    IndexVersion,
    ReferenceImage,
)

if TYPE_CHECKING:  # pragma: no cover
    from retailklip.encoders import Encoder
    from retailklip.index import VectorIndex

logger = logging.getLogger(__name__)

CONFIG_FILE = "catalog.json"
IMAGES_DIR = "images"
#: Default cosine-distance threshold (in [0, 2]); see docs/threshold.md.  ``catalog calibrate``
#: chooses one from labelled photos.
DEFAULT_THRESHOLD = 0.5

# ASCII (C0, DEL) and 8-bit (C1, U+0080-U+009F: e.g. U+009B, the CSI escape introducer that
# terminals obey) control characters.
_SKU_RE = re.compile(r"^[^\x00-\x1f\x7f-\x9f/\\]+$")
_CONTROL_RE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tif", "MPO": "jpg"}


def default_catalog_dir() -> Path:
    """``$RETAILKLIP_CATALOG``, else ``$XDG_DATA_HOME/retailklip/catalog`` (``~/.local/share/...``)."""
    env = os.environ.get("RETAILKLIP_CATALOG")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "retailklip" / "catalog"


def _is_utf8(text: str) -> bool:
    """False for text holding lone surrogates (how Python passes undecodable bytes of file names
    and arguments), which no database can store."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def validate_sku_id(sku: str) -> str:
    """Check an SKU id and return it in Unicode NFC: 1-128 characters, no control characters
    (ASCII C0 and DEL, NUL included, and the 8-bit C1 range U+0080-U+009F), no ``/`` or
    ``\\``, not ``.`` or ``..``, no leading/trailing whitespace.  NFC makes "café" typed with a
    combining accent (NFD, as macOS file names have it) and with a precomposed "é" one SKU.

    Raises:
        InvalidSKUError: with the reason.
    """
    if not isinstance(sku, str) or not sku:
        raise InvalidSKUError("SKU id must be a non-empty string")
    if not _is_utf8(sku):
        raise InvalidSKUError(f"SKU id {sku[:40]!r} is not valid Unicode text (undecodable bytes in a file name or argument?)")
    sku = unicodedata.normalize("NFC", sku)
    if len(sku) > SKU_ID_MAX:
        raise InvalidSKUError(f"SKU id is {len(sku)} characters long; the limit is {SKU_ID_MAX}")
    if not _SKU_RE.match(sku) or sku in (".", "..") or sku != sku.strip():
        raise InvalidSKUError(
            f"SKU id {sku[:40]!r} is not allowed: no control characters, '/', '\\', '.' or '..', "
            f"and no leading or trailing spaces"
        )
    return sku


def validate_name(name: str | None) -> str | None:
    """Check a display name and return it in Unicode NFC: at most 512 characters, no control
    characters (C0, DEL, C1) except tab and newline.

    Raises:
        InvalidSKUError: with the reason.
    """
    if name is None:
        return None
    if not _is_utf8(name):
        raise InvalidSKUError("SKU name is not valid Unicode text (undecodable bytes?)")
    name = unicodedata.normalize("NFC", name)
    if len(name) > NAME_MAX:
        raise InvalidSKUError(f"SKU name is {len(name)} characters long; the limit is {NAME_MAX}")
    if _CONTROL_RE.search(name):
        raise InvalidSKUError("SKU name contains control characters")
    return name


@dataclass(frozen=True)
class SKUInfo:
    """An SKU as listed by :meth:`Catalog.list_skus`."""

    sku: str
    name: str | None
    created: datetime
    references: int
    vectors: int

    def to_dict(self) -> dict:
        return {
            "sku": self.sku,
            "name": self.name,
            "created": self.created.isoformat(),
            "references": self.references,
            "vectors": self.vectors,
        }


@dataclass(frozen=True)
class AddedSKU(SKUInfo):
    """What :meth:`Catalog.add` returns: the SKU's :class:`SKUInfo` plus the other SKUs its new
    reference image could be confused with.

    Attributes:
        confusable_with: :class:`retailklip.matching.Neighbour` s (SKU id, cosine distance in
            [0, 2] from the new reference image's embedding to that SKU's nearest vector) of the
            other SKUs within the catalog's threshold, nearest first (at most 2: the 1-NN and
            the runner-up).  Non-empty means photos of either SKU may be recognised as the
            other: a near-duplicate SKU (the same product added twice) or siblings that need
            more reference images.
    """

    confusable_with: tuple = ()

    def to_dict(self) -> dict:
        return dict(super().to_dict(), confusable_with=[{"sku": n.sku, "distance": round(n.distance, 6)}
                                                        for n in self.confusable_with])


@dataclass(frozen=True)
class StateSnapshot:
    """What a reader needs to know to be current, read in one query (see :meth:`Catalog.snapshot`).

    Attributes:
        generation: the change counter.
        encoder_id: ``encoders`` row id of the active encoder.
        version_id: ``index_versions`` row id of the active index version (None: none built).
        threshold: cosine-distance threshold in [0, 2].
        augmentations: views per reference image K.
    """

    generation: int
    encoder_id: int
    version_id: int | None
    threshold: float
    augmentations: int


class _EncoderChanged(Exception):
    """The active encoder changed between embedding and writing (a rebuild swapped it)."""


@dataclass(frozen=True)
class _Prepared:
    """A validated, embedded reference image, ready to be written."""

    sku: str
    name: str | None
    data: bytes
    sha256: str
    ext: str
    width: int
    height: int
    vectors: np.ndarray  # (K, D) float32
    encoder_id: int  # the encoder that made ``vectors``


class Catalog:
    """An SKU catalog (see module docstring).  Open with :meth:`open`, create with :meth:`init`.

    Thread safety: all methods may be called from several threads; each call uses its own
    database session.  Several processes may use one catalog (SQLite in WAL mode with a busy
    timeout serialises writers).
    """

    def __init__(self, root: Path, engine: Engine, *, device: str = "cpu", read_only: bool = False) -> None:
        self.root = Path(root)
        self.engine = engine
        #: True when this process cannot write the catalog (see :mod:`catalog.database`):
        #: reads and recognition work, writes raise :class:`ReadOnlyCatalogError`.
        self.read_only = read_only
        self._sessions = sessionmaker(engine, expire_on_commit=False)
        self._device = device
        self._encoders: dict[int, Encoder] = {}
        self._encoder_lock = threading.Lock()
        self._recognizer = None  # the index `add` checks new references against (built on first use)

    # ------------------------------------------------------------------ opening
    @classmethod
    def init(
        cls,
        root: str | os.PathLike,
        *,
        encoder: str = DEFAULT_ENCODER_SPEC,
        weights: str | os.PathLike | None = None,
        augmentations: int = DEFAULT_AUGMENTATIONS,
        threshold: float = DEFAULT_THRESHOLD,
        seed: int = 0,
        db_url: str | None = None,
        encoder_options: dict | None = None,
        random_init: bool = False,
        device: str = "cpu",
        center_photos: Sequence[str | os.PathLike] | None = None,
    ) -> Catalog:
        """Create a catalog in directory ``root`` with the given encoder.

        The encoder is built once here, so a wrong spec, a missing weights file or missing
        network is reported before anything is created.

        Args:
            root: catalog directory (created if missing; must not already hold a catalog).
            encoder: encoder SPEC (``open_clip:MODEL/TAG`` or ``timm:MODEL``).
            weights: local weights file for the encoder.
            augmentations: views per reference image K (>= 1; 1 = no augmentation).
            threshold: cosine-distance threshold in [0, 2] beyond which a match is "unknown".
            seed: augmentation seed.
            db_url: SQLAlchemy URL of the database (default: SQLite file in ``root``).
            encoder_options: backend options passed to :func:`retailklip.create_encoder`.
            random_init: random encoder weights (tests only).
            device: torch device for the encoder.
            center_photos: unlabeled in-store photos whose mean feature becomes the encoder's
                centering vector (SimpleShot CL2N; see :class:`retailklip.encoders.Encoder`).
                A few hundred photos of the store suffice; no labels are needed.

        Raises:
            CatalogError: the directory already holds a catalog, or bad K / threshold.
            RetailKlipError / WeightsError: the encoder cannot be built.
        """
        root = Path(root).expanduser().resolve()
        if augmentations < 1:
            raise CatalogError(f"--augmentations must be >= 1, got {augmentations}")
        if not 0.0 <= threshold <= 2.0:
            raise CatalogError(f"--threshold is a cosine distance in [0, 2], got {threshold}")
        if (root / DB_FILE).exists() or (root / CONFIG_FILE).exists():
            raise CatalogError(f"{root} already holds a catalog")
        options = dict(encoder_options or {})
        weights_path = str(Path(weights).expanduser().resolve()) if weights else None
        enc = create_encoder(encoder, weights=weights_path, random_init=random_init, device=device, **options)
        if center_photos is not None:
            photos = list(center_photos)
            if not photos:
                raise CatalogError("no photos to compute the feature centre from")
            enc = enc.with_center(enc.mean_feature(photos, progress=len(photos) > 64))
        engine = create_catalog_engine(root, db_url)
        if db_url and schema.is_initialised(engine):
            engine.dispose()
            raise CatalogError(f"the database {engine.url!r} already holds a catalog")
        existing = set(root.iterdir()) if root.is_dir() else None
        try:
            return cls._create(root, engine, enc, encoder, weights_path, options, augmentations, seed, threshold,
                               db_url, device)
        except BaseException as e:
            # A failed init (a full disk, a database error) leaves nothing behind: the next
            # `catalog init` must not find half a catalog.
            engine.dispose()
            _remove_new_entries(root, existing)
            if is_no_space(e):
                raise no_space_error(root, str(e)) from None
            raise

    @classmethod
    def _create(cls, root: Path, engine: Engine, enc: Encoder, encoder: str, weights_path: str | None, options: dict,
                augmentations: int, seed: int, threshold: float, db_url: str | None, device: str) -> Catalog:
        """The writing part of :meth:`init` (directory, schema, state row, index version 1)."""
        root.mkdir(parents=True, exist_ok=True)
        (root / IMAGES_DIR).mkdir(exist_ok=True)
        os.chmod(root, 0o750)
        if db_url:
            (root / CONFIG_FILE).write_text(json.dumps({"db_url": db_url}))
        schema.upgrade(engine)
        from retailklip.index import VectorIndex

        self = cls(root, engine, device=device)
        with self._sessions.begin() as s:
            if s.get(CatalogState, 1) is not None:
                raise CatalogError(f"the database {engine.url!r} already holds a catalog")
            row = _encoder_row(s, enc, str(encoder), weights_path, options)
            s.add(CatalogState(id=1, encoder_id=row.id, augmentations=augmentations, seed=seed, threshold=threshold))
            s.flush()
            # Version 1: the empty exact index; SKUs added later are applied from the database
            # until the first `catalog rebuild` snapshots them.
            v = IndexVersion(
                encoder_id=row.id, factory="Flat", vectors=0, dim=enc.dim, augmentations=augmentations,
                recall_at_1=1.0, status="ready", path="", generation=0, note="init",
            )
            s.add(v)
            s.flush()
            v.path = index_store.version_relpath(v.id)
            v.index_sha256 = index_store.write_version(
                root, v.id, VectorIndex(enc.dim), {"encoder_key": enc.identity.key, "factory": "Flat", "recall_at_1": 1.0}
            )
            s.get(CatalogState, 1).active_version_id = v.id
        self._encoders[row.id] = enc
        logger.info("initialised catalog %s with encoder %s", root, enc.identity.key)
        return self

    @staticmethod
    def _locate(root: str | os.PathLike, db_url: str | None) -> tuple[Path, str | None]:
        """The resolved catalog directory and its database URL (``catalog.json``'s, if any).

        Raises:
            CatalogError: no catalog there (with the command that creates one).
        """
        root = Path(root).expanduser().resolve()
        if db_url is None and (root / CONFIG_FILE).exists():
            db_url = json.loads((root / CONFIG_FILE).read_text()).get("db_url")
        if db_url is None and not (root / DB_FILE).exists():
            raise CatalogError(f"no catalog at {root}; create one with `catalog --catalog {root} init`")
        return root, db_url

    @classmethod
    def open(cls, root: str | os.PathLike, *, db_url: str | None = None, device: str = "cpu") -> Catalog:
        """Open an existing catalog directory.

        Raises:
            CatalogError: no catalog there (with the command that creates one).
        """
        root, db_url = cls._locate(root, db_url)
        ro = db_url is None and not writable(root, root / DB_FILE)
        engine = create_catalog_engine(root, db_url, read_only=ro)
        schema.ensure_current(engine)
        self = cls(root, engine, device=device, read_only=ro)
        try:
            with self._sessions() as s:
                state = s.get(CatalogState, 1)
        except DatabaseError as e:
            raise CatalogError(f"{root}: not a readable catalog database ({str(e).splitlines()[0]})") from None
        if state is None:
            raise CatalogError(f"{root}: the catalog database is not initialised")
        return self

    @classmethod
    def upgrade(cls, root: str | os.PathLike, *, db_url: str | None = None) -> tuple[str | None, str]:
        """Migrate a catalog's database to the schema this retailklip needs (``catalog upgrade``).

        Returns:
            ``(before, after)`` schema revisions (equal when there was nothing to do).

        Raises:
            CatalogError: no catalog there, or its schema is newer than this retailklip.
        """
        root, db_url = cls._locate(root, db_url)
        if db_url is None and not writable(root, root / DB_FILE):
            raise read_only_error(root, "upgrade its schema")
        engine = create_catalog_engine(root, db_url)
        try:
            if not schema.is_initialised(engine):
                raise CatalogError(f"{root}: the catalog database is not initialised")
            return schema.upgrade(engine)
        finally:
            engine.dispose()

    # ------------------------------------------------------------------ state
    def _state(self, s: Session) -> CatalogState:
        return s.get(CatalogState, 1)

    @property
    def generation(self) -> int:
        """Change counter: bumped by every add/remove/settings change (one cheap query)."""
        with self.engine.connect() as c:
            return int(c.execute(select(CatalogState.generation).where(CatalogState.id == 1)).scalar_one())

    def snapshot(self) -> StateSnapshot:
        """Generation, active encoder and index version, threshold and K in one query."""
        with self.engine.connect() as c:
            r = c.execute(
                select(
                    CatalogState.generation, CatalogState.encoder_id, CatalogState.active_version_id,
                    CatalogState.threshold, CatalogState.augmentations,
                ).where(CatalogState.id == 1)
            ).one()
        return StateSnapshot(int(r[0]), int(r[1]), None if r[2] is None else int(r[2]), float(r[3]), int(r[4]))

    def require_writable(self, what: str = "write") -> None:
        """Raise :class:`ReadOnlyCatalogError` (naming ``what``) if this catalog is read-only."""
        if self.read_only:
            raise read_only_error(self.root, what)

    def _lock_state(self, s: Session, *, bump: bool = True) -> tuple[int, int]:
        """Start a write: update the state row as the transaction's first statement, which takes
        the writers' lock (SQLite's write lock, PostgreSQL's row lock on ``catalog_state``).  With
        ``bump`` the generation is incremented (never losing an increment); without it the lock
        is taken for file operations that readers need not notice.  Returns ``(generation,
        active encoder id)``.

        Raises:
            ReadOnlyCatalogError: the catalog is read-only (before anything is written).
        """
        self.require_writable()
        r = s.execute(
            update(CatalogState)
            .where(CatalogState.id == 1)
            .values(generation=CatalogState.generation + (1 if bump else 0))
            .returning(CatalogState.generation, CatalogState.encoder_id)
        ).one()
        return int(r[0]), int(r[1])

    def settings(self) -> dict:
        """Catalog settings: encoder identity and spec, K, seed, threshold, segmenter, generation."""
        with self._sessions() as s:
            st = self._state(s)
            enc = s.get(EncoderRow, st.encoder_id)
            return {
                "encoder": enc.spec,
                "encoder_key": enc.key,
                "weights": enc.weights_path,
                "dim": enc.dim,
                "augmentations": st.augmentations,
                "seed": st.seed,
                "threshold": st.threshold,
                "segmenter": st.segmenter,
                "segmenter_checkpoint": st.segmenter_checkpoint,
                "generation": st.generation,
                "index_version": st.active_version_id,
            }

    @property
    def threshold(self) -> float:
        """The catalog's cosine-distance threshold in [0, 2]."""
        with self._sessions() as s:
            return float(self._state(s).threshold)

    def set_threshold(self, threshold: float) -> None:
        """Store a new cosine-distance threshold (in [0, 2])."""
        if not 0.0 <= threshold <= 2.0:
            raise CatalogError(f"threshold is a cosine distance in [0, 2], got {threshold}")
        with self._sessions.begin() as s:
            self._lock_state(s)
            s.execute(update(CatalogState).where(CatalogState.id == 1).values(threshold=float(threshold)))

    def set_segmenter(self, name: str | None, checkpoint: str | None = None) -> None:
        """Remember a default segmenter (name and checkpoint path) for ``recognize``."""
        with self._sessions.begin() as s:
            self._lock_state(s)
            st = self._state(s)
            st.segmenter = name
            st.segmenter_checkpoint = str(Path(checkpoint).resolve()) if checkpoint else None

    def encoder_identity(self, encoder_id: int | None = None) -> EncoderIdentity:
        """The identity of the catalog's active encoder (or of ``encoder_id``), as stored."""
        with self._sessions() as s:
            row = s.get(EncoderRow, encoder_id if encoder_id is not None else self._state(s).encoder_id)
            if row is None:
                raise CatalogError(f"no encoder with id {encoder_id}")
            center = "none" if row.center is None else "sha256:" + hashlib.sha256(row.center).hexdigest()
            return EncoderIdentity(row.backend, row.model, row.weights, row.dim, row.preprocess, center)

    def encoder_kwargs(self, encoder_id: int | None = None) -> dict:
        """Keyword arguments of :func:`retailklip.encoders.create_encoder` that rebuild the active
        encoder (or ``encoder_id``) in another process, e.g. a Ray worker: ``spec``, ``weights``,
        ``random_init``, ``center`` (float32 (D,) or None) and the backend options."""
        with self._sessions() as s:
            row = s.get(EncoderRow, encoder_id if encoder_id is not None else self._state(s).encoder_id)
            if row is None:
                raise CatalogError(f"no encoder with id {encoder_id}")
            return dict(
                json.loads(row.options),
                spec=row.spec,
                weights=row.weights_path,
                random_init=row.weights.startswith("random:"),
                center=None if row.center is None else np.frombuffer(row.center, np.float32).copy(),
            )

    def encoder(self) -> Encoder:
        """The catalog's active encoder (the one ``add`` embeds with); see :meth:`encoder_for`."""
        return self.encoder_for(self.snapshot().encoder_id)

    def encoder_for(self, encoder_id: int) -> Encoder:
        """The encoder of ``encoders`` row ``encoder_id``, built on first use (then cached) and
        checked against the stored identity.

        Raises:
            WeightsError: the weights file is gone.
            EncoderMismatchError: the weights file or preprocessing changed since the vectors
                were made (run ``catalog rebuild``).
        """
        with self._encoder_lock:
            enc = self._encoders.get(encoder_id)
            if enc is None:
                kw = self.encoder_kwargs(encoder_id)
                enc = create_encoder(kw.pop("spec"), device=self._device, **kw)
                self.encoder_identity(encoder_id).check_same(enc.identity)
                self._encoders[encoder_id] = enc
            return enc

    def _active_encoder(self) -> tuple[int, Encoder]:
        enc_id = self.snapshot().encoder_id
        return enc_id, self.encoder_for(enc_id)

    # ------------------------------------------------------------------ writes
    def _prepare(
        self, image: str | os.PathLike, sku: str | None, name: str | None, encoder: Encoder, k: int, seed: int,
        encoder_id: int,
    ) -> _Prepared:
        path = Path(image)
        sku = validate_sku_id(sku if sku is not None else path.stem)
        name = validate_name(name)
        data = read_image_bytes(path)
        im = decode_image_bytes(data, str(path))
        fmt = _detect_format(data)
        vectors = embed_reference(encoder, im, k, seed)
        return _Prepared(sku, name, data, hashlib.sha256(data).hexdigest(), fmt, im.width, im.height, vectors, encoder_id)

    def add(self, image: str | os.PathLike, sku: str | None = None, name: str | None = None, *, append: bool = False) -> SKUInfo:
        """Add an SKU from one reference image (or, with ``append``, another reference image to
        an existing SKU).  The SKU is searchable as soon as this returns.

        Args:
            image: reference image path (a packshot; any format PIL reads).
            sku: SKU id (default: the file name without extension).
            name: display name.
            append: add a further reference image to the existing SKU ``sku``.

        Returns:
            The SKU's :class:`AddedSKU` (its :class:`SKUInfo` and the other SKUs within the
            threshold of the new reference image, which are also logged).

        Raises:
            InvalidImageError, InvalidSKUError, DuplicateSKUError (id exists, or this exact image
            is already a reference), UnknownSKUError (``append`` to a missing SKU),
            ReadOnlyCatalogError, NoSpaceError.  On any error nothing is written.
        """
        self.require_writable("add an SKU")
        st = self.settings()
        sku_id = validate_sku_id(sku if sku is not None else Path(image).stem)
        self._check_can_add([(sku_id, None)], append)
        for _attempt in range(3):
            enc_id, enc = self._active_encoder()
            prepared = self._prepare(image, sku_id, name, enc, st["augmentations"], st["seed"], enc_id)
            confusable = self._confusable(prepared, st["threshold"])
            try:
                self._write([prepared], append=append)
                break
            except _EncoderChanged:
                logger.info("the active encoder changed during add (a rebuild finished); embedding again")
        else:
            raise CatalogError("the active encoder kept changing during add; try again")
        info = self.get(prepared.sku)
        for n in confusable:
            logger.info("SKU %r: its reference image is within the threshold (%.3f) of SKU %r (cosine distance "
                        "%.3f): photos of one may be recognised as the other", info.sku, st["threshold"], n.sku,
                        n.distance)
        return AddedSKU(**vars(info), confusable_with=confusable)

    def _confusable(self, prepared: _Prepared, threshold: float) -> tuple:
        """Other SKUs within ``threshold`` of ``prepared``'s reference image (view 0), searched in
        the catalog's current index (the same one recognition uses)."""
        from retailklip.recognizer import Recognizer

        with self._encoder_lock:
            if self._recognizer is None:
                self._recognizer = Recognizer(self)
            rec = self._recognizer
        matches = rec.match_embeddings(prepared.vectors[:1], self.encoder_for(prepared.encoder_id).identity.key, threshold)
        if matches is None:
            return ()
        m = matches[0]
        near = [n for n in (m.nearest, m.runner_up) if n is not None and n.sku != prepared.sku]
        return tuple(n for n in near if n.distance <= threshold)

    def import_csv(self, csv_path: str | os.PathLike, *, progress: bool = True) -> int:
        """Bulk-add SKUs from a CSV with columns ``image,sku,name`` (image paths relative to the CSV).

        All-or-nothing: every row is validated and embedded first; then all rows are written in
        one transaction.

        Returns:
            The number of SKUs added.

        Raises:
            CatalogError: missing file or columns, empty CSV, duplicate ids within the CSV; any
                error of :meth:`add` for a row (prefixed with the row number).
        """
        self.require_writable("import SKUs")
        path = Path(csv_path)
        if not path.is_file():
            raise CatalogError(f"{path}: no such CSV file")
        try:
            with open(path, newline="", encoding="utf-8-sig") as f:
                reader = csv.DictReader(f)
                cols = [c.strip() for c in (reader.fieldnames or [])]
                missing = [c for c in ("image", "sku") if c not in cols]
                if missing:
                    raise CatalogError(f"{path}: missing column(s) {', '.join(missing)}; expected image,sku,name")
                rows = [{(k or "").strip(): (v or "").strip() for k, v in r.items()} for r in reader]
        except UnicodeDecodeError:
            raise CatalogError(f"{path}: not a UTF-8 CSV file") from None
        except csv.Error as e:
            raise CatalogError(f"{path}: not a valid CSV file ({e})") from None
        if not rows:
            raise CatalogError(f"{path}: no rows")
        entries = []
        for n, r in enumerate(rows, start=2):
            if not r.get("image") or not r.get("sku"):
                raise CatalogError(f"{path}:{n}: empty image or sku")
            try:
                entries.append((validate_sku_id(r["sku"]), validate_name(r.get("name") or None), path.parent / r["image"]))
            except RetailKlipError as e:
                raise type(e)(f"{path}:{n}: {e}") from None
        ids = [e[0] for e in entries]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise DuplicateSKUError(f"{path}: SKU id(s) repeated in the CSV: {', '.join(dupes[:5])}")
        self._check_can_add([(i, None) for i in ids], append=False)
        self._check_distinct_images(path, [img for _sku, _name, img in entries])
        st = self.settings()
        for _attempt in range(3):
            enc_id, enc = self._active_encoder()
            prepared = []
            it: Iterable = enumerate(entries, start=2)
            if progress:
                from tqdm import tqdm

                it = tqdm(list(it), desc="importing", unit="SKU")
            for n, (sku, name, img) in it:
                try:
                    prepared.append(self._prepare(img, sku, name, enc, st["augmentations"], st["seed"], enc_id))
                except RetailKlipError as e:
                    raise type(e)(f"{path}:{n}: {e}") from None
                crash_point("import.row")
            try:
                self._write(prepared, append=False)
                break
            except _EncoderChanged:
                logger.info("the active encoder changed during import (a rebuild finished); embedding again")
        else:
            raise CatalogError("the active encoder kept changing during import; try again")
        return len(prepared)

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
        with self._sessions() as s:
            clash = s.execute(
                select(ReferenceImage.sha256, ReferenceImage.sku_id).where(ReferenceImage.sha256.in_(list(first)))
            ).first()
        if clash:
            raise DuplicateSKUError(f"{csv_path}:{first[clash[0]]}: this image is already a reference image of SKU {clash[1]!r}")

    def _check_can_add(self, items: Sequence[tuple[str, None]], append: bool) -> None:
        ids = [i for i, _ in items]
        with self._sessions() as s:
            existing = set(s.scalars(select(SKU.id).where(SKU.id.in_(ids))))
        if append:
            missing = [i for i in ids if i not in existing]
            if missing:
                raise UnknownSKUError(f"unknown SKU {missing[0]!r}: cannot append a reference image to it")
        elif existing:
            raise DuplicateSKUError(
                f"SKU {sorted(existing)[0]!r} already exists (remove it first, or use --append to add another reference image)"
            )

    def _write(self, prepared: Sequence[_Prepared], *, append: bool) -> None:
        # Image files are written only while this transaction holds the writers' lock (taken by
        # _lock_state).  If anything fails, the commit included (a full disk), the files this
        # call created are deleted again by _delete_unreferenced, under the lock again and only
        # if no reference names them: a failed writer never deletes an image that another
        # writer's committed reference names.
        created: list[Path] = []
        try:
            with self._sessions.begin() as s:
                _gen, active_encoder = self._lock_state(s)
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
                for p in prepared:
                    dest = self.root / _image_relpath(p.sha256, p.ext)
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
                        sku_id=p.sku, sha256=p.sha256, filename=_image_relpath(p.sha256, p.ext),
                        size_bytes=len(p.data), width=p.width, height=p.height,
                    )
                    s.add(ref)
                    s.flush()
                    s.add_all(
                        Embedding(reference_id=ref.id, encoder_id=active_encoder, view=v, vector=vec.tobytes())
                        for v, vec in enumerate(p.vectors)
                    )
                s.flush()
                crash_point("add.before_commit")
        except BaseException as e:
            self._remove_created(created)
            if isinstance(e, IntegrityError):
                raise DuplicateSKUError(
                    f"SKU already exists or the image is already stored ({str(e.orig).splitlines()[0]})"
                ) from None
            if is_no_space(e):
                raise no_space_error(self.root, str(e)) from None
            raise
        crash_point("add.after_commit")
        logger.info("added %d reference image(s): %s", len(prepared), ", ".join(p.sku for p in prepared[:5]))

    def remove(self, sku: str) -> None:
        """Remove an SKU, its reference images and vectors; recognition stops matching it at once.

        Raises:
            UnknownSKUError: no such SKU.
            ReadOnlyCatalogError: the catalog is read-only.
        """
        self.require_writable("remove an SKU")
        with self._sessions.begin() as s:
            self._lock_state(s)
            row = _find_sku(s, sku)
            files = [r.filename for r in row.references]
            s.execute(delete(Embedding).where(Embedding.reference_id.in_([r.id for r in row.references])))
            s.delete(row)
            s.flush()
            crash_point("remove.before_commit")
        crash_point("remove.after_commit")
        self._delete_unreferenced(files)
        logger.info("removed SKU %s", sku)

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
                with self._sessions() as s:
                    used = set(s.scalars(select(ReferenceImage.filename).where(ReferenceImage.filename.in_(rel))))
            except Exception:  # noqa: BLE001
                used = set()
            _unlink_all(self.root / f for f in rel if f not in used)
            _prune_empty_dirs(self.root / f for f in rel)

    def _delete_unreferenced(self, files: Sequence[str], *, prune_dirs: bool = False) -> None:
        """Delete the stored image files among ``files`` that no reference row names.  Runs under
        the writers' lock (a no-op UPDATE of ``catalog_state``), like the file writes of
        :meth:`_write`, so an ``add`` of the same image cannot commit a reference to a file
        between the check and the unlink.  A crash before this leaves unreferenced files only."""
        with self._sessions.begin() as s:
            self._lock_state(s, bump=False)
            used = set(s.scalars(select(ReferenceImage.filename).where(ReferenceImage.filename.in_(list(files)))))
            for f in files:
                if f not in used:
                    (self.root / f).unlink(missing_ok=True)
            if prune_dirs:  # a failed write leaves the image store as it was, shard directories included
                _prune_empty_dirs(self.root / f for f in files)

    # ------------------------------------------------------------------ reads
    def get(self, sku: str) -> SKUInfo:
        """One SKU's :class:`SKUInfo`.  Raises :class:`UnknownSKUError`."""
        infos = self.list_skus(_id_forms(sku))
        if not infos:
            raise UnknownSKUError(f"unknown SKU {sku!r}")
        return infos[0]

    def list_skus(self, only: Sequence[str] | None = None) -> list[SKUInfo]:
        """All SKUs (or those in ``only``), sorted by id, with reference and vector counts."""
        with self._sessions() as s:
            enc_id = self._state(s).encoder_id
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
        with self._sessions() as s:
            return int(s.scalar(select(func.count(SKU.id))))

    def embedding_table(self, encoder_id: int | None = None) -> tuple[np.ndarray, list[str]]:
        """Ids of all vectors made by the catalog's active encoder (or ``encoder_id``) and the SKU
        of each.

        Returns:
            ``(ids, skus)``: int64 (N,) embedding row ids (ascending) and the SKU id of each row.
        """
        with self._sessions() as s:
            enc_id = self._state(s).encoder_id if encoder_id is None else encoder_id
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
        out = np.empty((len(ids), dim), np.float32)
        seen = np.zeros(len(ids), bool)
        pos = {int(i): n for n, i in enumerate(ids)}
        with self._sessions() as s:
            for c in range(0, len(ids), chunk):
                part = [int(i) for i in ids[c : c + chunk]]
                for i, blob in s.execute(select(Embedding.id, Embedding.vector).where(Embedding.id.in_(part))):
                    if len(blob) != 4 * dim:
                        raise CatalogError(
                            f"vector {i} in the database has {len(blob)} bytes, not {4 * dim}; run `catalog check --repair`"
                        )
                    out[pos[i]] = np.frombuffer(blob, np.float32)
                    seen[pos[i]] = True
        return np.asarray(ids, np.int64)[seen], out[seen]

    # ------------------------------------------------------------------ index versions
    def load_index(self, version_id: int | None, *, verify: bool = False) -> VectorIndex:
        """The index snapshot of an index version (see :mod:`catalog.index_store`).

        Raises:
            IndexFileError: the version's files are missing or do not match its record.
            CatalogError: no such version.
        """
        if version_id is None:
            raise CatalogError("the catalog has no active index version; run `catalog rebuild`")
        with self._sessions() as s:
            v = s.get(IndexVersion, version_id)
            if v is None:
                raise CatalogError(f"no index version {version_id}")
            path, sha = v.path, v.index_sha256
        return index_store.read_version(self.root, path, expected_sha256=sha, verify=verify)

    def versions(self) -> list:
        """All index versions, newest first (:class:`catalog.rebuild.VersionInfo`)."""
        from .rebuild import list_versions

        return list_versions(self)

    def rebuild(self, **kwargs):
        """Re-embed and build a new index version, then switch to it atomically; see
        :func:`catalog.rebuild.rebuild` for the arguments."""
        from .rebuild import rebuild

        return rebuild(self, **kwargs)

    def rollback(self, version: int | None = None, **kwargs):
        """Make an earlier index version active again; see :func:`catalog.rebuild.rollback`."""
        from .rebuild import rollback

        return rollback(self, version, **kwargs)

    def names(self) -> dict[str, str | None]:
        """SKU id -> display name."""
        with self._sessions() as s:
            return dict(s.execute(select(SKU.id, SKU.name)).all())

    def reference_path(self, sku: str) -> list[Path]:
        """Paths of the stored reference images of an SKU."""
        with self._sessions() as s:
            sku = _find_sku(s, sku).id
            return [self.root / f for f in s.scalars(select(ReferenceImage.filename).where(ReferenceImage.sku_id == sku))]

    def close(self) -> None:
        """Release database connections."""
        self.engine.dispose()


def _encoder_row(s: Session, enc: Encoder, spec: str, weights_path, options: dict) -> EncoderRow:
    ident = enc.identity
    row = s.scalar(select(EncoderRow).where(EncoderRow.key == ident.key))
    if row is None:
        row = EncoderRow(
            key=ident.key, backend=ident.backend, model=ident.model, weights=ident.weights, dim=ident.dim,
            preprocess=ident.preprocess, spec=spec, weights_path=weights_path, options=json.dumps(options, sort_keys=True),
            center=None if enc.center is None else enc.center.numpy().tobytes(),
        )
        s.add(row)
        s.flush()
    return row


def _id_forms(sku: str) -> list[str]:
    """The forms an SKU id given by a user may be stored in: NFC (how ids are stored since they
    are normalised) and, for catalogs from before that, the text as given."""
    forms = [unicodedata.normalize("NFC", sku)] if isinstance(sku, str) and _is_utf8(sku) else []
    return forms + [sku] if sku not in forms else forms


def _find_sku(s: Session, sku: str) -> SKU:
    """The SKU row of a user-given id (:func:`_id_forms`).  Raises :class:`UnknownSKUError`."""
    for form in _id_forms(sku):
        row = s.get(SKU, form)
        if row is not None:
            return row
    raise UnknownSKUError(f"unknown SKU {sku!r}")


def _image_relpath(sha256: str, ext: str) -> str:
    return f"{IMAGES_DIR}/{sha256[:2]}/{sha256}.{ext}"


def _detect_format(data: bytes) -> str:
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            return _EXT.get(im.format or "", "img")
    except Exception:  # noqa: BLE001 - already decoded once; fall back to a neutral extension
        return "img"


def _remove_new_entries(root: Path, existing: set[Path] | None) -> None:
    """Undo a failed ``init``: remove ``root`` if it did not exist (``existing`` None), else the
    entries in it that are not in ``existing``."""
    if existing is None:
        shutil.rmtree(root, ignore_errors=True)
        return
    if root.is_dir():
        for p in root.iterdir():
            if p not in existing:
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)


def _prune_empty_dirs(files: Iterable[Path]) -> None:
    """Remove the (shard) directories of ``files`` that are now empty."""
    for d in {p.parent for p in files}:
        try:
            d.rmdir()
        except OSError:  # not empty (or gone): keep it
            pass


def _unlink_all(paths: Iterable[Path]) -> None:
    for p in paths:
        p.unlink(missing_ok=True)
