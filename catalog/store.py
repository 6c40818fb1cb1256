"""The SKU catalog: a directory with a database, a content-addressed image store and the
catalog's encoder.

Layout of a catalog directory::

    DIR/catalog.db            SQLite database (default; any SQLAlchemy URL can be configured)
    DIR/catalog.json          {"db_url": ...} when the database is not the default SQLite file
    DIR/images/ab/<sha256>.<ext>   stored copies of reference images, named by content hash

Every write is all-or-nothing: inputs are decoded, validated and embedded *before* anything is
written; the image file is written atomically (temporary file + rename) and the database rows
(SKU, reference image, embeddings, generation bump) in one transaction.  If the transaction
fails, a newly stored file is removed again; a crash in between leaves at most an unreferenced
file in the image store, which nothing reads.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import re
import tempfile
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
from sqlalchemy import create_engine, delete, event, func, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DatabaseError, IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from retailklip.augment import DEFAULT_AUGMENTATIONS, augment_reference
from retailklip.encoders import DEFAULT_ENCODER_SPEC, Encoder, EncoderIdentity, create_encoder
from retailklip.errors import (
    CatalogError,
    DuplicateSKUError,
    InvalidSKUError,
    RetailKlipError,
    UnknownSKUError,
)
from retailklip.images import decode_image_bytes, read_image_bytes

from .models import NAME_MAX, SKU, SKU_ID_MAX, Base, CatalogState, Embedding, EncoderRow, ReferenceImage

logger = logging.getLogger(__name__)

DB_FILE = "catalog.db"
CONFIG_FILE = "catalog.json"
IMAGES_DIR = "images"
#: Default cosine-distance threshold (in [0, 2]); see docs/threshold.md.  ``catalog calibrate``
#: chooses one from labelled photos.
DEFAULT_THRESHOLD = 0.5

_SKU_RE = re.compile(r"^[^\x00-\x1f\x7f/\\]+$")
_CONTROL_RE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tif", "MPO": "jpg"}


def default_catalog_dir() -> Path:
    """``$RETAILKLIP_CATALOG``, else ``$XDG_DATA_HOME/retailklip/catalog`` (``~/.local/share/...``)."""
    env = os.environ.get("RETAILKLIP_CATALOG")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "retailklip" / "catalog"


def validate_sku_id(sku: str) -> str:
    """Check an SKU id: 1-128 characters, no control characters (NUL included), no ``/`` or
    ``\\``, not ``.`` or ``..``, no leading/trailing whitespace.

    Raises:
        InvalidSKUError: with the reason.
    """
    if not isinstance(sku, str) or not sku:
        raise InvalidSKUError("SKU id must be a non-empty string")
    if len(sku) > SKU_ID_MAX:
        raise InvalidSKUError(f"SKU id is {len(sku)} characters long; the limit is {SKU_ID_MAX}")
    if not _SKU_RE.match(sku) or sku in (".", "..") or sku != sku.strip():
        raise InvalidSKUError(
            f"SKU id {sku[:40]!r} is not allowed: no control characters, '/', '\\', '.' or '..', "
            f"and no leading or trailing spaces"
        )
    return sku


def validate_name(name: str | None) -> str | None:
    """Check a display name: at most 512 characters, no control characters except tab/newline.

    Raises:
        InvalidSKUError: with the reason.
    """
    if name is None:
        return None
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


class Catalog:
    """An SKU catalog (see module docstring).  Open with :meth:`open`, create with :meth:`init`.

    Thread safety: all methods may be called from several threads; each call uses its own
    database session.  Several processes may use one catalog (SQLite in WAL mode with a busy
    timeout serialises writers).
    """

    def __init__(self, root: Path, engine: Engine, *, device: str = "cpu") -> None:
        self.root = Path(root)
        self.engine = engine
        self._sessions = sessionmaker(engine, expire_on_commit=False)
        self._device = device
        self._encoder: Encoder | None = None
        self._encoder_lock = threading.Lock()

    # ------------------------------------------------------------------ opening
    @staticmethod
    def _engine(root: Path, db_url: str | None) -> Engine:
        url = db_url or f"sqlite:///{root / DB_FILE}"
        engine = create_engine(url, connect_args={"timeout": 60} if url.startswith("sqlite") else {})
        if engine.dialect.name == "sqlite":

            @event.listens_for(engine, "connect")
            def _pragmas(dbapi_conn, _record):  # noqa: ANN001
                cur = dbapi_conn.cursor()
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute("PRAGMA synchronous=FULL")
                cur.execute("PRAGMA foreign_keys=ON")
                cur.execute("PRAGMA busy_timeout=60000")
                cur.close()

        return engine

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
    ) -> "Catalog":
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
        root = Path(root).expanduser()
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
        root.mkdir(parents=True, exist_ok=True)
        (root / IMAGES_DIR).mkdir(exist_ok=True)
        os.chmod(root, 0o750)
        if db_url:
            (root / CONFIG_FILE).write_text(json.dumps({"db_url": db_url}))
        engine = cls._engine(root, db_url)
        Base.metadata.create_all(engine)
        self = cls(root, engine, device=device)
        with self._sessions.begin() as s:
            if s.get(CatalogState, 1) is not None:
                raise CatalogError(f"the database {engine.url!r} already holds a catalog")
            row = _encoder_row(s, enc, str(encoder), weights_path, options)
            s.add(CatalogState(id=1, encoder_id=row.id, augmentations=augmentations, seed=seed, threshold=threshold))
        self._encoder = enc
        logger.info("initialised catalog %s with encoder %s", root, enc.identity.key)
        return self

    @classmethod
    def open(cls, root: str | os.PathLike, *, db_url: str | None = None, device: str = "cpu") -> "Catalog":
        """Open an existing catalog directory.

        Raises:
            CatalogError: no catalog there (with the command that creates one).
        """
        root = Path(root).expanduser()
        if db_url is None and (root / CONFIG_FILE).exists():
            db_url = json.loads((root / CONFIG_FILE).read_text()).get("db_url")
        if db_url is None and not (root / DB_FILE).exists():
            raise CatalogError(f"no catalog at {root}; create one with `catalog --catalog {root} init`")
        engine = cls._engine(root, db_url)
        self = cls(root, engine, device=device)
        try:
            with self._sessions() as s:
                state = s.get(CatalogState, 1)
        except DatabaseError as e:
            raise CatalogError(f"{root}: not a readable catalog database ({str(e).splitlines()[0]})") from None
        if state is None:
            raise CatalogError(f"{root}: the catalog database is not initialised")
        return self

    # ------------------------------------------------------------------ state
    def _state(self, s: Session) -> CatalogState:
        return s.get(CatalogState, 1)

    @property
    def generation(self) -> int:
        """Change counter: bumped by every add/remove/settings change (one cheap query)."""
        with self.engine.connect() as c:
            return int(c.execute(select(CatalogState.generation).where(CatalogState.id == 1)).scalar_one())

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
            st = self._state(s)
            st.threshold = float(threshold)
            st.generation += 1

    def set_segmenter(self, name: str | None, checkpoint: str | None = None) -> None:
        """Remember a default segmenter (name and checkpoint path) for ``recognize``."""
        with self._sessions.begin() as s:
            st = self._state(s)
            st.segmenter = name
            st.segmenter_checkpoint = str(Path(checkpoint).resolve()) if checkpoint else None

    def encoder_identity(self) -> EncoderIdentity:
        """The identity of the catalog's encoder (as stored)."""
        with self._sessions() as s:
            row = s.get(EncoderRow, self._state(s).encoder_id)
            center = "none" if row.center is None else "sha256:" + hashlib.sha256(row.center).hexdigest()
            return EncoderIdentity(row.backend, row.model, row.weights, row.dim, row.preprocess, center)

    def encoder(self) -> Encoder:
        """The catalog's encoder, built on first use and checked against the stored identity.

        Raises:
            WeightsError: the weights file is gone.
            EncoderMismatchError: the weights file or preprocessing changed since the vectors
                were made (run a rebuild).
        """
        with self._encoder_lock:
            if self._encoder is None:
                with self._sessions() as s:
                    row = s.get(EncoderRow, self._state(s).encoder_id)
                    spec, path, opts, rnd = row.spec, row.weights_path, json.loads(row.options), row.weights.startswith("random:")
                    center = None if row.center is None else np.frombuffer(row.center, np.float32)
                enc = create_encoder(spec, weights=path, random_init=rnd, device=self._device, center=center, **opts)
                self.encoder_identity().check_same(enc.identity)
                self._encoder = enc
            return self._encoder

    # ------------------------------------------------------------------ writes
    def _prepare(self, image: str | os.PathLike, sku: str | None, name: str | None, encoder: Encoder, k: int, seed: int) -> _Prepared:
        path = Path(image)
        sku = validate_sku_id(sku if sku is not None else path.stem)
        name = validate_name(name)
        data = read_image_bytes(path)
        im = decode_image_bytes(data, str(path))
        fmt = _detect_format(data)
        vectors = encoder.embed(augment_reference(im, k, seed))
        return _Prepared(sku, name, data, hashlib.sha256(data).hexdigest(), fmt, im.width, im.height, vectors)

    def add(self, image: str | os.PathLike, sku: str | None = None, name: str | None = None, *, append: bool = False) -> SKUInfo:
        """Add an SKU from one reference image (or, with ``append``, another reference image to
        an existing SKU).  The SKU is searchable as soon as this returns.

        Args:
            image: reference image path (a packshot; any format PIL reads).
            sku: SKU id (default: the file name without extension).
            name: display name.
            append: add a further reference image to the existing SKU ``sku``.

        Returns:
            The SKU's :class:`SKUInfo`.

        Raises:
            InvalidImageError, InvalidSKUError, DuplicateSKUError (id exists, or this exact image
            is already a reference), UnknownSKUError (``append`` to a missing SKU).  On any
            error nothing is written.
        """
        st = self.settings()
        sku_id = validate_sku_id(sku if sku is not None else Path(image).stem)
        self._check_can_add([(sku_id, None)], append)
        prepared = self._prepare(image, sku_id, name, self.encoder(), st["augmentations"], st["seed"])
        self._write([prepared], append=append)
        return self.get(prepared.sku)

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
        st = self.settings()
        enc = self.encoder()
        prepared = []
        it: Iterable = enumerate(entries, start=2)
        if progress:
            from tqdm import tqdm

            it = tqdm(list(it), desc="importing", unit="SKU")
        for n, (sku, name, img) in it:
            try:
                prepared.append(self._prepare(img, sku, name, enc, st["augmentations"], st["seed"]))
            except RetailKlipError as e:
                raise type(e)(f"{path}:{n}: {e}") from None
        self._write(prepared, append=False)
        return len(prepared)

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
        created: list[Path] = []
        try:
            for p in prepared:
                dest = self.root / _image_relpath(p.sha256, p.ext)
                if not dest.exists():
                    _atomic_write(dest, p.data)
                    created.append(dest)
            with self._sessions.begin() as s:
                st = self._state(s)
                hashes = [p.sha256 for p in prepared]
                clash = s.execute(
                    select(ReferenceImage.sha256, ReferenceImage.sku_id).where(ReferenceImage.sha256.in_(hashes))
                ).first()
                if clash:
                    raise DuplicateSKUError(f"this image is already a reference image of SKU {clash[1]!r}")
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
                        Embedding(reference_id=ref.id, encoder_id=st.encoder_id, view=v, vector=vec.tobytes())
                        for v, vec in enumerate(p.vectors)
                    )
                st.generation += 1
        except IntegrityError as e:
            _unlink_all(created)
            raise DuplicateSKUError(f"SKU already exists or the image is already stored ({str(e.orig).splitlines()[0]})") from None
        except BaseException:
            _unlink_all(created)
            raise
        logger.info("added %d reference image(s): %s", len(prepared), ", ".join(p.sku for p in prepared[:5]))

    def remove(self, sku: str) -> None:
        """Remove an SKU, its reference images and vectors; recognition stops matching it at once.

        Raises:
            UnknownSKUError: no such SKU.
        """
        with self._sessions.begin() as s:
            row = s.get(SKU, sku)
            if row is None:
                raise UnknownSKUError(f"unknown SKU {sku!r}")
            files = [r.filename for r in row.references]
            s.execute(delete(Embedding).where(Embedding.reference_id.in_([r.id for r in row.references])))
            s.delete(row)
            self._state(s).generation += 1
            s.flush()
            still_used = set(s.scalars(select(ReferenceImage.filename).where(ReferenceImage.filename.in_(files))))
        for f in files:
            if f not in still_used:
                (self.root / f).unlink(missing_ok=True)
        logger.info("removed SKU %s", sku)

    # ------------------------------------------------------------------ reads
    def get(self, sku: str) -> SKUInfo:
        """One SKU's :class:`SKUInfo`.  Raises :class:`UnknownSKUError`."""
        infos = self.list_skus([sku])
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

    def embedding_table(self) -> tuple[np.ndarray, list[str]]:
        """Ids of all vectors made by the catalog's encoder and the SKU of each.

        Returns:
            ``(ids, skus)``: int64 (N,) embedding row ids and the SKU id of each row.
        """
        with self._sessions() as s:
            enc_id = self._state(s).encoder_id
            rows = s.execute(
                select(Embedding.id, ReferenceImage.sku_id)
                .join(ReferenceImage, Embedding.reference_id == ReferenceImage.id)
                .where(Embedding.encoder_id == enc_id)
                .order_by(Embedding.id)
            ).all()
        return np.array([r[0] for r in rows], np.int64), [r[1] for r in rows]

    def vectors(self, ids: Sequence[int], dim: int, chunk: int = 10_000) -> np.ndarray:
        """The float32 vectors (N, dim) of the given embedding row ids, in the given order."""
        out = np.empty((len(ids), dim), np.float32)
        pos = {int(i): n for n, i in enumerate(ids)}
        with self._sessions() as s:
            for c in range(0, len(ids), chunk):
                part = [int(i) for i in ids[c : c + chunk]]
                for i, blob in s.execute(select(Embedding.id, Embedding.vector).where(Embedding.id.in_(part))):
                    out[pos[i]] = np.frombuffer(blob, np.float32)
        return out

    def names(self) -> dict[str, str | None]:
        """SKU id -> display name."""
        with self._sessions() as s:
            return dict(s.execute(select(SKU.id, SKU.name)).all())

    def reference_path(self, sku: str) -> list[Path]:
        """Paths of the stored reference images of an SKU."""
        with self._sessions() as s:
            if s.get(SKU, sku) is None:
                raise UnknownSKUError(f"unknown SKU {sku!r}")
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


def _image_relpath(sha256: str, ext: str) -> str:
    return f"{IMAGES_DIR}/{sha256[:2]}/{sha256}.{ext}"


def _detect_format(data: bytes) -> str:
    from PIL import Image
    import io

    try:
        with Image.open(io.BytesIO(data)) as im:
            return _EXT.get(im.format or "", "img")
    except Exception:  # noqa: BLE001 - already decoded once; fall back to a neutral extension
        return "img"


def _atomic_write(dest: Path, data: bytes) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o640)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _unlink_all(paths: Iterable[Path]) -> None:
    for p in paths:
        p.unlink(missing_ok=True)
