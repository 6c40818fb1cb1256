"""The SKU catalog: a directory with a database, a content-addressed image store and the
catalog's encoder.

Layout of a catalog directory::

    DIR/catalog.db            SQLite database (default; any SQLAlchemy URL can be configured)
    DIR/catalog.json          {"db_url": ...} when the database is not the default SQLite file
    DIR/images/ab/<sha256>.<ext>   stored copies of reference images, named by content hash
    DIR/indexes/v000007/           versioned FAISS index snapshots (see catalog.index_store)

:class:`Catalog` is the one class users open; it is layered, one idea per module:
:class:`~catalog.connection.CatalogConnection` (sessions, the writers' lock, state, encoders) <
:class:`~catalog.reads.CatalogReader` (SKUs, vectors, index snapshots) <
:class:`~catalog.writes.CatalogWriter` (add, import, remove: all-or-nothing) <
:class:`~catalog.outliers.OutlierWriter` (outlier references: products not in the catalog) < :class:`Catalog`
(creating, opening and upgrading a catalog directory, and the index versions of
:mod:`catalog.rebuild`).

Index versions: the vectors in the database are the source of truth.  ``catalog rebuild`` (see
:mod:`catalog.rebuild`) writes an index *snapshot* into a versioned directory and switches the
active version in one transaction; recognizers load the active snapshot and apply the SKUs added
or removed since from the database, so ``add`` / ``remove`` never wait for a rebuild.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy.engine import Engine
from sqlalchemy.exc import DatabaseError

from retailklip.augment import DEFAULT_AUGMENTATIONS
from retailklip.encoders import DEFAULT_ENCODER_SPEC, create_encoder
from retailklip.hubness import DEFAULT_HUBNESS_K, check_hubness_k

from . import index_store, schema
from .connection import DEFAULT_THRESHOLD
from .encoders import center_on
from .database import DB_FILE, create_catalog_engine, is_no_space, no_space_error, read_only_error, writable
from .errors import CatalogError
from .imagestore import IMAGES_DIR, remove_new_entries
from .models import CatalogState, IndexVersion, VersionStatus
from .versions import VersionInfo, list_versions
from .outliers import OutlierWriter

if TYPE_CHECKING:  # pragma: no cover
    from retailklip.encoders import Encoder

logger = logging.getLogger(__name__)

CONFIG_FILE = "catalog.json"


def default_catalog_dir() -> Path:
    """``$RETAILKLIP_CATALOG``, else ``$XDG_DATA_HOME/retailklip/catalog`` (``~/.local/share/...``)."""
    env = os.environ.get("RETAILKLIP_CATALOG")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "retailklip" / "catalog"


class Catalog(OutlierWriter):
    """An SKU catalog (see module docstring).  Open with :meth:`open`, create with :meth:`init`.

    Thread safety: all methods may be called from several threads; each call uses its own
    database session.  Several processes may use one catalog (SQLite in WAL mode with a busy
    timeout serialises writers).
    """

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
        hubness_k: int | None = None,
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
            hubness_k: with ``center_photos``: rank the 1-NN by CSLS against them, each
                reference vector's hubness measured on its ``hubness_k`` most similar photos
                (:mod:`retailklip.hubness`; 0: plain 1-NN); None: 30
                (:data:`~retailklip.hubness.DEFAULT_HUBNESS_K`) with photos, else 0.  A k given
                without photos is stored and takes effect after a rebuild with photos.

        Raises:
            CatalogError: the directory already holds a catalog, or bad K / threshold.
            RetailKlipError: a hubness k that is not an integer >= 0.
            RetailKlipError / WeightsError: the encoder cannot be built.
        """
        root = Path(root).expanduser().resolve()
        if augmentations < 1:
            raise CatalogError(f"--augmentations must be >= 1, got {augmentations}")
        if not 0.0 <= threshold <= 2.0:
            raise CatalogError(f"--threshold is a cosine distance in [0, 2], got {threshold}")
        if hubness_k is None:
            hubness_k = DEFAULT_HUBNESS_K if center_photos is not None else 0
        hubness_k = check_hubness_k(hubness_k)
        if (root / DB_FILE).exists() or (root / CONFIG_FILE).exists():
            raise CatalogError(f"{root} already holds a catalog")
        options = dict(encoder_options or {})
        weights_path = str(Path(weights).expanduser().resolve()) if weights else None
        enc = create_encoder(encoder, weights=weights_path, random_init=random_init, device=device, **options)
        unlabeled = None
        if center_photos is not None:
            photos = list(center_photos)
            enc, unlabeled = center_on(enc, photos, progress=len(photos) > 64)
        engine = create_catalog_engine(root, db_url)
        if db_url and schema.is_initialised(engine):
            engine.dispose()
            raise CatalogError(f"the database {engine.url!r} already holds a catalog")
        existing = set(root.iterdir()) if root.is_dir() else None
        try:
            return cls._create(root, engine, enc, encoder, weights_path, options, augmentations, seed, threshold,
                               db_url, device, unlabeled, hubness_k)
        except BaseException as e:
            # A failed init (a full disk, a database error) leaves nothing behind: the next
            # `catalog init` must not find half a catalog.
            engine.dispose()
            remove_new_entries(root, existing)
            if is_no_space(e):
                raise no_space_error(root, str(e)) from None
            raise

    @classmethod
    def _create(cls, root: Path, engine: Engine, enc: Encoder, encoder: str, weights_path: str | None, options: dict,
                augmentations: int, seed: int, threshold: float, db_url: str | None, device: str,
                unlabeled=None, hubness_k: int = 0) -> Catalog:
        """The writing part of :meth:`init` (directory, schema, state row, index version 1)."""
        root.mkdir(parents=True, exist_ok=True)
        (root / IMAGES_DIR).mkdir(exist_ok=True)
        os.chmod(root, 0o750)
        if db_url:
            (root / CONFIG_FILE).write_text(json.dumps({"db_url": db_url}))
        schema.upgrade(engine)
        from retailklip.index import VectorIndex

        self = cls(root, engine, device=device)
        with self.sessions.begin() as s:
            if s.get(CatalogState, 1) is not None:
                raise CatalogError(f"the database {engine.url!r} already holds a catalog")
            enc_id = self.encoders.register(s, enc, str(encoder), weights_path, options, unlabeled)
            s.add(CatalogState(id=1, encoder_id=enc_id, augmentations=augmentations, seed=seed, threshold=threshold,
                               hubness_k=hubness_k))
            s.flush()
            # Version 1: the empty exact index; SKUs added later are applied from the database
            # until the first `catalog rebuild` snapshots them.
            v = IndexVersion(
                encoder_id=enc_id, factory="Flat", vectors=0, dim=enc.dim, augmentations=augmentations,
                recall_at_1=1.0, status=VersionStatus.READY, path="", generation=0, note="init", hubness_k=hubness_k,
            )
            s.add(v)
            s.flush()
            v.path = index_store.version_relpath(v.id)
            v.index_sha256 = index_store.write_version(
                root, v.id, VectorIndex(enc.dim), {"encoder_key": enc.identity.key, "factory": "Flat", "recall_at_1": 1.0}
            )
            s.get(CatalogState, 1).active_version_id = v.id
        self.encoders.remember(enc_id, enc)
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
            with self.sessions() as s:
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

    # ------------------------------------------------------------------ index versions
    def versions(self) -> list[VersionInfo]:
        """All index versions, newest first (:class:`catalog.versions.VersionInfo`)."""
        return list_versions(self)

    def rebuild(self, **kwargs) -> VersionInfo:
        """Re-embed and build a new index version, then switch to it atomically; see
        :func:`catalog.rebuild.rebuild` for the arguments."""
        from . import rebuild  # FAISS and the encoders load only when a rebuild runs

        return rebuild.rebuild(self, **kwargs)

    def rollback(self, version: int | None = None, **kwargs) -> VersionInfo:
        """Make an earlier index version active again; see :func:`catalog.rebuild.rollback`."""
        from . import rebuild

        return rebuild.rollback(self, version, **kwargs)
