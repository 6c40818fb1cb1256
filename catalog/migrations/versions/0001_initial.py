"""The catalog schema before versioned indexes: skus, reference_images, encoders, embeddings,
catalog_state.

Catalogs created before schema versioning (no ``alembic_version`` table) have exactly this
schema; :func:`catalog.schema.upgrade` stamps them with this revision and upgrades from here.

Revision ID: 0001
Revises:
Create Date: 2024-06-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

SKU_ID_MAX = 128
NAME_MAX = 512


def upgrade() -> None:
    op.create_table(
        "skus",
        sa.Column("id", sa.String(SKU_ID_MAX), primary_key=True),
        sa.Column("name", sa.String(NAME_MAX), nullable=True),
        sa.Column("created", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "encoders",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("key", sa.String(200), nullable=False, unique=True),
        sa.Column("backend", sa.String(20), nullable=False),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("weights", sa.String(200), nullable=False),
        sa.Column("dim", sa.Integer, nullable=False),
        sa.Column("preprocess", sa.Text, nullable=False),
        sa.Column("spec", sa.String(300), nullable=False),
        sa.Column("weights_path", sa.Text, nullable=True),
        sa.Column("options", sa.Text, nullable=False),
        sa.Column("center", sa.LargeBinary, nullable=True),
        sa.Column("created", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "reference_images",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("sku_id", sa.String(SKU_ID_MAX), sa.ForeignKey("skus.id", ondelete="CASCADE"), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("filename", sa.String(100), nullable=False),
        sa.Column("size_bytes", sa.Integer, nullable=False),
        sa.Column("width", sa.Integer, nullable=False),
        sa.Column("height", sa.Integer, nullable=False),
        sa.Column("created", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_reference_images_sku_id", "reference_images", ["sku_id"])
    op.create_index("ix_reference_images_sha256", "reference_images", ["sha256"])
    op.create_table(
        "embeddings",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column(
            "reference_id", sa.Integer, sa.ForeignKey("reference_images.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("encoder_id", sa.Integer, sa.ForeignKey("encoders.id"), nullable=False),
        sa.Column("view", sa.Integer, nullable=False),
        sa.Column("vector", sa.LargeBinary, nullable=False),
        sa.UniqueConstraint("reference_id", "encoder_id", "view"),
    )
    op.create_index("ix_embeddings_reference_id", "embeddings", ["reference_id"])
    op.create_index("ix_embeddings_encoder_id", "embeddings", ["encoder_id"])
    op.create_table(
        "catalog_state",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("encoder_id", sa.Integer, sa.ForeignKey("encoders.id"), nullable=False),
        sa.Column("augmentations", sa.Integer, nullable=False),
        sa.Column("seed", sa.Integer, nullable=False),
        sa.Column("threshold", sa.Float, nullable=False),
        sa.Column("generation", sa.Integer, nullable=False),
        sa.Column("segmenter", sa.String(100), nullable=True),
        sa.Column("segmenter_checkpoint", sa.Text, nullable=True),
    )


def downgrade() -> None:
    op.drop_table("catalog_state")
    op.drop_index("ix_embeddings_encoder_id", table_name="embeddings")
    op.drop_index("ix_embeddings_reference_id", table_name="embeddings")
    op.drop_table("embeddings")
    op.drop_index("ix_reference_images_sha256", table_name="reference_images")
    op.drop_index("ix_reference_images_sku_id", table_name="reference_images")
    op.drop_table("reference_images")
    op.drop_table("encoders")
    op.drop_table("skus")
