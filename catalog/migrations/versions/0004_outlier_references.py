"""Outlier references: tables ``outlier_references`` (reference images of products that are not
in the catalog) and ``outlier_embeddings`` (their K vectors per encoder), the inputs of the
``outlier-ratio`` open-set score (:mod:`retailklip.open_set`).  New tables only: existing rows are
untouched, and a catalog without outlier references behaves as before.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "outlier_references",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("label", sa.String(512), nullable=True),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("filename", sa.String(100), nullable=False),
        sa.Column("size_bytes", sa.Integer, nullable=False),
        sa.Column("width", sa.Integer, nullable=False),
        sa.Column("height", sa.Integer, nullable=False),
        sa.Column("created", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("sha256"),
    )
    # Row ids are never reused after a delete (AUTOINCREMENT on SQLite), like embeddings': the
    # recognizer tells new outlier vectors from removed ones by id.
    op.create_table(
        "outlier_embeddings",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("reference_id", sa.Integer, sa.ForeignKey("outlier_references.id", ondelete="CASCADE"), nullable=False),
        sa.Column("encoder_id", sa.Integer, sa.ForeignKey("encoders.id"), nullable=False),
        sa.Column("view", sa.Integer, nullable=False),
        sa.Column("vector", sa.LargeBinary, nullable=False),
        sa.UniqueConstraint("reference_id", "encoder_id", "view"),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_outlier_embeddings_reference_id", "outlier_embeddings", ["reference_id"])
    op.create_index("ix_outlier_embeddings_encoder_id", "outlier_embeddings", ["encoder_id"])


def downgrade() -> None:
    op.drop_index("ix_outlier_embeddings_encoder_id", table_name="outlier_embeddings")
    op.drop_index("ix_outlier_embeddings_reference_id", table_name="outlier_embeddings")
    op.drop_table("outlier_embeddings")
    op.drop_table("outlier_references")
