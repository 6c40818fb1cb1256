"""Schema versioning of the catalog database: Alembic migrations shipped inside the package
(``catalog/migrations``), run programmatically — no ``alembic.ini`` is needed.

* :func:`upgrade` brings a database to the newest schema (creating it in an empty database).
  ``catalog init`` and ``catalog upgrade`` call it.
* :func:`ensure_current` refuses a database whose schema is older (or newer) than this
  retailklip; opening a catalog calls it, so an old catalog is never read with new code.

Catalogs created before schema versioning have the tables of revision ``0001`` but no
``alembic_version`` table; :func:`upgrade` stamps them ``0001`` and migrates them from there,
keeping every row.  (A development catalog made with ``create_all`` that already has the
``index_versions`` table is stamped ``0002``, ``0003`` with ``catalog_state.open_set_score``,
``0004`` with the ``outlier_references`` table, ``0005`` with ``catalog_state.hubness_k``.)  On PostgreSQL an upgrade is one transaction (DDL is transactional) under an
advisory lock, so concurrent ``catalog upgrade`` runs serialise; on SQLite likewise (``BEGIN
IMMEDIATE``), and migrations that alter a table copy it in batch mode (SQLite's ALTER TABLE
cannot add constraints).  A failed upgrade leaves the database as it was.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DatabaseError

from .errors import CatalogError

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
#: The revision of catalogs made before schema versioning (tables, no ``alembic_version``).
LEGACY_REVISION = "0001"
#: A table every catalog schema has; its presence without ``alembic_version`` marks a legacy catalog.
_MARKER_TABLE = "catalog_state"
# Arbitrary 64-bit key of the PostgreSQL advisory lock held while migrating.
_PG_LOCK_KEY = 0x5245_5441_494C_4B4C  # "RETAILKL"


def alembic_config(connection: Connection | None = None) -> Config:
    """Alembic's configuration for the catalog's migrations (``catalog/migrations``), bound to
    ``connection`` when one is given."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("path_separator", "os")
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


@lru_cache(maxsize=1)
def script_directory() -> ScriptDirectory:
    """The catalog's Alembic migration scripts (their revisions, in order)."""
    return ScriptDirectory.from_config(alembic_config())


def head_revision() -> str:
    """The newest schema revision this retailklip knows (e.g. ``"0003"``)."""
    head = script_directory().get_current_head()
    assert head is not None, "catalog/migrations has no revisions"
    return head


def _current(conn: Connection) -> str | None:
    return MigrationContext.configure(conn).get_current_revision()


def _tables(conn: Connection) -> set[str]:
    return set(inspect(conn).get_table_names())


def _unversioned_revision(conn: Connection) -> str | None:
    """The revision an unversioned database's tables correspond to (``None``: no catalog)."""
    tables = _tables(conn)
    if _MARKER_TABLE not in tables:
        return None
    if "index_versions" not in tables:
        return LEGACY_REVISION
    columns = {c["name"] for c in inspect(conn).get_columns("catalog_state")}
    if "hubness_k" in columns:
        return "0005"
    if "outlier_references" in tables:
        return "0004"
    return "0003" if "open_set_score" in columns else "0002"


def current_revision(engine: Engine) -> str | None:
    """The database's schema revision: from ``alembic_version``; :data:`LEGACY_REVISION` for a
    catalog made before schema versioning; ``None`` for a database without catalog tables.

    Raises:
        CatalogError: the database cannot be read.
    """
    try:
        with engine.connect() as conn:
            return _current(conn) or _unversioned_revision(conn)
    except DatabaseError as e:
        raise CatalogError(f"{_url(engine)}: not a readable catalog database ({str(e).splitlines()[0]})") from None


def is_initialised(engine: Engine) -> bool:
    """Whether the database already holds catalog tables (of any schema revision)."""
    return current_revision(engine) is not None


def upgrade(engine: Engine, revision: str = "head") -> tuple[str | None, str]:
    """Migrate the database to ``revision`` (default: the newest), in one transaction on
    PostgreSQL.  An empty database gets the whole schema; a legacy catalog (tables without
    ``alembic_version``) is stamped :data:`LEGACY_REVISION` first.  Idempotent.

    Returns:
        ``(before, after)`` revisions; ``before`` is ``None`` for an empty database.

    Raises:
        CatalogError: the database holds a schema newer than this retailklip knows, or cannot
            be read.
    """
    known = {s.revision for s in script_directory().walk_revisions()}
    try:
        with engine.connect() as conn:
            if conn.dialect.name == "sqlite":
                # Python's sqlite3 runs DDL outside any transaction unless one is open: open one
                # (taking the write lock at once), so a failed step leaves the schema as it was.
                conn.exec_driver_sql("BEGIN IMMEDIATE")
            elif conn.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_LOCK_KEY})
            before = _current(conn)
            if before is None:
                before = _unversioned_revision(conn)
                if before is not None:  # a catalog made before schema versioning
                    command.stamp(alembic_config(conn), before)
            if before is not None and before not in known:
                raise CatalogError(_too_new(before))
            command.upgrade(alembic_config(conn), revision)
            after = _current(conn)
            conn.commit()
    except DatabaseError as e:
        raise CatalogError(f"{_url(engine)}: cannot upgrade the catalog schema ({str(e).splitlines()[0]})") from None
    assert after is not None
    return before, after


def ensure_current(engine: Engine) -> str | None:
    """Check that the database's schema is the one this retailklip needs.

    Returns:
        The revision (the head), or ``None`` for a database without catalog tables (the
        caller reports "not initialised").

    Raises:
        CatalogError: the schema is older (with the command that upgrades it) or newer than
            this retailklip, or the database cannot be read.
    """
    head = head_revision()
    rev = current_revision(engine)
    if rev is None or rev == head:
        return rev
    known = [s.revision for s in script_directory().walk_revisions()]
    if rev not in known:
        raise CatalogError(_too_new(rev))
    raise CatalogError(f"catalog schema is at {rev}, this retailklip needs {head}; run `catalog upgrade`")


def _too_new(rev: str) -> str:
    return (
        f"catalog schema is at {rev}, which this retailklip does not know (it needs {head_revision()}); "
        f"the catalog was upgraded by a newer retailklip: upgrade retailklip"
    )


def _url(engine: Engine) -> str:
    return engine.url.render_as_string(hide_password=True)
