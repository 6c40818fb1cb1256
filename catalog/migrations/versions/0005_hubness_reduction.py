"""Hubness reduction at the 1-NN (CSLS, :mod:`retailklip.hubness`):

* ``encoders.unlabeled``: float32 (P, D) unit embeddings of the unlabeled store photos an
  encoder's centre was computed from (at most :data:`retailklip.hubness.MAX_UNLABELED`);
* ``catalog_state.hubness_k``: how many of them each reference vector's hubness is measured on
  (0: off), the active version's;
* ``index_versions.hubness_k``: the k each version was built for (``rollback`` restores it; NULL
  for versions built before this revision).

Existing rows get no photos and k = 0: an upgraded catalog keeps matching by plain 1-NN (its
calibrated threshold keeps its meaning) until a rebuild with ``--center-photos`` and
``--hubness-k K``.

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
    # plain ADD COLUMN, no table copy: other tables' foreign keys name encoders and index_versions
    op.add_column("encoders", sa.Column("unlabeled", sa.LargeBinary, nullable=True))
    op.add_column("index_versions", sa.Column("hubness_k", sa.Integer, nullable=True))
    with op.batch_alter_table("catalog_state") as batch:
        batch.add_column(sa.Column("hubness_k", sa.Integer, nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("catalog_state") as batch:
        batch.drop_column("hubness_k")
    # Not batch mode: SQLite's table copy would drop tables that other tables' foreign keys name.
    # ALTER TABLE ... DROP COLUMN needs SQLite >= 3.35 (2021) or PostgreSQL.
    op.execute("ALTER TABLE index_versions DROP COLUMN hubness_k")
    op.execute("ALTER TABLE encoders DROP COLUMN unlabeled")
