"""Index versions of a catalog: listing them, the rebuild lock, and their end of life (failed
and retired versions and their files).  Building a version is :mod:`catalog.rebuild`'s job.
"""

from __future__ import annotations

import fcntl
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sqlalchemy import delete, func, select

from . import index_store
from .connection import CatalogConnection
from .errors import RebuildBusyError
from .models import CatalogState, Embedding, EncoderRow, IndexVersion, OutlierEmbedding, VersionStatus

logger = logging.getLogger(__name__)

LOCK_FILE = "rebuild.lock"


@dataclass(frozen=True)
class VersionInfo:
    """One index version as listed by ``catalog versions``.

    Attributes:
        id: version number.
        created: UTC creation time.
        encoder: the encoder SPEC; ``encoder_key`` its identity key.
        factory: FAISS ``index_factory`` string.
        vectors: vectors in the snapshot; dim: their dimension; augmentations: K.
        recall_at_1: recall@1 against exact search measured at build time (1.0 for Flat).
        status: a :class:`~catalog.models.VersionStatus` value.
        active: True for the version serving recognition.
        outlier_references: outlier references with vectors from this version's encoder, and
            outlier_vectors: those vectors; what recognition with this version measures outlier
            distances against.  Counted now, not at build time (an outlier added or removed
            since counts; a retired version whose encoder's vectors were dropped has 0).
        hubness_k: the hubness-reduction k the version was built for (``rollback`` restores
            it; None: built before migration 0005).
    """

    id: int
    created: datetime
    encoder: str
    encoder_key: str
    factory: str
    vectors: int
    dim: int
    augmentations: int
    recall_at_1: float | None
    status: str
    active: bool
    path: str
    note: str | None
    outlier_references: int = 0
    outlier_vectors: int = 0
    hubness_k: int | None = None

    def to_dict(self) -> dict:
        return {
            "id": self.id,
            "created": self.created.isoformat(),
            "encoder": self.encoder,
            "encoder_key": self.encoder_key,
            "index_type": self.factory,
            "vectors": self.vectors,
            "dim": self.dim,
            "augmentations": self.augmentations,
            "recall_at_1": self.recall_at_1,
            "status": self.status,
            "active": self.active,
            "path": self.path,
            "note": self.note,
            "outlier_references": self.outlier_references,
            "outlier_vectors": self.outlier_vectors,
            "hubness_k": self.hubness_k,
        }


def list_versions(cat: CatalogConnection) -> list[VersionInfo]:
    """All index versions of a catalog, newest first, with the outlier references and vectors of
    each version's encoder (0 on a catalog without outlier references)."""
    outliers = (
        select(OutlierEmbedding.encoder_id,
               func.count(func.distinct(OutlierEmbedding.reference_id)).label("refs"),
               func.count(OutlierEmbedding.id).label("vecs"))
        .group_by(OutlierEmbedding.encoder_id)
        .subquery()
    )
    with cat.sessions() as s:
        active = s.get(CatalogState, 1).active_version_id
        rows = s.execute(
            select(IndexVersion, EncoderRow.spec, EncoderRow.key,
                   func.coalesce(outliers.c.refs, 0), func.coalesce(outliers.c.vecs, 0))
            .join(EncoderRow, EncoderRow.id == IndexVersion.encoder_id)
            .outerjoin(outliers, outliers.c.encoder_id == IndexVersion.encoder_id)
            .order_by(IndexVersion.id.desc())
        ).all()
    return [
        VersionInfo(
            v.id, v.created, spec, key, v.factory, v.vectors, v.dim, v.augmentations, v.recall_at_1, v.status,
            v.id == active, v.path, v.note, int(refs), int(vecs), v.hubness_k,
        )
        for v, spec, key, refs, vecs in rows
    ]


class RebuildLock:
    """``flock`` on ``DIR/rebuild.lock`` (holding the pid); the kernel releases it if the process
    dies.  Rebuild, rollback and ``check`` hold it, so they never interleave.

    Raises:
        RebuildBusyError: on entering, when another process holds it.
    """

    def __init__(self, root: Path) -> None:
        self.path = Path(root) / LOCK_FILE

    def __enter__(self) -> RebuildLock:
        self._f = open(self.path, "a+")
        try:
            fcntl.flock(self._f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._f.seek(0)
            holder = self._f.read().strip() or "?"
            self._f.close()
            raise RebuildBusyError(f"another rebuild or rollback is running on this catalog (pid {holder})") from None
        self._f.seek(0)
        self._f.truncate()
        self._f.write(str(os.getpid()))
        self._f.flush()
        return self

    def __exit__(self, *exc) -> None:
        self._f.truncate(0)
        fcntl.flock(self._f.fileno(), fcntl.LOCK_UN)
        self._f.close()


def mark_failed(cat: CatalogConnection, version_ids: Sequence[int], why: str) -> None:
    """Mark index versions failed (``why`` appended to their note) and delete their files:
    versions a killed rebuild left building, and ``catalog check`` 's broken versions."""
    with cat.sessions.begin() as s:
        versions = list(s.scalars(select(IndexVersion).where(IndexVersion.id.in_(list(version_ids)))))
        for v in versions:
            v.status, v.note = VersionStatus.FAILED, (v.note + "; " if v.note else "") + why
        paths = [v.path for v in versions if v.path]  # never "": that would be the catalog directory
    for path in paths:
        index_store.remove_version(cat.root, path)


def fail_interrupted(cat: CatalogConnection) -> None:
    """Mark versions left building by a killed rebuild as failed; delete their files and any
    temporary version directories.  Call with the :class:`RebuildLock` held."""
    for tmp in index_store.stale_temp_dirs(cat.root):
        index_store.remove_version(cat.root, str(tmp.relative_to(cat.root)))
    with cat.sessions() as s:
        building = list(s.scalars(select(IndexVersion.id).where(IndexVersion.status == VersionStatus.BUILDING)))
    mark_failed(cat, building, "interrupted")
    for vid in building:
        logger.warning("rebuild: version %d was interrupted earlier; marked failed", vid)


def retire(cat: CatalogConnection, keep: int) -> None:
    """Retire ready versions beyond the newest ``keep`` (the active one always stays; their
    files are deleted), delete the files of failed versions, and drop vectors (of SKU and of
    outlier references) of encoders that no kept version uses.  Call with the :class:`RebuildLock` held."""
    with cat.sessions.begin() as s:
        st = s.get(CatalogState, 1)
        ready = list(s.scalars(select(IndexVersion).where(IndexVersion.status == VersionStatus.READY)
                               .order_by(IndexVersion.id.desc())))
        kept = [v for v in ready if v.id == st.active_version_id] + [v for v in ready if v.id != st.active_version_id]
        for v in kept[keep:]:
            v.status = VersionStatus.RETIRED
            logger.info("rebuild: retired version %d", v.id)
        gone = [v.path for v in kept[keep:]]
        in_use = {st.encoder_id} | {v.encoder_id for v in kept[:keep]}
        dropped = s.execute(delete(Embedding).where(Embedding.encoder_id.not_in(in_use))).rowcount
        dropped += s.execute(delete(OutlierEmbedding).where(OutlierEmbedding.encoder_id.not_in(in_use))).rowcount
    for path in gone:
        index_store.remove_version(cat.root, path)
    for v in list_versions(cat):
        if v.status == VersionStatus.FAILED and (cat.root / v.path).exists():
            index_store.remove_version(cat.root, v.path)
    if dropped:
        logger.info("rebuild: dropped %d vector(s) of encoders no kept version uses", dropped)
