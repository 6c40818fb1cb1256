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
3. **Embed** every reference image that has no vectors from that encoder yet, and every outlier
   reference (products not in the catalog, :mod:`catalog.outliers`), whose vectors stay in the
   database (the recognizer keeps them in an exact index of their own, never in the snapshot).  Vectors are
   committed to the database in batches, so they are the resumable cache: a reference image is
   identified by its content hash and a vector by (reference, encoder identity, view), and a
   rerun embeds only what is missing.  Single process, or Ray Data across a cluster (``--ray``).
4. **Build** the index with FAISS ``index_factory`` (exact ``Flat``, or an approximate type
   chosen from the vector count and a memory budget, see :func:`retailklip.index_types.choose_index_type`),
   measure recall@1 against exact search, and **validate**: vector count = references x K,
   dimension, and every reference's own view-0 vector finds itself as nearest neighbour.
5. **Write** the version directory (temporary name, fsync, rename; see :mod:`catalog.index_store`).
6. **Catch up and swap**: SKUs (and outlier references) added while the rebuild ran are embedded
   with the new encoder (removed ones need nothing); then ONE transaction checks that every
   reference image and outlier reference has its vectors and switches ``catalog_state`` to the new encoder and version.  ``catalog add`` takes
   the same lock first and re-embeds if the encoder changed under it, so nothing is lost.
7. **Retire** versions beyond the newest ``keep`` (directories deleted) and drop vectors of
   encoders no kept version uses.

Exit codes of the CLI (for cron): 0 done; 1 failed (the previous version still serves); 3 another
rebuild holds the lock; 4 validation failed (the new version is kept as ``failed`` for inspection).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from retailklip.encoders import create_encoder
from retailklip.hubness import DEFAULT_HUBNESS_K, check_hubness_k
from retailklip.index import VectorIndex
from retailklip.index_build import build_index
from retailklip.index_types import choose_index_type

from . import index_store
from .connection import CatalogConnection
from .embedding import RayConnection
from .encoders import center_on
from .errors import CatalogError, RebuildError, ValidationError
from .faults import crash_point
from .models import CatalogState, EncoderRow, IndexVersion, VersionStatus
from .reads import CatalogReader
from .vectors import OUTLIERS, REFERENCES, VectorTable, count_lacking, embed_all_missing, vector_table
from .versions import RebuildLock, VersionInfo, fail_interrupted, list_versions, retire

if TYPE_CHECKING:  # pragma: no cover
    from retailklip.encoders import Encoder
    from retailklip.hubness import HubnessReference

logger = logging.getLogger(__name__)

DEFAULT_KEEP = 3
#: References whose own nearest neighbour is checked during validation (all of them up to this
#: many; a random sample beyond, to bound the exact check's cost on large catalogs).
SELF_CHECK_MAX = 20_000


# ---------------------------------------------------------------------------- stage 2: encoder
def _encoder_settings(cat: CatalogConnection, encoder: str | None, weights, encoder_options: dict | None,
                      random_init: bool, center_photos) -> tuple[str, dict]:
    """``(SPEC, create_encoder keyword arguments)`` of the new version's encoder: the catalog's
    own when nothing is given; otherwise the given one (its centre dropped, with a warning,
    unless new centering photos are given)."""
    current = cat.encoder_kwargs()
    if encoder is None and weights is None and not encoder_options and not random_init:
        kw = dict(current)
    else:
        kw = dict(current if encoder is None else {}, **(encoder_options or {}))
        kw.update(spec=encoder or current["spec"], random_init=random_init or (encoder is None and current["random_init"]))
        kw["weights"] = str(Path(weights).expanduser().resolve()) if weights else (current["weights"] if encoder is None else None)
        if kw.get("center") is not None and center_photos is None:
            logger.warning("rebuild: the feature centre was computed with the previous encoder; dropping it "
                           "(pass --center-photos to compute a new one)")
        kw["center"] = None
    return kw.pop("spec"), kw


def _build_encoder(cat: CatalogConnection, spec: str, kw: dict, center_photos, progress: bool
                   ) -> tuple[Encoder, np.ndarray | None]:
    """The new version's encoder, centred on ``center_photos`` when given, and the embeddings of
    those photos kept for hubness reduction (:func:`catalog.encoders.center_on`; None without)."""
    enc = create_encoder(spec, device=cat.device, **kw)
    if center_photos is None:
        return enc, None
    return center_on(enc, center_photos, progress=progress)


def _start_version(cat: CatalogConnection, enc: Encoder, spec: str, kw: dict, index_type: str, k: int,
                   unlabeled: np.ndarray | None = None, hubness_k: int | None = None) -> tuple[int, str, int, int]:
    """Register the encoder (with its unlabeled photos' embeddings, if any) and insert the new
    version row (building) with its hubness k (None: the catalog's).  Returns ``(version id,
    version path, encoder id, generation)``."""
    options = {key: value for key, value in kw.items() if key not in ("weights", "random_init", "center")}
    with cat.sessions.begin() as s:
        enc_id = cat.encoders.register(s, enc, spec, kw.get("weights"), options, unlabeled)
        st = s.get(CatalogState, 1)
        gen, hubness_k = st.generation, st.hubness_k if hubness_k is None else hubness_k
        if hubness_k and unlabeled is None and s.get(EncoderRow, enc_id).unlabeled is None:
            logger.warning("rebuild: hubness reduction (k=%d) is off for this version: its encoder has no unlabeled "
                           "photos (pass --center-photos)", hubness_k)
        elif not hubness_k and unlabeled is not None:
            logger.warning("rebuild: the unlabeled photos are stored, but hubness reduction is off (k=0); pass "
                           "--hubness-k %d to use them", DEFAULT_HUBNESS_K)
        v = IndexVersion(encoder_id=enc_id, factory=index_type, vectors=0, dim=enc.dim, augmentations=k,
                         status=VersionStatus.BUILDING, path="", generation=gen, hubness_k=hubness_k)
        s.add(v)
        s.flush()
        v.path = index_store.version_relpath(v.id)
        vid, vpath = v.id, v.path
    cat.encoders.remember(enc_id, enc)
    return vid, vpath, enc_id, gen


# ---------------------------------------------------------------------------- stage 4: build + validate
def _version_hubness(cat: CatalogReader, version_id: int, encoder_id: int) -> HubnessReference | None:
    """The hubness reference the new version will rank with (its k, its encoder's photos), so
    its CSLS offsets are computed once here and stored with it; None with k = 0, without photos,
    or with damaged ones (the recognizer then computes or skips them, as it does without)."""
    with cat.sessions() as s:
        k = s.get(IndexVersion, version_id).hubness_k
    try:
        return cat.hubness_reference(encoder_id, k=k or 0)
    except CatalogError as e:
        logger.warning("rebuild: no CSLS offsets stored with version %d: %s", version_id, str(e).splitlines()[0])
        return None


def _read_vectors(cat: CatalogReader, encoder_id: int, k: int, dim: int) -> tuple[VectorTable, np.ndarray]:
    """The table of the encoder's vectors and the float32 (N, dim) vectors themselves (rows of
    SKUs removed since the table was read are left out)."""
    table = vector_table(cat, encoder_id, k)
    crash_point("rebuild.snapshot_taken")
    found, vectors = cat.existing_vectors(table.ids, dim)
    if len(found) != len(table.ids):  # SKUs removed since the table was read: leave them out
        table = table.only(found)
    return table, vectors


def _build(table: VectorTable, vectors: np.ndarray, index_type: str, memory_budget: int | None,
           target_recall: float, seed: int, dim: int) -> tuple[VectorIndex, str, float]:
    """``(index, factory, recall@1)``: the index type chosen (``auto``) or given, built and tuned."""
    factory = choose_index_type(len(table.ids), dim, memory_budget) if index_type == "auto" else index_type
    if not len(table.ids):  # an empty catalog (e.g. switching encoders before the first add): exact and empty
        return VectorIndex(dim), "Flat", 1.0
    index, recall = build_index(table.ids, vectors, factory, target_recall=target_recall, seed=seed)
    return index, factory, recall


def validate_index(index: VectorIndex, table: VectorTable, vectors: np.ndarray, k: int, dim: int, *, exact: bool,
                   target_recall: float, seed: int) -> str:
    """Check a built index before it may serve: dimension, K vectors of every reference, and
    every reference's own view-0 vector finding itself as nearest neighbour (all of them for an
    exact index, a ``target_recall`` share for an approximate one; a sample of
    :data:`SELF_CHECK_MAX` beyond that many references).

    Returns:
        A one-line summary (``"self-match 1.0000 over 81 references"``).

    Raises:
        ValidationError: what failed, with examples.
    """
    ids, refs, views, n_refs = table.ids, table.references, table.views, table.n_references
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


# ---------------------------------------------------------------------------- stage 6: catch up + swap
class _AddedMeanwhile(Exception):
    pass


def added_meanwhile(references: int, outliers: int) -> str:
    """What a rebuild found added during its embedding, for its log: ``"2 reference image(s)"``,
    ``"1 outlier reference(s)"`` or both joined by "and"."""
    parts = [f"{n} {noun}(s)" for n, noun in ((references, REFERENCES.noun), (outliers, OUTLIERS.noun)) if n]
    return " and ".join(parts) or "nothing"


def _activate(cat: CatalogConnection, version_id: int, encoder: Encoder, encoder_id: int, k: int, seed: int, *,
              ray: str | RayConnection | None, ray_workers: int | None, batch: int,
              updates: dict | None = None) -> None:
    """Catch up with adds made meanwhile, then switch to ``version_id`` in one transaction that
    holds the writers' lock (an ``add`` embedding with the old encoder re-embeds after it); the
    version's hubness k (if it recorded one) becomes the catalog's in the same transaction."""
    for _attempt in range(20):
        embed_all_missing(cat, encoder, encoder_id, k, seed, ray=ray, ray_workers=ray_workers, batch=batch)
        crash_point("rebuild.before_swap")
        try:
            with cat.sessions.begin() as s:
                cat.lock_writers(s)  # writers wait from here until the commit
                missing = count_lacking(s, encoder_id, k), count_lacking(s, encoder_id, k, OUTLIERS)
                if any(missing):
                    raise _AddedMeanwhile(*missing)
                st = s.get(CatalogState, 1)
                v = s.get(IndexVersion, version_id)
                for key, value in (updates or {}).items():
                    setattr(v, key, value)
                v.status = VersionStatus.READY
                st.encoder_id = encoder_id
                st.active_version_id = version_id
                if v.hubness_k is not None:  # None: a version built before migration 0005
                    st.hubness_k = v.hubness_k
        except _AddedMeanwhile as e:
            logger.info("rebuild: %s added meanwhile; embedding them", added_meanwhile(*e.args))
            continue
        crash_point("rebuild.after_swap")
        return
    raise RebuildError("SKUs kept being added faster than they could be embedded; try again")


def _fail_version(cat: CatalogConnection, version_id: int, path: str, error: BaseException) -> None:
    """A rebuild stage failed: mark the building version failed with the error; delete its
    files unless validation failed (those are kept for inspection)."""
    with cat.sessions.begin() as s:
        row = s.get(IndexVersion, version_id)
        if row is not None and row.status == VersionStatus.BUILDING:
            row.status = VersionStatus.FAILED
            row.note = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}" if str(error) else type(error).__name__
    if not isinstance(error, ValidationError):
        index_store.remove_version(cat.root, path)


# ---------------------------------------------------------------------------- entry points
def rebuild(
    cat: CatalogReader,
    *,
    encoder: str | None = None,
    weights: str | os.PathLike | None = None,
    encoder_options: dict | None = None,
    random_init: bool = False,
    center_photos: Sequence[str | os.PathLike] | None = None,
    hubness_k: int | None = None,
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
            unchanged and dropped (with a warning) for a different encoder or weights.  Their
            embeddings are kept for hubness reduction (:mod:`retailklip.hubness`).
        hubness_k: the new version's hubness-reduction k (0: plain 1-NN; effective when the
            encoder has unlabeled photos' embeddings; a warning says when it is not); None
            keeps the catalog's.  Recorded with the version: ``rollback`` restores it.
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
        The new active version's :class:`~catalog.versions.VersionInfo`.

    Raises:
        RebuildBusyError: another rebuild is running (exit code 3).
        ValidationError: the new index failed validation (exit code 4); the old one serves.
        RebuildError / RetailKlipError: any other failure; the old version serves.
    """
    cat.require_writable("rebuild its index")
    if keep < 1 or batch < 1:
        raise CatalogError(f"--keep and --batch must be >= 1, got {keep}, {batch}")
    if hubness_k is not None:
        hubness_k = check_hubness_k(hubness_k)
    t0 = time.perf_counter()
    # one Ray connection (made by the first embedding that needs it) for the references, the
    # outlier references and the catch-up: RayConnection says why
    with RebuildLock(cat.root), (RayConnection(ray) if ray else nullcontext()) as connection:
        fail_interrupted(cat)
        st = cat.settings()
        k, seed = int(st["augmentations"]), int(st["seed"])
        spec, kw = _encoder_settings(cat, encoder, weights, encoder_options, random_init, center_photos)
        enc, unlabeled = _build_encoder(cat, spec, kw, center_photos, progress)
        if index_type != "auto":  # a bad index type fails here, not after every reference is embedded
            VectorIndex(enc.dim, index_type)
        vid, vpath, enc_id, gen = _start_version(cat, enc, spec, kw, index_type, k, unlabeled, hubness_k)
        logger.info("rebuild: version %d building with encoder %s", vid, enc.identity.key)
        crash_point("rebuild.started")
        try:
            embedded, outliers = embed_all_missing(cat, enc, enc_id, k, seed, ray=connection, ray_workers=ray_workers,
                                                   progress=progress, batch=batch)
            table, vectors = _read_vectors(cat, enc_id, k, enc.dim)
            t1 = time.perf_counter()
            index, factory, recall = _build(table, vectors, index_type, memory_budget, target_recall, seed, enc.dim)
            crash_point("rebuild.built")
            summary = validate_index(index, table, vectors, k, enc.dim, exact=factory == "Flat",
                                     target_recall=target_recall, seed=seed)
            logger.info("rebuild: version %d: %s, %d vectors, recall@1 %.4f, %s (%.1f s)",
                        vid, factory, index.ntotal, recall, summary, time.perf_counter() - t1)
            hub = _version_hubness(cat, vid, enc_id)
            sha = index_store.write_version(
                cat.root, vid, index,
                {"encoder_key": enc.identity.key, "encoder": spec, "factory": factory, "recall_at_1": recall,
                 "augmentations": k, "generation": gen},
                offsets=None if hub is None else (table.ids, hub.offsets(vectors), hub.fingerprint),
            )
            crash_point("rebuild.written")
            del vectors
            _activate(cat, vid, enc, enc_id, k, seed, ray=connection, ray_workers=ray_workers, batch=batch,
                      updates={"factory": factory, "vectors": int(index.ntotal), "recall_at_1": float(recall),
                               "index_sha256": sha,
                               "note": f"embedded {embedded}" + (f" + {outliers} outlier(s)" if outliers else "") + f"; {summary}"})
        except BaseException as e:
            _fail_version(cat, vid, vpath, e)
            raise
        retire(cat, keep)
    info = next(v for v in list_versions(cat) if v.id == vid)
    logger.info("rebuild: version %d active (%s, %d vectors, recall@1 %s) in %.1f s",
                vid, info.factory, info.vectors, info.recall_at_1, time.perf_counter() - t0)
    return info


def rollback(cat: CatalogReader, version: int | None = None, *, progress: bool = False, batch: int = 64) -> VersionInfo:
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
    with RebuildLock(cat.root):
        versions = list_versions(cat)
        active = next((v for v in versions if v.active), None)
        if version is None:
            older = [v for v in versions if v.status == VersionStatus.READY and not v.active and (active is None or v.id < active.id)]
            if not older:
                raise CatalogError("no earlier ready version to roll back to (see `catalog versions`)")
            target = older[0]
        else:
            target = next((v for v in versions if v.id == version), None)
            if target is None:
                raise CatalogError(f"no index version {version} (see `catalog versions`)")
            if target.active:
                raise CatalogError(f"version {version} is already active")
            if target.status != VersionStatus.READY:
                raise CatalogError(f"version {version} is {target.status}; only ready versions can be activated")
        cat.load_index(target.id, verify=True)  # its files must be intact before we switch
        with cat.sessions() as s:
            enc_id = s.get(IndexVersion, target.id).encoder_id
        enc = cat.encoder_for(enc_id)
        st = cat.settings()
        if target.augmentations != st["augmentations"]:
            raise CatalogError(f"version {target.id} was built with K={target.augmentations}, the catalog uses K={st['augmentations']}")
        _activate(cat, target.id, enc, enc_id, int(st["augmentations"]), int(st["seed"]), ray=None, ray_workers=None,
                  batch=batch)
    logger.info("rollback: version %d active", target.id)
    return next(v for v in list_versions(cat) if v.id == target.id)
