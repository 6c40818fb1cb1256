"""``catalog rebuild``: re-embed every reference image, build a new index version, validate it and
switch to it atomically; ``catalog versions`` and ``catalog rollback``.

A rebuild runs in these steps (each a separate, crash-safe stage; ``kill -9`` at any point
leaves the previous version serving, and a rerun picks up where the killed one stopped):

1. **Lock** ``DIR/rebuild.lock`` (``flock``; released by the kernel when the process dies), so
   two rebuilds never interleave.  Versions left ``building`` by a killed run are marked
   ``failed`` and their directories removed.
2. **Encoder**: the one given (``--encoder SPEC --weights FILE``, e.g. a finetuned checkpoint) or
   the catalog's own, registered by identity (backend, model, weights hash, preprocessing,
   centre).
3. **Embed** every reference image that has no vectors from that encoder yet.  Vectors are
   committed to the database in batches, so they are the resumable cache: a reference image is
   identified by its content hash and a vector by (reference, encoder identity, view), and a
   rerun embeds only what is missing.  Single process, or Ray Data across a cluster (``--ray``).
4. **Build** the index with FAISS ``index_factory`` (exact ``Flat``, or an approximate type
   chosen from the vector count and a memory budget, see :func:`retailklip.index_types.choose_index_type`),
   measure recall@1 against exact search, and **validate**: vector count = references x K,
   dimension, and every reference's own view-0 vector finds itself as nearest neighbour.
5. **Write** the version directory (temporary name, fsync, rename; see :mod:`catalog.index_store`).
6. **Catch up and swap**: SKUs added while the rebuild ran are embedded with the new encoder
   (removed ones need nothing); then ONE transaction checks that every reference image has its
   vectors and switches ``catalog_state`` to the new encoder and version.  ``catalog add`` takes
   the same lock first and re-embeds if the encoder changed under it, so nothing is lost.
7. **Retire** versions beyond the newest ``keep`` (directories deleted) and drop vectors of
   encoders no kept version uses.

Exit codes of the CLI (for cron): 0 done; 1 failed (the previous version still serves); 3 another
rebuild holds the lock; 4 validation failed (the new version is kept as ``failed`` for inspection).
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from sqlalchemy import delete, func, select

from retailklip.encoders import create_encoder
from retailklip.errors import CatalogError
from retailklip.faults import crash_point
from retailklip.index import VectorIndex
from retailklip.index_build import build_index
from retailklip.index_types import choose_index_type

from . import index_store
from .models import CatalogState, Embedding, EncoderRow, IndexVersion, ReferenceImage

if TYPE_CHECKING:  # pragma: no cover
    from retailklip.encoders import Encoder
    from .store import Catalog

logger = logging.getLogger(__name__)

LOCK_FILE = "rebuild.lock"
DEFAULT_KEEP = 3
#: References whose own nearest neighbour is checked during validation (all of them up to this
#: many; a random sample beyond, to bound the exact check's cost on large catalogs).
SELF_CHECK_MAX = 20_000


class RebuildError(CatalogError):
    """A rebuild failed; the previous version keeps serving."""

    exit_code = 1


class RebuildBusyError(RebuildError):
    """Another rebuild holds the catalog's rebuild lock."""

    exit_code = 3


class ValidationError(RebuildError):
    """The new index failed validation (kept as a ``failed`` version for inspection)."""

    exit_code = 4


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
        status: ``building`` | ``ready`` | ``failed`` | ``retired``.
        active: True for the version serving recognition.
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
        }


def list_versions(cat: Catalog) -> list[VersionInfo]:
    """All index versions of a catalog, newest first."""
    with cat._sessions() as s:
        active = s.get(CatalogState, 1).active_version_id
        rows = s.execute(
            select(IndexVersion, EncoderRow.spec, EncoderRow.key)
            .join(EncoderRow, EncoderRow.id == IndexVersion.encoder_id)
            .order_by(IndexVersion.id.desc())
        ).all()
    return [
        VersionInfo(
            v.id, v.created, spec, key, v.factory, v.vectors, v.dim, v.augmentations, v.recall_at_1, v.status,
            v.id == active, v.path, v.note,
        )
        for v, spec, key in rows
    ]


class _RebuildLock:
    """``flock`` on ``DIR/rebuild.lock``; the kernel releases it if the process dies."""

    def __init__(self, root: Path) -> None:
        self.path = root / LOCK_FILE

    def __enter__(self) -> _RebuildLock:
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


def mark_failed(cat: Catalog, version_ids: Sequence[int], why: str) -> None:
    """Mark index versions ``failed`` (``why`` appended to their note) and delete their files:
    versions a killed rebuild left ``building``, and ``catalog check`` 's broken versions."""
    with cat._sessions.begin() as s:
        versions = list(s.scalars(select(IndexVersion).where(IndexVersion.id.in_(list(version_ids)))))
        for v in versions:
            v.status, v.note = "failed", (v.note + "; " if v.note else "") + why
        paths = [v.path for v in versions if v.path]  # never "": that would be the catalog directory
    for path in paths:
        index_store.remove_version(cat.root, path)


def _clean_stale(cat: Catalog) -> None:
    """Mark versions left ``building`` by a killed rebuild as failed; delete their files."""
    for tmp in index_store.stale_temp_dirs(cat.root):
        index_store.remove_version(cat.root, str(tmp.relative_to(cat.root)))
    with cat._sessions() as s:
        building = list(s.scalars(select(IndexVersion.id).where(IndexVersion.status == "building")))
    mark_failed(cat, building, "interrupted")
    for vid in building:
        logger.warning("rebuild: version %d was interrupted earlier; marked failed", vid)


# ---------------------------------------------------------------------------- embedding
def _lacking_vectors(columns, encoder_id: int, k: int):
    """SELECT ``columns`` of the reference images without all K vectors (views < K) from
    ``encoder_id``."""
    have = (
        select(Embedding.reference_id, func.count(Embedding.id).label("n"))
        .where(Embedding.encoder_id == encoder_id, Embedding.view < k)
        .group_by(Embedding.reference_id)
        .subquery()
    )
    return (
        select(*columns)
        .select_from(ReferenceImage)
        .outerjoin(have, have.c.reference_id == ReferenceImage.id)
        .where(func.coalesce(have.c.n, 0) != k)
    )


def _missing(cat: Catalog, encoder_id: int, k: int) -> list:
    """Reference images without all K vectors from ``encoder_id``, as embedding jobs."""
    from .embedding import EmbedJob

    with cat._sessions() as s:
        rows = s.execute(
            _lacking_vectors([ReferenceImage.id, ReferenceImage.filename], encoder_id, k).order_by(ReferenceImage.id)
        ).all()
    return [EmbedJob(int(i), str(cat.root / f)) for i, f in rows]


def _store_vectors(cat: Catalog, encoder_id: int, batch: Sequence[tuple[int, np.ndarray]]) -> int:
    """Commit one batch of (reference id, (K, D) vectors); references removed meanwhile are
    skipped.  Returns how many references were stored."""
    ids = [r for r, _ in batch]
    with cat._sessions.begin() as s:
        alive = set(s.scalars(select(ReferenceImage.id).where(ReferenceImage.id.in_(ids))))
        s.execute(delete(Embedding).where(Embedding.encoder_id == encoder_id, Embedding.reference_id.in_(list(alive))))
        s.add_all(
            Embedding(reference_id=r, encoder_id=encoder_id, view=v, vector=np.asarray(vec, np.float32).tobytes())
            for r, vecs in batch
            if r in alive
            for v, vec in enumerate(vecs)
        )
    return len(alive)


def _embed_missing(
    cat: Catalog, encoder: Encoder, encoder_id: int, k: int, seed: int, *, ray: str | None, ray_workers: int | None,
    progress: bool, batch: int,
) -> int:
    """Embed every reference image lacking vectors from ``encoder_id``; returns how many."""
    from .embedding import embed_local, embed_ray

    jobs = _missing(cat, encoder_id, k)
    if not jobs:
        return 0
    logger.info("rebuild: embedding %d reference image(s) (%s)", len(jobs), "ray " + ray if ray else "local")
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
            done += _store_vectors(cat, encoder_id, pending)
            pending = []
            crash_point("rebuild.embedded_batch")
    if pending:
        done += _store_vectors(cat, encoder_id, pending)
        crash_point("rebuild.embedded_batch")
    return done


# ---------------------------------------------------------------------------- build + validate
def _snapshot_table(cat: Catalog, encoder_id: int, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(embedding ids, reference ids, views) of ``encoder_id``'s vectors (views < K) of existing
    reference images, and the number of those references, from one query (SKUs added after it
    are caught up before the swap)."""
    with cat._sessions() as s:
        rows = s.execute(
            select(Embedding.id, Embedding.reference_id, Embedding.view)
            .join(ReferenceImage, ReferenceImage.id == Embedding.reference_id)
            .where(Embedding.encoder_id == encoder_id, Embedding.view < k)
            .order_by(Embedding.id)
        ).all()
    a = np.array(rows, np.int64).reshape(-1, 3)
    return a[:, 0], a[:, 1], a[:, 2], len(np.unique(a[:, 1]))


def _validate(index: VectorIndex, ids: np.ndarray, refs: np.ndarray, views: np.ndarray, vectors: np.ndarray,
              n_refs: int, k: int, dim: int, exact: bool, target_recall: float, seed: int) -> str:
    """Check a built index; raise :class:`ValidationError`; return a one-line summary."""
    if index.dim != dim:
        raise ValidationError(f"index dimension {index.dim} != encoder dimension {dim}")
    if index.ntotal != len(ids) or len(ids) != n_refs * k:
        raise ValidationError(f"index holds {index.ntotal} vectors; expected {n_refs} references x K={k} = {n_refs * k}")
    per_ref = np.unique(refs, return_counts=True)[1]
    if len(per_ref) != n_refs or (per_ref != k).any():
        raise ValidationError(f"vectors cover {len(per_ref)} references with {sorted(set(per_ref.tolist()))} views each; "
                              f"expected {n_refs} references x K={k}")
    own = np.flatnonzero(views == 0)
    if len(own) > SELF_CHECK_MAX:
        own = np.sort(np.random.default_rng(seed).choice(own, SELF_CHECK_MAX, replace=False))
    if not len(own):
        return "empty"
    dist, found = index.search(vectors[own], 1)
    # A tie with an identical vector (two files with the same pixels) also counts as finding itself.
    hit = (found[:, 0] == ids[own]) | (dist[:, 0] <= 1e-6)
    rate = float(hit.mean())
    need = 1.0 if exact else target_recall
    if rate < need:
        bad = ids[own][~hit][:3].tolist()
        raise ValidationError(
            f"{int((~hit).sum())} of {len(own)} reference(s) do not find themselves as nearest neighbour "
            f"(rate {rate:.4f} < {need}); e.g. vector ids {bad}"
        )
    return f"self-match {rate:.4f} over {len(own)} references"


# ---------------------------------------------------------------------------- swap
def _activate(cat: Catalog, version_id: int, encoder: Encoder, encoder_id: int, k: int, seed: int, *,
              ray: str | None, ray_workers: int | None, progress: bool, batch: int, updates: dict | None = None) -> None:
    """Catch up with adds made meanwhile, then switch to ``version_id`` in one transaction."""
    for _attempt in range(20):
        _embed_missing(cat, encoder, encoder_id, k, seed, ray=ray, ray_workers=ray_workers, progress=False, batch=batch)
        crash_point("rebuild.before_swap")
        try:
            with cat._sessions.begin() as s:
                cat._lock_state(s)  # writers wait from here until the commit
                missing = _count_missing(s, encoder_id, k)
                if missing:
                    raise _AddedMeanwhile(missing)
                st = s.get(CatalogState, 1)
                v = s.get(IndexVersion, version_id)
                for key, value in (updates or {}).items():
                    setattr(v, key, value)
                v.status = "ready"
                st.encoder_id = encoder_id
                st.active_version_id = version_id
        except _AddedMeanwhile as e:
            logger.info("rebuild: %d reference image(s) added meanwhile; embedding them", e.args[0])
            continue
        crash_point("rebuild.after_swap")
        return
    raise RebuildError("SKUs kept being added faster than they could be embedded; try again")


class _AddedMeanwhile(Exception):
    pass


def _count_missing(s, encoder_id: int, k: int) -> int:
    return int(s.scalar(_lacking_vectors([func.count(ReferenceImage.id)], encoder_id, k)))


def _retire(cat: Catalog, keep: int) -> None:
    """Retire ready versions beyond the newest ``keep`` (the active one always stays) and drop
    vectors of encoders that no kept version uses."""
    with cat._sessions.begin() as s:
        st = s.get(CatalogState, 1)
        ready = list(s.scalars(select(IndexVersion).where(IndexVersion.status == "ready").order_by(IndexVersion.id.desc())))
        kept = [v for v in ready if v.id == st.active_version_id] + [v for v in ready if v.id != st.active_version_id]
        for v in kept[keep:]:
            v.status = "retired"
            logger.info("rebuild: retired version %d", v.id)
        gone = [v.path for v in kept[keep:]]
        in_use = {st.encoder_id} | {v.encoder_id for v in kept[:keep]}
        dropped = s.execute(delete(Embedding).where(Embedding.encoder_id.not_in(in_use))).rowcount
    for path in gone:
        index_store.remove_version(cat.root, path)
    for v in list_versions(cat):
        if v.status == "failed" and (cat.root / v.path).exists():
            index_store.remove_version(cat.root, v.path)
    if dropped:
        logger.info("rebuild: dropped %d vector(s) of encoders no kept version uses", dropped)


# ---------------------------------------------------------------------------- entry points
def rebuild(
    cat: Catalog,
    *,
    encoder: str | None = None,
    weights: str | os.PathLike | None = None,
    encoder_options: dict | None = None,
    random_init: bool = False,
    center_photos: Sequence[str | os.PathLike] | None = None,
    index_type: str = "auto",
    memory_budget: int | None = None,
    target_recall: float = 0.99,
    keep: int = DEFAULT_KEEP,
    ray: str | None = None,
    ray_workers: int | None = None,
    progress: bool = False,
    batch: int = 64,
) -> VersionInfo:
    """Rebuild the catalog's index as a new version and switch to it (module docstring).

    Args:
        cat: the catalog.
        encoder: encoder SPEC for the new version (default: the catalog's own), e.g. after a
            finetune ``"timm:mobilenetv2_100"`` with ``weights`` the finetuned safetensors file.
        weights: local weights file of the encoder.
        encoder_options: backend options of :func:`retailklip.encoders.create_encoder`.
        random_init: random encoder weights (tests only).
        center_photos: unlabeled photos whose mean feature becomes the new encoder's centre
            (SimpleShot CL2N).  Without them the catalog's centre is kept when the encoder is
            unchanged and dropped (with a warning) for a different encoder or weights.
        index_type: ``"auto"`` (:func:`retailklip.index_types.choose_index_type`) or a FAISS
            ``index_factory`` string (``"Flat"``, ``"HNSW32"``, ``"IVF1024,PQ64"``, ...).
        memory_budget: bytes the index may use (``auto`` only).
        target_recall: recall@1 against exact search that approximate indexes are tuned to.
        keep: versions to keep (>= 1; the active one included).
        ray: Ray cluster address (``auto``, ``local``, ``host:port``, ``ray://...``) to embed
            with Ray Data; None embeds in this process.
        ray_workers: Ray actors (default: one per available CPU slot).
        progress: show a progress bar.
        batch: reference images per database commit while embedding.

    Returns:
        The new active version's :class:`VersionInfo`.

    Raises:
        RebuildBusyError: another rebuild is running (exit code 3).
        ValidationError: the new index failed validation (exit code 4); the old one serves.
        RebuildError / RetailKlipError: any other failure; the old version serves.
    """
    cat.require_writable("rebuild its index")
    if keep < 1 or batch < 1:
        raise CatalogError(f"--keep and --batch must be >= 1, got {keep}, {batch}")
    t0 = time.perf_counter()
    with _RebuildLock(cat.root):
        _clean_stale(cat)
        st = cat.settings()
        k, seed = int(st["augmentations"]), int(st["seed"])
        current = cat.encoder_kwargs()
        if encoder is None and weights is None and not encoder_options and not random_init:
            kw = current
        else:
            kw = dict(current if encoder is None else {}, **(encoder_options or {}))
            kw.update(spec=encoder or current["spec"], random_init=random_init or (encoder is None and current["random_init"]))
            kw["weights"] = str(Path(weights).expanduser().resolve()) if weights else (current["weights"] if encoder is None else None)
            if kw.get("center") is not None and center_photos is None:
                logger.warning("rebuild: the feature centre was computed with the previous encoder; dropping it "
                               "(pass --center-photos to compute a new one)")
            kw["center"] = None
        spec = kw.pop("spec")
        enc = create_encoder(spec, device=cat._device, **kw)
        if center_photos is not None:
            photos = list(center_photos)
            if not photos:
                raise CatalogError("no photos to compute the feature centre from")
            enc = enc.with_center(enc.mean_feature(photos, progress=progress))
        from .store import _encoder_row

        options = {key: value for key, value in kw.items() if key not in ("weights", "random_init", "center")}
        with cat._sessions.begin() as s:
            row = _encoder_row(s, enc, spec, kw.get("weights"), options)
            enc_id = row.id
            gen = s.get(CatalogState, 1).generation
            v = IndexVersion(
                encoder_id=enc_id, factory=index_type, vectors=0, dim=enc.dim, augmentations=k, status="building",
                path="", generation=gen,
            )
            s.add(v)
            s.flush()
            v.path = index_store.version_relpath(v.id)
            vid, vpath = v.id, v.path
        cat._encoders.setdefault(enc_id, enc)
        logger.info("rebuild: version %d building with encoder %s", vid, enc.identity.key)
        crash_point("rebuild.started")
        try:
            embedded = _embed_missing(cat, enc, enc_id, k, seed, ray=ray, ray_workers=ray_workers, progress=progress, batch=batch)
            ids, refs, views, n_refs = _snapshot_table(cat, enc_id, k)
            crash_point("rebuild.snapshot_taken")
            factory = choose_index_type(len(ids), enc.dim, memory_budget) if index_type == "auto" else index_type
            found, vectors = cat.existing_vectors(ids, enc.dim)
            if len(found) != len(ids):  # SKUs removed since the snapshot query: leave them out
                alive = np.isin(ids, found)
                ids, refs, views = ids[alive], refs[alive], views[alive]
                n_refs = len(np.unique(refs))
            t1 = time.perf_counter()
            if len(ids):
                index, recall = build_index(ids, vectors, factory, target_recall=target_recall, seed=seed)
            else:  # an empty catalog (e.g. switching encoders before the first add): exact and empty
                factory, index, recall = "Flat", VectorIndex(enc.dim), 1.0
            crash_point("rebuild.built")
            summary = _validate(index, ids, refs, views, vectors, n_refs, k, enc.dim, factory == "Flat", target_recall, seed)
            logger.info("rebuild: version %d: %s, %d vectors, recall@1 %.4f, %s (%.1f s)",
                        vid, factory, index.ntotal, recall, summary, time.perf_counter() - t1)
            sha = index_store.write_version(
                cat.root, vid, index,
                {"encoder_key": enc.identity.key, "encoder": spec, "factory": factory, "recall_at_1": recall,
                 "augmentations": k, "generation": gen},
            )
            crash_point("rebuild.written")
            del vectors
            _activate(
                cat, vid, enc, enc_id, k, seed, ray=ray, ray_workers=ray_workers, progress=progress, batch=batch,
                updates={"factory": factory, "vectors": int(index.ntotal), "recall_at_1": float(recall),
                         "index_sha256": sha, "note": f"embedded {embedded}; {summary}"},
            )
        except BaseException as e:
            with cat._sessions.begin() as s:
                row = s.get(IndexVersion, vid)
                if row is not None and row.status == "building":
                    row.status = "failed"
                    row.note = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}" if str(e) else type(e).__name__
            if not isinstance(e, ValidationError):
                index_store.remove_version(cat.root, vpath)
            raise
        _retire(cat, keep)
    info = next(v for v in list_versions(cat) if v.id == vid)
    logger.info("rebuild: version %d active (%s, %d vectors, recall@1 %s) in %.1f s",
                vid, info.factory, info.vectors, info.recall_at_1, time.perf_counter() - t0)
    return info


def rollback(cat: Catalog, version: int | None = None, *, progress: bool = False, batch: int = 64) -> VersionInfo:
    """Make an earlier ``ready`` version active again (default: the newest one older than the
    active version).  SKUs added since that version was built are embedded with its encoder
    first (its weights file must still exist unchanged).

    Raises:
        CatalogError: no such version, not ``ready`` (retired or failed), already active, or no
            earlier version to roll back to.
        RebuildBusyError: a rebuild is running.
        ReadOnlyCatalogError: the catalog is read-only.
    """
    cat.require_writable("roll back its index")
    with _RebuildLock(cat.root):
        versions = list_versions(cat)
        active = next((v for v in versions if v.active), None)
        if version is None:
            older = [v for v in versions if v.status == "ready" and not v.active and (active is None or v.id < active.id)]
            if not older:
                raise CatalogError("no earlier ready version to roll back to (see `catalog versions`)")
            target = older[0]
        else:
            target = next((v for v in versions if v.id == version), None)
            if target is None:
                raise CatalogError(f"no index version {version} (see `catalog versions`)")
            if target.active:
                raise CatalogError(f"version {version} is already active")
            if target.status != "ready":
                raise CatalogError(f"version {version} is {target.status}; only ready versions can be activated")
        cat.load_index(target.id, verify=True)  # its files must be intact before we switch
        with cat._sessions() as s:
            enc_id = s.get(IndexVersion, target.id).encoder_id
        enc = cat.encoder_for(enc_id)
        st = cat.settings()
        if target.augmentations != st["augmentations"]:
            raise CatalogError(f"version {target.id} was built with K={target.augmentations}, the catalog uses K={st['augmentations']}")
        _activate(cat, target.id, enc, enc_id, int(st["augmentations"]), int(st["seed"]), ray=None, ray_workers=None,
                  progress=progress, batch=batch)
    logger.info("rollback: version %d active", target.id)
    return next(v for v in list_versions(cat) if v.id == target.id)
