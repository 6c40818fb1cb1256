"""The catalog's database connection: the engine (URL, SQLite pragmas, read-only mode) and the
translation of the database's low-level failures into one-line catalog errors.

* URLs are built with :meth:`sqlalchemy.engine.URL.create`, never by string formatting, so a
  catalog directory may contain ``?``, ``#``, ``%`` or spaces.
* A catalog the process cannot write (``chmod a-w``, a read-only mount, another user's files) is
  opened **read-only**: SQLite is opened with ``mode=ro`` — plus ``immutable=1`` when the
  database was closed cleanly (no write-ahead log left), because SQLite cannot create the WAL's
  shared-memory file in a read-only directory.  Nothing on the recognition path writes, and
  every write fails at once with :class:`~catalog.errors.ReadOnlyCatalogError`.
* Disk-full failures ("database or disk is full", or the "disk I/O error" SQLite reports when
  the write-ahead log cannot grow) become :class:`~catalog.errors.NoSpaceError` naming the
  directory and the bytes free, instead of reading like corruption; the transaction is rolled
  back, so the catalog stays as it was.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import urllib.parse
from pathlib import Path

from sqlalchemy import create_engine, event
from sqlalchemy.engine import URL, Engine

from .errors import NoSpaceError, ReadOnlyCatalogError

logger = logging.getLogger(__name__)

DB_FILE = "catalog.db"
#: Below this many free bytes, an I/O error of the database is reported as a full disk.
LOW_SPACE_BYTES = 4 << 20
_FULL_MESSAGES = ("database or disk is full", "no space left on device", "could not extend file")
_READONLY_MESSAGES = ("attempt to write a readonly database", "readonly database", "read-only transaction")


def free_bytes(path: Path) -> int | None:
    """Free bytes on the file system holding ``path`` (None if it cannot be told)."""
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def no_space_error(root: Path, detail: str = "") -> NoSpaceError:
    """The :class:`NoSpaceError` for a catalog directory, with the space left on its disk."""
    free = free_bytes(root)
    left = f"{free // 1024} KiB free" if free is not None else "free space unknown"
    more = f" ({detail})" if detail else ""
    return NoSpaceError(f"no space left on device for the catalog at {root} ({left}){more}; nothing was changed — "
                        f"free some space and try again")


def read_only_error(root: Path, what: str = "write") -> ReadOnlyCatalogError:
    """The :class:`ReadOnlyCatalogError` for a ``what`` on a read-only catalog."""
    return ReadOnlyCatalogError(f"the catalog at {root} is read-only (no write access or a read-only mount): "
                                f"cannot {what}; recognition works, changes need write access")


def is_no_space(e: BaseException) -> bool:
    """True for an ``OSError`` meaning the disk (or quota) is full."""
    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)


def writable(root: Path, db_file: Path | None) -> bool:
    """Whether this process may write the catalog directory (and its database file).

    ``os.access`` answers for this process's credentials (root's permission overrides
    included) and for read-only mounts (``EROFS``)."""
    if not os.access(root, os.W_OK | os.X_OK):
        return False
    return db_file is None or not db_file.exists() or os.access(db_file, os.W_OK)


def sqlite_url(path: Path, *, read_only: bool = False) -> URL:
    """SQLAlchemy URL of the SQLite file ``path``; read-only as a ``file:`` URI (``mode=ro``,
    ``immutable=1`` when no write-ahead log is left to read)."""
    if not read_only:
        return URL.create("sqlite", database=str(path))
    wal = path.with_name(path.name + "-wal")
    params = {"mode": "ro"}
    if not (wal.exists() and wal.stat().st_size > 0):
        params["immutable"] = "1"
    uri = "file:" + urllib.parse.quote(str(path)) + "?" + urllib.parse.urlencode(params)
    return URL.create("sqlite", database=uri, query={"uri": "true"})


def create_catalog_engine(root: Path, db_url: str | None, *, read_only: bool = False) -> Engine:
    """The engine of a catalog's database: its own SQLite file (WAL, synchronous=FULL, foreign
    keys, 60 s busy timeout) or ``db_url``; with error translation (module docstring).

    Args:
        root: the catalog directory.
        db_url: SQLAlchemy URL of another database (e.g. PostgreSQL), or None.
        read_only: open the SQLite file read-only (ignored for other databases, whose
            permissions the server enforces).
    """
    url = db_url or sqlite_url(root / DB_FILE, read_only=read_only)
    is_sqlite = str(url).startswith("sqlite")
    engine = create_engine(url, connect_args={"timeout": 60} if is_sqlite else {})
    if engine.dialect.name == "sqlite":

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record):
            cur = dbapi_conn.cursor()
            if not read_only:  # setting the journal mode is a write
                cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=60000")
            cur.close()

    @event.listens_for(engine, "handle_error")
    def _translate(context):
        message = str(context.original_exception).lower()
        if any(m in message for m in _FULL_MESSAGES):
            raise no_space_error(root, str(context.original_exception).splitlines()[0])
        if "disk i/o error" in message:
            free = free_bytes(root)
            if free is not None and free < LOW_SPACE_BYTES:
                raise no_space_error(root, "disk I/O error")
        if any(m in message for m in _READONLY_MESSAGES) or (
            "unable to open database file" in message and not writable(root, None)
        ):
            raise read_only_error(root)

    return engine
