"""Versioned indexes: table ``index_versions`` and ``catalog_state.active_version_id`` (the
version serving recognition; NULL until the first version is built).

Embedding row ids become FAISS ids inside index snapshots, so they must never be reused after a
delete: on SQLite the ``embeddings`` table is rebuilt with ``AUTOINCREMENT`` (without it SQLite
hands out the largest deleted rowid again).  PostgreSQL sequences never reuse values.

Revision ID: 0002
Revises: 0001
Create Date: 2024-06-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

FK_ACTIVE_VERSION = "fk_catalog_state_active_version_id_index_versions"


def upgrade() -> None:
    op.create_table(
        "index_versions",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("created", sa.DateTime(timezone=True), nullable=False),
        sa.Column("encoder_id", sa.Integer, sa.ForeignKey("encoders.id"), nullable=False),
        sa.Column("factory", sa.String(200), nullable=False),
        sa.Column("vectors", sa.Integer, nullable=False),
        sa.Column("dim", sa.Integer, nullable=False),
        sa.Column("augmentations", sa.Integer, nullable=False),
        sa.Column("recall_at_1", sa.Float, nullable=True),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("path", sa.String(200), nullable=False),
        sa.Column("index_sha256", sa.String(64), nullable=True),
        sa.Column("generation", sa.Integer, nullable=False),
        sa.Column("note", sa.Text, nullable=True),
    )
    op.create_index("ix_index_versions_encoder_id", "index_versions", ["encoder_id"])
    op.create_index("ix_index_versions_status", "index_versions", ["status"])
    # Batch mode: SQLite cannot add a foreign key to an existing table, so the table is copied.
    with op.batch_alter_table("catalog_state") as batch:
        batch.add_column(sa.Column("active_version_id", sa.Integer, nullable=True))
        batch.create_foreign_key(FK_ACTIVE_VERSION, "index_versions", ["active_version_id"], ["id"])
    if op.get_bind().dialect.name == "sqlite":
        # Nothing references `embeddings`, so copying it cannot cascade; rows keep their ids and
        # sqlite_sequence starts after the largest one.
        with op.batch_alter_table("embeddings", recreate="always", table_kwargs={"sqlite_autoincrement": True}):
            pass


def downgrade() -> None:
    with op.batch_alter_table("catalog_state") as batch:
        batch.drop_constraint(FK_ACTIVE_VERSION, type_="foreignkey")
        batch.drop_column("active_version_id")
    op.drop_index("ix_index_versions_status", table_name="index_versions")
    op.drop_index("ix_index_versions_encoder_id", table_name="index_versions")
    op.drop_table("index_versions")
