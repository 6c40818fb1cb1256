"""Alembic environment of the catalog schema.

Run through :mod:`catalog.schema`, which passes an open connection in
``config.attributes["connection"]`` (the caller owns its transaction).  For ``alembic`` on the
command line, set ``sqlalchemy.url`` in the config instead.  ``render_as_batch`` makes ALTERs
work on SQLite (the table is copied and swapped).
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from catalog.models import Base

config = context.config


def _run(connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=True,
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    context.configure(url=config.get_main_option("sqlalchemy.url"), target_metadata=Base.metadata,
                      render_as_batch=True, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    conn = config.attributes.get("connection")
    if conn is not None:
        _run(conn)
    else:
        engine = create_engine(config.get_main_option("sqlalchemy.url"))
        try:
            with engine.begin() as c:
                _run(c)
        finally:
            engine.dispose()
