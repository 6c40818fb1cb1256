"""The open-set score the threshold is on: ``catalog_state.open_set_score`` (``"distance"``: the
1-NN cosine distance, every catalog before this revision; ``"ratio"``: Lowe's ratio d1 / d2,
see :mod:`retailklip.open_set`).  Existing rows get ``"distance"``, so their thresholds keep
their meaning.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("catalog_state") as batch:
        batch.add_column(sa.Column("open_set_score", sa.String(20), nullable=False, server_default="distance"))


def downgrade() -> None:
    with op.batch_alter_table("catalog_state") as batch:
        batch.drop_column("open_set_score")
