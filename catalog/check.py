"""``catalog check [--repair]``: find and repair drift between the database, the image store and
the index versions.

The database is the source of truth for SKUs, reference images and vectors; stored images and
index snapshots are derived from it.  Drift can come from a crash between writing a file and
committing a transaction, from a disk that lost or corrupted a file, or from hand edits.  Each
finding has a kind, a count, a few examples, and whether ``--repair`` fixes it:

==========================  ===============================================  =========================================
kind                        what                                             repair
==========================  ===============================================  =========================================
``database``                SQLite ``integrity_check`` / ``foreign_key_check`` none (restore a backup)
``orphan_vectors``          vectors whose reference image row is gone        delete them
``bad_vectors``             vectors of the wrong length, non-finite or not   delete them (then re-embedded below)
                            unit norm
``missing_vectors``         reference images without all K vectors of the    embed them from the stored image
                            active encoder
``missing_images``          reference rows whose stored image file is gone   restore from ``--images-from DIR`` (found
                                                                             by content hash); else reported
``corrupt_images``          stored image whose SHA-256 is not its name       same as missing
``orphan_files``            files in the image store no row refers to        delete (only if older than the grace
                            (e.g. an add killed before its commit)           period, so a running add is never hit)
``active_index``            the active version's index file missing,         rebuild a new version from the
                            corrupt, or (Flat) disagreeing with the           database's vectors (no re-embedding)
                            database's vectors
``stale_versions``          versions left ``building`` by a killed rebuild,  mark failed, delete their files
                            ready versions whose files are gone, version
                            directories without a ready version, temporary
                            directories
``bad_unlabeled``           the active encoder's unlabeled photo embeddings  drop them: plain 1-NN until
                            (hubness reduction, :mod:`retailklip.hubness`)   ``catalog rebuild --center-photos``
                            of the wrong length, non-finite or not unit      stores new ones
                            norm
``bad_offsets``             a ready version's stored CSLS offsets file       none: the recognizer computes the
                            missing or not matching its manifest             offsets instead (logged at every load)
                                                                             until ``catalog rebuild``
==========================  ===============================================  =========================================

Outlier references (images of products not in the catalog, :mod:`catalog.outliers`) are
checked like SKU references: their vectors (``orphan_vectors``, ``bad_vectors``,
``missing_vectors``; examples say "outlier"), their stored files (``missing_images``,
``corrupt_images``) and, as files a row names, never ``orphan_files``.

``check`` takes the rebuild lock, so it never runs beside a rebuild.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sqlalchemy import delete, select, text

from retailklip.errors import RetailKlipError
from retailklip.weights import file_sha256

from . import index_store, rebuild
from .codec import decode_vector
from .connection import StateSnapshot
from .encoders import decode_unlabeled
from .fileio import atomic_write
from .imagestore import IMAGES_DIR
from .models import CatalogState, EncoderRow, IndexVersion, OutlierReference, ReferenceImage, VersionStatus
from .reads import CatalogReader
from .vectors import OUTLIERS, REFERENCES, VectorKind, embed_missing, references_lacking_vectors
from .writes import used_filenames
from .versions import RebuildLock, fail_interrupted, mark_failed

logger = logging.getLogger(__name__)

#: Files in the image store younger than this are never called orphans (an add in progress
#: writes its file before its transaction commits).
ORPHAN_GRACE_S = 15 * 60
#: Vectors compared between the active Flat snapshot and the database.
SNAPSHOT_SAMPLE = 2000


@dataclass
class Finding:
    """One kind of drift.

    Attributes:
        kind: see the module docstring's table.
        count: how many items.
        examples: up to 5 of them (ids, paths).
        repaired: how many ``--repair`` fixed.
        repairable: whether ``--repair`` can fix this kind at all (with the given options).
    """

    kind: str
    count: int
    examples: list[str] = field(default_factory=list)
    repaired: int = 0
    repairable: bool = True

    def to_dict(self) -> dict:
        return {"kind": self.kind, "count": self.count, "repaired": self.repaired,
                "repairable": self.repairable, "examples": self.examples}


@dataclass
class CheckReport:
    """The result of :func:`check`: ``ok`` when nothing is left unrepaired."""

    findings: list[Finding]
    references: int
    vectors: int
    seconds: float

    @property
    def ok(self) -> bool:
        return all(f.repaired >= f.count for f in self.findings)

    def to_dict(self) -> dict:
        return {"ok": self.ok, "references": self.references, "vectors": self.vectors,
                "seconds": round(self.seconds, 3), "findings": [f.to_dict() for f in self.findings]}


def check(
    cat: CatalogReader,
    *,
    repair: bool = False,
    images_from: Sequence[str | os.PathLike] = (),
    verify_images: bool = True,
    grace_s: float = ORPHAN_GRACE_S,
    progress: bool = False,
) -> CheckReport:
    """Check a catalog (module docstring) and, with ``repair``, fix what can be fixed.

    Args:
        cat: the catalog.
        repair: fix the findings that can be fixed.
        images_from: directories searched (recursively) for missing or corrupt reference images,
            matched by SHA-256 content hash (e.g. the folder the packshots came from).
        verify_images: hash every stored image (reads the whole store; False checks existence).
        grace_s: image-store files younger than this many seconds are never orphans.
        progress: progress bar while re-embedding.

    Returns:
        A :class:`CheckReport`.

    Raises:
        RebuildBusyError: a rebuild is running.
        ReadOnlyCatalogError: ``repair`` on a read-only catalog.
    """
    if repair:
        cat.require_writable("repair it")
    t0 = time.perf_counter()
    findings: list[Finding] = []
    # A read-only catalog cannot take the lock file; nothing writes it through this process.
    with nullcontext() if cat.read_only else RebuildLock(cat.root):
        snap = cat.snapshot()
        vector_findings, excluded, n_vec = _check_vectors(cat, snap, repair)
        findings += vector_findings
        refs = _reference_rows(cat)
        findings += _check_images(cat, refs, images_from, verify_images, repair)
        findings += _check_missing_vectors(cat, snap, repair, progress)  # after the deletions above
        findings += _check_orphan_files(cat, refs, grace_s, repair)
        findings += _check_unlabeled(cat, snap, repair)
        findings += _check_offsets(cat)
        version_findings, active_problem = _check_versions(cat, snap, excluded, repair)
        findings += version_findings
        # after the repairs above; vectors whose reference row is gone are orphan_vectors
        findings = _check_database(cat) + findings
        if active_problem:
            findings.append(Finding("active_index", 1, [active_problem]))
    # Outside the lock: a rebuild from the database's vectors (same encoder, nothing re-embedded).
    if repair and active_problem and not any(f.kind == "database" for f in findings):
        _repair_active_index(cat, findings[-1], snap.version_id)
    with cat.sessions() as s:
        n_refs = len(list(s.scalars(select(ReferenceImage.id))))
    return CheckReport(findings, n_refs, n_vec, time.perf_counter() - t0)


def _delete_vectors(cat: CatalogReader, ids: Sequence[int], kind: VectorKind = REFERENCES) -> None:
    with cat.sessions.begin() as s:
        cat.lock_writers(s)
        for c in range(0, len(ids), 10_000):
            s.execute(delete(kind.vectors).where(kind.vectors.id.in_(ids[c : c + 10_000])))


def _check_vectors(cat: CatalogReader, snap: StateSnapshot, repair: bool) -> tuple[list[Finding], list[int], int]:
    """``orphan_vectors`` and ``bad_vectors`` (of the active encoder), of SKU and of outlier
    references.  Returns the findings, the ids of the SKU vectors among them (left out of the
    snapshot comparison) and the number of vectors."""
    findings: dict[str, Finding] = {}
    excluded, n_vec = [], 0
    for kind in (REFERENCES, OUTLIERS):
        orphan, bad_vec, n = _scan_vectors(cat, snap, kind)
        n_vec += n
        prefix = "vector" if kind is REFERENCES else "outlier vector"
        for name, ids in (("orphan_vectors", orphan), ("bad_vectors", bad_vec)):
            if not ids:
                continue
            f = findings.setdefault(name, Finding(name, 0))
            f.count += len(ids)
            f.examples = (f.examples + [f"{prefix} {i}" for i in ids[:5]])[:5]
            if repair:
                _delete_vectors(cat, ids, kind)
                f.repaired += len(ids)
        if kind is REFERENCES:
            excluded = bad_vec + orphan
    return [findings[k] for k in ("orphan_vectors", "bad_vectors") if k in findings], excluded, n_vec


def _scan_vectors(cat: CatalogReader, snap: StateSnapshot, kind: VectorKind) -> tuple[list[int], list[int], int]:
    """``(orphan ids, bad ids, vectors scanned)`` of one kind's vectors."""
    dim = cat.encoder_identity(snap.encoder_id).dim
    vec = kind.vectors
    with cat.sessions() as s:
        ref_ids = set(s.scalars(select(kind.images.id)))
        orphan, bad_vec = [], []
        n_vec = 0
        for eid, rid, enc_id, blob in s.execute(
            select(vec.id, vec.reference_id, vec.encoder_id, vec.vector)
        ).yield_per(10_000):
            n_vec += 1
            if rid not in ref_ids:
                orphan.append(eid)
                continue
            if enc_id == snap.encoder_id:
                try:
                    v = decode_vector(blob, dim)
                except ValueError:
                    bad_vec.append(eid)
                    continue
                if not np.all(np.isfinite(v)) or abs(float(v @ v) - 1.0) > 1e-3:
                    bad_vec.append(eid)
    return orphan, bad_vec, n_vec


def _reference_rows(cat: CatalogReader) -> list[tuple]:
    """(id, whose: "SKU 'x'" or "outlier reference N", sha256, filename, size) of every
    reference image, of the SKUs and the outlier references."""
    with cat.sessions() as s:
        refs = [(i, f"SKU {sku!r}", h, fn, n) for i, sku, h, fn, n in s.execute(
            select(ReferenceImage.id, ReferenceImage.sku_id, ReferenceImage.sha256, ReferenceImage.filename,
                   ReferenceImage.size_bytes)
        )]
        outliers = [(i, f"outlier reference {i}", h, fn, n) for i, h, fn, n in s.execute(
            select(OutlierReference.id, OutlierReference.sha256, OutlierReference.filename, OutlierReference.size_bytes)
        )]
    return refs + outliers


def _check_images(cat: CatalogReader, refs: list[tuple], images_from: Sequence[str | os.PathLike],
                  verify_images: bool, repair: bool) -> list[Finding]:
    """``missing_images`` and ``corrupt_images``, restored by content hash from ``images_from``."""
    missing, corrupt = [], []
    for rid, sku, sha, fn, size in refs:
        p = cat.root / fn
        if not p.is_file():
            missing.append((rid, sku, sha, fn, size))
        elif verify_images and file_sha256(p) != sha:
            corrupt.append((rid, sku, sha, fn, size))
    sources = _index_by_hash(images_from, {r[2] for r in missing + corrupt}, {r[4] for r in missing + corrupt})
    findings = []
    for kind, items in (("missing_images", missing), ("corrupt_images", corrupt)):
        if not items:
            continue
        f = Finding(kind, len(items), [f"{whose}: {fn}" for _r, whose, _h, fn, _s in items[:5]],
                    repairable=all(h in sources for _r, _k, h, _f, _s in items))
        if repair:
            for _rid, _sku, sha, fn, _size in items:
                if sha in sources:
                    atomic_write(cat.root / fn, sources[sha].read_bytes())
                    f.repaired += 1
        findings.append(f)
    return findings


def _check_missing_vectors(cat: CatalogReader, snap: StateSnapshot, repair: bool, progress: bool) -> list[Finding]:
    """``missing_vectors``: references (of SKUs and outliers) lacking some of their K vectors of
    the active encoder."""
    lacking = {kind: references_lacking_vectors(cat, snap.encoder_id, snap.augmentations, kind)
               for kind in (REFERENCES, OUTLIERS)}
    jobs = lacking[REFERENCES] + lacking[OUTLIERS]
    if not jobs:
        return []
    unreadable = [j for j in jobs if not Path(j.path).is_file()]
    f = Finding("missing_vectors", len(jobs),
                [f"reference {j.reference_id}" if j.noun == REFERENCES.noun else f"{j.noun} {j.reference_id}"
                 for j in jobs[:5]],
                repairable=not unreadable)
    if repair and not unreadable:
        seed = int(cat.settings()["seed"])
        for kind, kind_jobs in lacking.items():
            if kind_jobs:
                f.repaired += embed_missing(cat, cat.encoder_for(snap.encoder_id), snap.encoder_id, snap.augmentations,
                                            seed, progress=progress, kind=kind)
        with cat.sessions.begin() as s:
            cat.lock_writers(s)  # recognizers pick the new vectors up
    return [f]


def _check_orphan_files(cat: CatalogReader, refs: list[tuple], grace_s: float, repair: bool) -> list[Finding]:
    """``orphan_files``: image-store files no reference names, older than ``grace_s``."""
    known = {fn for *_x, fn, _s in refs}
    now = time.time()
    orphans = []
    images_dir = cat.root / IMAGES_DIR
    if images_dir.is_dir():
        for p in images_dir.rglob("*"):
            if p.is_file() and str(p.relative_to(cat.root)) not in known and now - p.stat().st_mtime > grace_s:
                orphans.append(p)
    if not orphans:
        return []
    f = Finding("orphan_files", len(orphans), [str(p.relative_to(cat.root)) for p in orphans[:5]])
    if repair:
        # Under the writers' lock (adds write their files only while holding it), and
        # re-reading the references: an add may have committed one of them meanwhile.
        with cat.sessions.begin() as s:
            cat.lock_writers(s, bump=False)
            known = used_filenames(s, [str(p.relative_to(cat.root)) for p in orphans])
            for p in orphans:
                if str(p.relative_to(cat.root)) not in known:
                    p.unlink(missing_ok=True)
                f.repaired += 1
    return [f]


def _check_versions(cat: CatalogReader, snap: StateSnapshot, excluded: Sequence[int], repair: bool
                    ) -> tuple[list[Finding], str | None]:
    """``stale_versions`` (repaired here) and the problem of the active version, if any (the
    ``active_index`` finding, repaired by :func:`_repair_active_index`)."""
    stale = []
    with cat.sessions() as s:
        versions = list(s.scalars(select(IndexVersion)))
        active_id = s.get(CatalogState, 1).active_version_id
    stale += [f"version {v.id} left building" for v in versions if v.status == VersionStatus.BUILDING]
    stale += [str(p.relative_to(cat.root)) for p in index_store.stale_temp_dirs(cat.root)]
    ready_paths = {v.path for v in versions if v.status == VersionStatus.READY}
    idx_dir = cat.root / index_store.INDEXES_DIR
    if idx_dir.is_dir():
        stale += [f"{index_store.INDEXES_DIR}/{p.name}" for p in idx_dir.iterdir()
                  if p.is_dir() and not p.name.startswith(".") and f"{index_store.INDEXES_DIR}/{p.name}" not in ready_paths]
    broken_ready = []
    active_problem = None
    for v in versions:
        if v.status != VersionStatus.READY:
            continue
        try:
            idx = cat.load_index(v.id, verify=True)
        except RetailKlipError as e:
            if v.id == active_id:
                active_problem = str(e)
            else:
                broken_ready.append(v.id)
            continue
        if v.id == active_id and active_problem is None:
            active_problem = _compare_snapshot(cat, idx, v.encoder_id, exclude=excluded)
    stale += [f"version {i}: files missing or corrupt" for i in broken_ready]
    if not stale:
        return [], active_problem
    f = Finding("stale_versions", len(stale), stale[:5])
    if repair:
        fail_interrupted(cat)
        mark_failed(cat, broken_ready, "files missing or corrupt (catalog check)")
        with cat.sessions() as s:
            keep = set(s.scalars(select(IndexVersion.path).where(IndexVersion.status == VersionStatus.READY)))
        if idx_dir.is_dir():
            for p in idx_dir.iterdir():
                if p.is_dir() and f"{index_store.INDEXES_DIR}/{p.name}" not in keep:
                    index_store.remove_version(cat.root, f"{index_store.INDEXES_DIR}/{p.name}")
        f.repaired = len(stale)
    return [f], active_problem


def _check_offsets(cat: CatalogReader) -> list[Finding]:
    """``bad_offsets``: ready versions whose stored CSLS offsets are missing or damaged (report
    only: a version's files are never rewritten, and the recognizer computes them instead)."""
    with cat.sessions() as s:
        paths = list(s.scalars(select(IndexVersion.path).where(IndexVersion.status == VersionStatus.READY)))
    problems = [p for p in (index_store.offsets_problem(cat.root, path) for path in paths if path) if p]
    return [Finding("bad_offsets", len(problems), problems[:5], repairable=False)] if problems else []


def _check_unlabeled(cat: CatalogReader, snap: StateSnapshot, repair: bool) -> list[Finding]:
    """``bad_unlabeled``: the active encoder's stored unlabeled photo embeddings (migration 0005)
    that are not whole finite unit vectors of its dimension."""
    with cat.sessions() as s:
        row = s.get(EncoderRow, snap.encoder_id)
        blob, dim = row.unlabeled, row.dim
    if blob is None:
        return []
    try:
        decode_unlabeled(blob, dim)
        return []
    except ValueError as e:
        finding = Finding("bad_unlabeled", 1, [f"encoder {snap.encoder_id}: {e}"])
    if repair:
        with cat.sessions.begin() as s:
            cat.lock_writers(s)
            s.get(EncoderRow, snap.encoder_id).unlabeled = None
        finding.repaired = 1
        logger.warning("check: dropped encoder %d's damaged unlabeled photo embeddings; hubness reduction is off "
                       "until `catalog rebuild --center-photos ...`", snap.encoder_id)
    return [finding]


def _check_database(cat: CatalogReader) -> list[Finding]:
    """``database``: SQLite's ``integrity_check`` and ``foreign_key_check`` (not repairable)."""
    if cat.engine.dialect.name != "sqlite":
        return []
    with cat.engine.connect() as c:
        bad = [r[0] for r in c.execute(text("PRAGMA integrity_check"))]
        fks = [tuple(r) for r in c.execute(text("PRAGMA foreign_key_check"))]
    fks = [r for r in fks if not (r[0] == "embeddings" and r[2] == "reference_images")]
    problems = [b for b in bad if b != "ok"] + [f"foreign key: {r}" for r in fks]
    return [Finding("database", len(problems), problems[:5], repairable=False)] if problems else []


def _repair_active_index(cat: CatalogReader, finding: Finding, active_id: int | None) -> None:
    """Rebuild the active version from the database's vectors (same encoder, nothing re-embedded)."""
    info = rebuild.rebuild(cat)
    # The replaced version's own files are the broken ones: retire it as failed, as the
    # stale-version repair does for broken inactive versions, so one repair leaves a clean check.
    mark_failed(cat, [active_id], "files missing or corrupt (catalog check)")
    finding.repaired = 1
    logger.info("check: rebuilt the active index as version %d; version %d marked failed", info.id, active_id)


def _compare_snapshot(cat: CatalogReader, idx, encoder_id: int, exclude: Sequence[int] = ()) -> str | None:
    """For an exact (Flat) snapshot, compare a sample of its vectors with the database's."""
    ids = idx.ids()
    if not len(ids) or not idx.stores_exact_vectors:  # SQ/PQ codes are lossy; compare exact storage only
        return None
    table_ids, _skus = cat.embedding_table(encoder_id)
    live = np.setdiff1d(np.intersect1d(ids, table_ids), np.asarray(exclude, np.int64))
    if len(live) > SNAPSHOT_SAMPLE:
        live = np.random.default_rng(0).choice(live, SNAPSHOT_SAMPLE, replace=False)
    if not len(live):
        return None
    try:
        stored = idx.reconstruct(live)
    except RuntimeError:
        return None
    db = cat.vectors(live, idx.dim)
    bad = np.flatnonzero(np.abs(stored - db).max(axis=1) > 1e-5)
    if len(bad):
        return f"{len(bad)} of {len(live)} sampled vectors in the active index differ from the database"
    return None


def _index_by_hash(dirs: Sequence[str | os.PathLike], wanted: set[str], sizes: set[int]) -> dict[str, Path]:
    """Files under ``dirs`` whose SHA-256 is in ``wanted`` (only files of a wanted size are hashed)."""
    found: dict[str, Path] = {}
    if not wanted:
        return found
    for d in dirs:
        for p in sorted(Path(d).rglob("*")):
            try:
                if not p.is_file() or p.stat().st_size not in sizes:
                    continue
            except OSError:
                continue
            h = file_sha256(p)
            if h in wanted:
                found.setdefault(h, p)
    return found
