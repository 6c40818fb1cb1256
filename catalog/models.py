"""SQLAlchemy 2.0 schema of the SKU catalog.

Tables:

* ``skus`` — one row per SKU (id chosen by the store, display name, creation time, UTC).
* ``reference_images`` — the reference image(s) of an SKU: content hash (SHA-256 of the file
  bytes), the stored copy's name (derived from the hash, never from user input), size in bytes
  and pixels.
* ``encoders`` — encoder identities (backend, model, weights hash, dimension, preprocessing), the
  centering vector and the unlabeled store photos' embeddings it was computed from (hubness
  reduction, :mod:`retailklip.hubness`; migration 0005).
* ``embeddings`` — one row per vector: the reference it was made from, the view number
  (0 = the reference itself, 1..K-1 = augmentations), the encoder that made it and the float32
  vector bytes.  The row id is the vector's id in the FAISS index.
* ``index_versions`` — one row per built FAISS index (``catalog rebuild``): the encoder whose
  vectors it holds, the ``index_factory`` string, vector count, dimension, K, recall@1 against
  exact search, status (``building`` / ``ready`` / ``failed`` / ``retired``), the directory
  holding its files (``indexes/v000007``), the index file's SHA-256 and the catalog generation
  whose membership it snapshots, and the hubness-reduction k it was built for.
* ``outlier_references`` — reference images of products that are *not* in the catalog (e.g. the
  packshots of the products an encoder was finetuned on; migration 0004): content hash, stored
  file (the same image store as SKU references), size, a free-text label.  Never an SKU, never
  matched: the denominator of the ``outlier-ratio`` open-set score (:mod:`retailklip.open_set`).
* ``outlier_embeddings`` — their K vectors per encoder, as ``embeddings`` holds the SKU
  references' (row ids: a namespace of their own, never in an index snapshot).
* ``catalog_state`` — a single row: the current (active) encoder and index version, the
  augmentation count K, the distance threshold, the hubness-reduction k (0: off), and a ``generation`` counter bumped by every
  change, so readers in other threads and processes notice changes with one cheap query.
"""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import (
    DateTime,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

SKU_ID_MAX = 128
NAME_MAX = 512


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator):
    """``DateTime(timezone=True)`` that reads back as an aware UTC datetime on every backend.

    SQLite keeps no time zone: it returns the stored UTC time naive, PostgreSQL an aware one, so
    a listing's ``created`` read ``2026-12-08T03:34:39`` on one and ``...+00:00`` on the other.
    Aware values are stored converted to UTC; naive values read back are UTC.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect) -> datetime | None:
        return value.astimezone(timezone.utc) if value is not None and value.tzinfo is not None else value

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


class Base(DeclarativeBase):
    pass


class SKU(Base):
    __tablename__ = "skus"

    id: Mapped[str] = mapped_column(String(SKU_ID_MAX), primary_key=True)
    name: Mapped[str | None] = mapped_column(String(NAME_MAX))
    created: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    references: Mapped[list[ReferenceImage]] = relationship(
        back_populates="sku", cascade="all, delete-orphan", passive_deletes=True, order_by="ReferenceImage.id"
    )


class ReferenceImage(Base):
    __tablename__ = "reference_images"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    sku_id: Mapped[str] = mapped_column(ForeignKey("skus.id", ondelete="CASCADE"), index=True)
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    filename: Mapped[str] = mapped_column(String(100))
    size_bytes: Mapped[int] = mapped_column(Integer)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    created: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    sku: Mapped[SKU] = relationship(back_populates="references")
    embeddings: Mapped[list[Embedding]] = relationship(
        back_populates="reference", cascade="all, delete-orphan", passive_deletes=True
    )


class EncoderRow(Base):
    __tablename__ = "encoders"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    key: Mapped[str] = mapped_column(String(200), unique=True)
    backend: Mapped[str] = mapped_column(String(20))
    model: Mapped[str] = mapped_column(String(200))
    weights: Mapped[str] = mapped_column(String(200))
    dim: Mapped[int] = mapped_column(Integer)
    preprocess: Mapped[str] = mapped_column(Text)
    spec: Mapped[str] = mapped_column(String(300))
    weights_path: Mapped[str | None] = mapped_column(Text)
    options: Mapped[str] = mapped_column(Text, default="{}")
    center: Mapped[bytes | None] = mapped_column(LargeBinary)  # float32 (dim,) feature-centering vector
    # float32 (P, dim) unit embeddings of unlabeled store photos, for hubness reduction (migration 0005)
    unlabeled: Mapped[bytes | None] = mapped_column(LargeBinary, deferred=True)  # up to ~8 MB: read when used
    created: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Embedding(Base):
    __tablename__ = "embeddings"
    # Row ids are FAISS ids inside index snapshots: they must never be reused after a delete
    # (SQLite reuses the largest rowid without AUTOINCREMENT; PostgreSQL sequences never do).
    __table_args__ = (UniqueConstraint("reference_id", "encoder_id", "view"), {"sqlite_autoincrement": True})

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    reference_id: Mapped[int] = mapped_column(ForeignKey("reference_images.id", ondelete="CASCADE"), index=True)
    encoder_id: Mapped[int] = mapped_column(ForeignKey("encoders.id"), index=True)
    view: Mapped[int] = mapped_column(Integer)
    vector: Mapped[bytes] = mapped_column(LargeBinary)
    reference: Mapped[ReferenceImage] = relationship(back_populates="embeddings")


class VersionStatus:
    """The values of ``index_versions.status`` (stored as these strings)."""

    #: a rebuild is writing it (a killed rebuild leaves it so; the next rebuild or ``check`` marks it failed)
    BUILDING = "building"
    #: built and validated: servable, or activated by ``rollback``
    READY = "ready"
    #: validation or the build failed, or its files are broken (kept for inspection, files deleted)
    FAILED = "failed"
    #: beyond the newest ``--keep`` versions; its files are deleted
    RETIRED = "retired"


class IndexVersion(Base):
    __tablename__ = "index_versions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    created: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    encoder_id: Mapped[int] = mapped_column(ForeignKey("encoders.id"), index=True)
    factory: Mapped[str] = mapped_column(String(200))
    vectors: Mapped[int] = mapped_column(Integer, default=0)
    dim: Mapped[int] = mapped_column(Integer)
    augmentations: Mapped[int] = mapped_column(Integer)
    recall_at_1: Mapped[float | None] = mapped_column(Float)
    status: Mapped[str] = mapped_column(String(20), index=True)  # a VersionStatus value
    path: Mapped[str] = mapped_column(String(200))
    index_sha256: Mapped[str | None] = mapped_column(String(64))
    generation: Mapped[int] = mapped_column(Integer, default=0)
    note: Mapped[str | None] = mapped_column(Text)
    # the hubness-reduction k this version was built for (migration 0005; NULL: built before)
    hubness_k: Mapped[int | None] = mapped_column(Integer)


class CatalogState(Base):
    __tablename__ = "catalog_state"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    encoder_id: Mapped[int] = mapped_column(ForeignKey("encoders.id"))
    augmentations: Mapped[int] = mapped_column(Integer)
    seed: Mapped[int] = mapped_column(Integer, default=0)
    threshold: Mapped[float] = mapped_column(Float)
    # the score ``threshold`` is on (retailklip.open_set; migration 0003)
    open_set_score: Mapped[str] = mapped_column(String(20), default="distance", server_default="distance")
    # CSLS k nearest unlabeled photos (retailklip.hubness; 0: plain 1-NN; migration 0005)
    hubness_k: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    generation: Mapped[int] = mapped_column(Integer, default=0)
    segmenter: Mapped[str | None] = mapped_column(String(100))
    segmenter_checkpoint: Mapped[str | None] = mapped_column(Text)
    active_version_id: Mapped[int | None] = mapped_column(ForeignKey("index_versions.id"))


class OutlierReference(Base):
    """A reference image of a product not in the catalog (module docstring); one row per image
    (its content hash is unique among outlier references, and no SKU reference has it)."""

    __tablename__ = "outlier_references"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    label: Mapped[str | None] = mapped_column(String(NAME_MAX))
    sha256: Mapped[str] = mapped_column(String(64), unique=True)
    filename: Mapped[str] = mapped_column(String(100))
    size_bytes: Mapped[int] = mapped_column(Integer)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    created: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class OutlierEmbedding(Base):
    """One view of an outlier reference embedded by one encoder (float32 bytes, unit norm)."""

    __tablename__ = "outlier_embeddings"
    __table_args__ = (UniqueConstraint("reference_id", "encoder_id", "view"), {"sqlite_autoincrement": True})

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    reference_id: Mapped[int] = mapped_column(ForeignKey("outlier_references.id", ondelete="CASCADE"), index=True)
    encoder_id: Mapped[int] = mapped_column(ForeignKey("encoders.id"), index=True)
    view: Mapped[int] = mapped_column(Integer)
    vector: Mapped[bytes] = mapped_column(LargeBinary)
