"""Alembic migrations of the catalog schema (run by :mod:`catalog.schema`; no alembic.ini needed)."""
