"""Initial schema: users, chats, chat_members, faces, face_shares, jobs.

Revision ID: 0001
Revises:
Create Date: 2026-11-25

Hand-cleaned from autogenerate. Types are spelled out here (not imported from storage.models)
so this revision stays what it was when the models change.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _utc() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "users",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("platform", sa.String(32), nullable=False),
        sa.Column("platform_user_id", sa.String(64), nullable=False),
        sa.Column("username", sa.String(128), nullable=True),
        sa.Column("username_key", sa.String(128), nullable=True),
        sa.Column("display_name", sa.String(256), nullable=True),
        sa.Column("privacy", sa.String(16), nullable=False),
        sa.Column("created_at", _utc(), nullable=False),
        sa.CheckConstraint("privacy IN ('everyone', 'chat', 'nobody')", name="ck_users_privacy"),
        sa.PrimaryKeyConstraint("id", name="pk_users"),
        sa.UniqueConstraint("platform", "platform_user_id", name="uq_users_platform_platform_user_id"),
    )
    op.create_index("ix_users_platform_username_key", "users", ["platform", "username_key"])

    op.create_table(
        "chats",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("platform", sa.String(32), nullable=False),
        sa.Column("platform_chat_id", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("title", sa.String(256), nullable=True),
        sa.Column("created_at", _utc(), nullable=False),
        sa.CheckConstraint("kind IN ('private', 'group')", name="ck_chats_kind"),
        sa.PrimaryKeyConstraint("id", name="pk_chats"),
        sa.UniqueConstraint("platform", "platform_chat_id", name="uq_chats_platform_platform_chat_id"),
    )

    op.create_table(
        "chat_members",
        sa.Column("chat_id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("seen_at", _utc(), nullable=False),
        sa.ForeignKeyConstraint(["chat_id"], ["chats.id"], name="fk_chat_members_chat_id_chats",
                                ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], name="fk_chat_members_user_id_users",
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("chat_id", "user_id", name="pk_chat_members"),
    )
    op.create_index("ix_chat_members_user_id", "chat_members", ["user_id"])

    op.create_table(
        "faces",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("label", sa.String(64), nullable=False),
        sa.Column("model_id", sa.String(128), nullable=False),
        sa.Column("latent", sa.LargeBinary(), nullable=False),
        sa.Column("num_ws", sa.Integer(), nullable=False),
        sa.Column("w_dim", sa.Integer(), nullable=False),
        sa.Column("aligned_key", sa.String(128), nullable=False),
        sa.Column("photo_key", sa.String(128), nullable=False),
        sa.Column("reconstruction_key", sa.String(128), nullable=False),
        sa.Column("alignment", sa.JSON(), nullable=False),
        sa.Column("quality", sa.JSON(), nullable=False),
        sa.Column("job_id", sa.String(32), nullable=True),
        sa.Column("created_at", _utc(), nullable=False),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], name="fk_faces_user_id_users", ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name="pk_faces"),
        sa.UniqueConstraint("job_id", name="uq_faces_job_id"),
        sa.UniqueConstraint("user_id", "label", name="uq_faces_user_id_label"),
    )

    op.create_table(
        "face_shares",
        sa.Column("face_id", sa.Integer(), nullable=False),
        sa.Column("chat_id", sa.Integer(), nullable=False),
        sa.Column("created_at", _utc(), nullable=False),
        sa.ForeignKeyConstraint(["face_id"], ["faces.id"], name="fk_face_shares_face_id_faces",
                                ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["chat_id"], ["chats.id"], name="fk_face_shares_chat_id_chats",
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("face_id", "chat_id", name="pk_face_shares"),
    )
    op.create_index("ix_face_shares_chat_id", "face_shares", ["chat_id"])

    op.create_table(
        "jobs",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("model", sa.String(128), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("max_attempts", sa.Integer(), nullable=False),
        sa.Column("timeout_s", sa.Float(), nullable=False),
        sa.Column("progress", sa.Float(), nullable=False),
        sa.Column("progress_info", sa.JSON(), nullable=True),
        sa.Column("result", sa.JSON(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("error_code", sa.String(64), nullable=True),
        sa.Column("reply_to", sa.JSON(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=True),
        sa.Column("chat_id", sa.Integer(), nullable=True),
        sa.Column("lease_owner", sa.String(128), nullable=True),
        sa.Column("lease_until", _utc(), nullable=True),
        sa.Column("batch_id", sa.String(32), nullable=True),
        sa.Column("created_at", _utc(), nullable=False),
        sa.Column("started_at", _utc(), nullable=True),
        sa.Column("finished_at", _utc(), nullable=True),
        sa.Column("replied_at", _utc(), nullable=True),
        sa.CheckConstraint("status IN ('queued', 'running', 'done', 'failed')", name="ck_jobs_status"),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], name="fk_jobs_user_id_users", ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["chat_id"], ["chats.id"], name="fk_jobs_chat_id_chats", ondelete="SET NULL"),
        sa.PrimaryKeyConstraint("id", name="pk_jobs"),
    )
    op.create_index("ix_jobs_status_created_at", "jobs", ["status", "created_at"])
    op.create_index("ix_jobs_user_id", "jobs", ["user_id"])
    op.create_index("ix_jobs_chat_id", "jobs", ["chat_id"])


def downgrade() -> None:
    for table in ("jobs", "face_shares", "faces", "chat_members", "chats", "users"):
        op.drop_table(table)  # their indexes go with them
