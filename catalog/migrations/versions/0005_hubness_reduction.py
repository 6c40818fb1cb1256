"""Hubness reduction at the 1-NN (CSLS, :mod:`retailklip.hubness`): ``encoders.unlabeled``, the
float32 (P, D) unit embeddings of the unlabeled store photos an encoder's centre was computed
from (at most :data:`retailklip.hubness.MAX_UNLABELED` of them), and ``catalog_state.hubness_k``,
the number of them each reference vector's hubness is measured on (0: off).  Existing rows get
no photos and k = 0, so existing catalogs keep matching by plain 1-NN until a rebuild with
``--center-photos`` stores photos.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("encoders", sa.Column("unlabeled", sa.LargeBinary, nullable=True))  # no table copy (see downgrade)
    with op.batch_alter_table("catalog_state") as batch:
        batch.add_column(sa.Column("hubness_k", sa.Integer, nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("catalog_state") as batch:
        batch.drop_column("hubness_k")
    # Not batch mode: SQLite's table copy would drop ``encoders``, which other tables' foreign keys
    # name.  ALTER TABLE ... DROP COLUMN needs SQLite >= 3.35 (2021) or PostgreSQL.
    op.execute("ALTER TABLE encoders DROP COLUMN unlabeled")
