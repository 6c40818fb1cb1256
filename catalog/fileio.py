"""Durable file writes of the catalog directory: atomic replacement and directory fsync.

Used for stored reference images (:mod:`catalog.store`, ``catalog check --repair``) and index
version directories (:mod:`catalog.index_store`).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .faults import crash_point


def fsync_dir(path: Path) -> None:
    """fsync a directory, making the creation / rename of its entries durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(dest: Path, data: bytes, mode: int = 0o640) -> None:
    """Write ``data`` to ``dest`` atomically: temporary file in the same directory, fsync,
    ``chmod mode``, rename, fsync of the directory (so the rename is durable before a
    transaction naming the file commits).  A crash leaves at most a ``.tmp-*`` file."""
    if not dest.parent.is_dir():
        dest.parent.mkdir(parents=True, exist_ok=True)
        fsync_dir(dest.parent.parent)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        crash_point("add.after_tmp_file")
        os.replace(tmp, dest)
        fsync_dir(dest.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
