"""Consent by asking: privacy "ask", held jobs, their consent state, "always allow" grants.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-03

The two CHECK constraints gain a value each (on SQLite a batch rebuild of users and jobs, with
foreign keys off: see storage.db.upgrade).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _check(table: str, name: str, condition: str, *, old: str) -> None:
    """Replace the CHECK constraint named ``old`` by ``ck_<table>_<name>`` (SQLite: a batch rebuild)."""
    with op.batch_alter_table(table, recreate="auto") as batch:
        batch.drop_constraint(op.f(old), type_="check")
        batch.create_check_constraint(op.f(f"ck_{table}_{name}"), condition)


def upgrade() -> None:
    # 0001 named them twice over (ck_users_ck_users_privacy); from here on as the models name them.
    _check("users", "privacy", "privacy IN ('everyone', 'chat', 'ask', 'nobody')",
           old="ck_users_ck_users_privacy")
    op.add_column("jobs", sa.Column("consent", sa.JSON(none_as_null=True), nullable=True))
    _check("jobs", "status", "status IN ('held', 'queued', 'running', 'done', 'failed')",
           old="ck_jobs_ck_jobs_status")
    op.create_table(
        "consent_grants",
        sa.Column("owner_id", sa.Integer(), nullable=False),
        sa.Column("grantee_id", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["owner_id"], ["users.id"], name="fk_consent_grants_owner_id_users",
                                ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["grantee_id"], ["users.id"], name="fk_consent_grants_grantee_id_users",
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("owner_id", "grantee_id", name="pk_consent_grants"),
    )


def downgrade() -> None:
    op.drop_table("consent_grants")
    op.execute("UPDATE jobs SET status = 'failed' WHERE status = 'held'")
    _check("jobs", "status", "status IN ('queued', 'running', 'done', 'failed')", old="ck_jobs_status")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("consent")
    op.execute("UPDATE users SET privacy = 'nobody' WHERE privacy = 'ask'")
    _check("users", "privacy", "privacy IN ('everyone', 'chat', 'nobody')", old="ck_users_privacy")
