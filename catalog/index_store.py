"""Versioned index directories of a catalog: write once, rename into place, never modify.

Layout::

    DIR/indexes/v000007/index.faiss     the FAISS index (IndexIDMap2; ids = embeddings row ids)
    DIR/indexes/v000007/manifest.json   {"version", "encoder_key", "factory", "vectors", "dim",
                                         "index_sha256", "created", ...}
    DIR/indexes/v000007/offsets.npz     with hubness reduction: each vector's CSLS offset
                                         (``ids``, ``offsets``); the manifest adds
                                         "offsets_sha256" and "hubness_fingerprint"

A version directory is first written as ``DIR/indexes/.v000007.tmp-<pid>`` (files fsynced), then
renamed to its final name (atomic on POSIX) and the parent directory fsynced.  Nothing ever
writes into a final directory again, so a reader that found a version in the database reads
either that complete directory or (once it is retired) nothing — never a half-written file.
Which version serves recognition is decided by the database (``catalog_state.active_version_id``),
switched in one transaction (see :mod:`catalog.rebuild`).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from retailklip.weights import file_sha256

from .errors import IndexFileError
from .fileio import fsync_dir

if TYPE_CHECKING:  # pragma: no cover - FAISS is imported when an index is read or written
    from retailklip.index import VectorIndex

INDEXES_DIR = "indexes"
INDEX_FILE = "index.faiss"
MANIFEST_FILE = "manifest.json"
OFFSETS_FILE = "offsets.npz"


def version_relpath(version_id: int) -> str:
    """``indexes/v000007`` for version 7 (relative to the catalog directory)."""
    return f"{INDEXES_DIR}/v{int(version_id):06d}"


def write_version(root: Path, version_id: int, index: VectorIndex, manifest: dict,
                  offsets: tuple[np.ndarray, np.ndarray, str] | None = None) -> str:
    """Write a version directory atomically.

    Args:
        root: catalog directory.
        version_id: the ``index_versions`` row id.
        index: the built index.
        manifest: extra JSON-serialisable fields (encoder key, factory, recall@1, ...).
        offsets: with hubness reduction, ``(ids int64 (N,), offsets float32 (N,), fingerprint)``:
            the CSLS offsets of the index's vectors and the
            :attr:`~retailklip.hubness.HubnessReference.fingerprint` they were computed against
            (:func:`read_offsets`), so the recognizer need not compute them at every load.

    Returns:
        The SHA-256 (hex) of the index file.

    Raises:
        IndexFileError: the final directory already exists (a version is never rewritten; a
            leftover of a crashed build must be removed first, see :func:`remove_version`).
    """
    final = root / version_relpath(version_id)
    if final.exists():
        raise IndexFileError(f"{final} already exists; version directories are never rewritten")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(mode=0o750)
    try:
        index.save(tmp / INDEX_FILE)
        with open(tmp / INDEX_FILE, "rb+") as f:
            os.fsync(f.fileno())
        digest = file_sha256(tmp / INDEX_FILE)
        body = dict(manifest, version=int(version_id), index_sha256=digest, vectors=index.ntotal, dim=index.dim)
        if offsets is not None:
            ids, values, fingerprint = offsets
            with open(tmp / OFFSETS_FILE, "wb") as f:
                np.savez(f, ids=np.asarray(ids, np.int64), offsets=np.asarray(values, np.float32))
                f.flush()
                os.fsync(f.fileno())
            body.update(offsets_sha256=file_sha256(tmp / OFFSETS_FILE), hubness_fingerprint=fingerprint)
        with open(tmp / MANIFEST_FILE, "w") as f:
            json.dump(body, f, indent=1, sort_keys=True, default=str)
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(tmp)
        os.replace(tmp, final)
        fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return digest


def read_version(root: Path, relpath: str, *, expected_sha256: str | None = None, verify: bool = False) -> VectorIndex:
    """Load a version's index.

    Args:
        root: catalog directory.
        relpath: the version's directory relative to ``root`` (``index_versions.path``).
        expected_sha256: the index file's SHA-256 from the database.
        verify: hash the whole file and compare (``catalog check``); otherwise only the
            manifest's recorded hash is compared with ``expected_sha256``.

    Raises:
        IndexFileError: missing directory or file, or a hash mismatch.
    """
    d = root / relpath
    f = d / INDEX_FILE
    if not f.is_file():
        raise IndexFileError(f"index file {f} is missing; run `catalog check --repair` or `catalog rebuild`")
    if expected_sha256 is not None:
        recorded = _manifest(d).get("index_sha256")
        actual = file_sha256(f) if verify else recorded
        if actual != expected_sha256:
            raise IndexFileError(f"{f} does not match the database record (sha256 {str(actual)[:12]} != {expected_sha256[:12]})")
    try:
        from retailklip.index import VectorIndex

        return VectorIndex.load(f)
    except RuntimeError as e:
        raise IndexFileError(f"{f}: not a readable FAISS index ({str(e).splitlines()[0][:200]})") from None


def _manifest(d: Path) -> dict:
    """A version directory's manifest.

    Raises:
        IndexFileError: missing or unreadable.
    """
    try:
        return json.loads((d / MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        raise IndexFileError(f"{d / MANIFEST_FILE} is missing or unreadable") from None


def _offsets_file_problem(root: Path, relpath: str, recorded: str) -> str | None:
    """Why a version's offsets file is not the one its manifest recorded (SHA-256 ``recorded``), or None."""
    f = root / relpath / OFFSETS_FILE
    if not f.is_file():
        return f"{relpath}/{OFFSETS_FILE} is missing"
    return None if file_sha256(f) == recorded else f"{relpath}/{OFFSETS_FILE} does not match its manifest"


def read_offsets(root: Path, relpath: str, fingerprint: str) -> tuple[np.ndarray, np.ndarray] | None:
    """The CSLS offsets stored with a version (:func:`write_version`) if they were computed
    against the hubness reference of ``fingerprint``: ``(ids int64 (N,), offsets float32 (N,))``;
    None when the version has none or they were computed against other photos or another k.

    Raises:
        IndexFileError: the offsets file is missing, unreadable or does not match the manifest.
    """
    manifest = _manifest(root / relpath)
    if manifest.get("hubness_fingerprint") != fingerprint or "offsets_sha256" not in manifest:
        return None
    problem = _offsets_file_problem(root, relpath, manifest["offsets_sha256"])
    if problem:
        raise IndexFileError(problem)
    f = root / relpath / OFFSETS_FILE
    try:
        with np.load(f, allow_pickle=False) as z:
            ids, values = np.asarray(z["ids"], np.int64), np.asarray(z["offsets"], np.float32)
    except (OSError, ValueError, KeyError) as e:
        raise IndexFileError(f"{f} is unreadable ({str(e).splitlines()[0][:120]})") from None
    if ids.ndim != 1 or ids.shape != values.shape or not np.isfinite(values).all():
        raise IndexFileError(f"{f} holds malformed offsets")
    return ids, values


def offsets_problem(root: Path, relpath: str) -> str | None:
    """What is wrong with a version's stored offsets (``catalog check``), or None: the manifest
    declares none, or the file matches its recorded SHA-256."""
    try:
        recorded = _manifest(root / relpath).get("offsets_sha256")
    except IndexFileError:
        return None  # the index check reports an unreadable manifest
    return None if recorded is None else _offsets_file_problem(root, relpath, recorded)


def remove_version(root: Path, relpath: str) -> None:
    """Delete a version directory (retired or failed versions only; the caller checks)."""
    shutil.rmtree(root / relpath, ignore_errors=True)


def stale_temp_dirs(root: Path) -> list[Path]:
    """Leftover ``.vNNNNNN.tmp-<pid>`` directories of builds that were killed."""
    d = root / INDEXES_DIR
    return sorted(p for p in d.glob(".v*.tmp-*") if p.is_dir()) if d.is_dir() else []
