"""Reply delivery state on jobs: outcome, reason, step, attempts, next try.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01

Jobs replied to before this revision count as delivered. Plain ADD COLUMNs (no table rebuild on
SQLite).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_COLUMNS = ("reply_outcome", "reply_error", "reply_step", "reply_attempts", "reply_after")


def upgrade() -> None:
    op.add_column("jobs", sa.Column("reply_outcome", sa.String(16), nullable=True))
    op.add_column("jobs", sa.Column("reply_error", sa.Text(), nullable=True))
    op.add_column("jobs", sa.Column("reply_step", sa.String(16), nullable=True))
    op.add_column("jobs", sa.Column("reply_attempts", sa.Integer(), nullable=False, server_default="0"))
    op.add_column("jobs", sa.Column("reply_after", sa.DateTime(timezone=True), nullable=True))
    op.execute("UPDATE jobs SET reply_outcome = 'delivered' WHERE replied_at IS NOT NULL")


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        for column in reversed(_COLUMNS):
            batch.drop_column(column)
