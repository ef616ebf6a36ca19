"""Models promoted to a collection besides the one its first templates were made with.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-04 20:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Apply this revision."""
    op.create_table(
        "collection_models",
        sa.Column("collection_id", sa.String(length=64), nullable=False),
        sa.Column("model_id", sa.String(length=128), nullable=False),
        sa.Column("parent_model_id", sa.String(length=128), nullable=False),
        sa.Column("promoted_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("cross_accuracy", sa.Float(), nullable=True),
        sa.Column("parent_accuracy", sa.Float(), nullable=True),
        sa.ForeignKeyConstraint(
            ["collection_id"], ["collections.id"], ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("collection_id", "model_id"),
    )


def downgrade() -> None:
    """Revert this revision."""
    op.drop_table("collection_models")
