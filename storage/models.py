"""The tables, as typed SQLAlchemy 2 declarative models.

Portable types only (String, Integer, Float, JSON, LargeBinary, DateTime(timezone=True)) so the
same models run on SQLite and PostgreSQL. Timestamps are timezone-aware UTC on the way in and
out (SQLite stores them naive, in UTC). Deletes cascade in the database (``ON DELETE``), not in
the ORM: there are no relationships, so nothing lazy-loads behind an ``await``.

Every schema change goes through a new alembic revision in ``storage/migrations/versions``;
a test compares these models with the migrated database.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    CheckConstraint,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from storage.specs import JobSpec, spec_of

__all__ = [
    "CHAT_KINDS",
    "JOB_STATUSES",
    "PRIVACY_POLICIES",
    "REPLY_OUTCOMES",
    "Base",
    "Chat",
    "ChatMember",
    "ConsentGrant",
    "Face",
    "FaceShare",
    "Job",
    "UTCDateTime",
    "User",
    "utcnow",
]

PRIVACY_POLICIES = ("everyone", "chat", "ask", "nobody")
CHAT_KINDS = ("private", "group")
JOB_STATUSES = ("held", "queued", "running", "done", "failed")  # held: waiting for consent
REPLY_OUTCOMES = ("delivered", "undeliverable", "gave_up")

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class UTCDateTime(TypeDecorator[datetime]):
    """DateTime(timezone=True) that only accepts aware datetimes and always returns UTC."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the database; use an aware UTC datetime")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSON()}


class User(Base):
    __tablename__ = "users"
    __table_args__ = (
        UniqueConstraint("platform", "platform_user_id"),
        CheckConstraint(_in("privacy", PRIVACY_POLICIES), name="privacy"),
        Index(None, "platform", "username_key"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    platform: Mapped[str] = mapped_column(String(32))
    platform_user_id: Mapped[str] = mapped_column(String(64))
    username: Mapped[str | None] = mapped_column(String(128))
    # casefolded username without a leading "@": what find_user_by_username matches
    username_key: Mapped[str | None] = mapped_column(String(128))
    display_name: Mapped[str | None] = mapped_column(String(256))
    privacy: Mapped[str] = mapped_column(String(16), default="chat")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Chat(Base):
    __tablename__ = "chats"
    __table_args__ = (
        UniqueConstraint("platform", "platform_chat_id"),
        CheckConstraint(_in("kind", CHAT_KINDS), name="kind"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    platform: Mapped[str] = mapped_column(String(32))
    platform_chat_id: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(16))
    title: Mapped[str | None] = mapped_column(String(256))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ChatMember(Base):
    __tablename__ = "chat_members"
    __table_args__ = (Index(None, "user_id"),)

    chat_id: Mapped[int] = mapped_column(ForeignKey("chats.id", ondelete="CASCADE"), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), primary_key=True)
    seen_at: Mapped[datetime] = mapped_column(default=utcnow)


class Face(Base):
    __tablename__ = "faces"
    __table_args__ = (UniqueConstraint("user_id", "label"), UniqueConstraint("job_id"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    label: Mapped[str] = mapped_column(String(64), default="default")
    model_id: Mapped[str] = mapped_column(String(128))
    latent: Mapped[bytes] = mapped_column(LargeBinary)  # [num_ws, w_dim] little-endian float32, C order
    num_ws: Mapped[int] = mapped_column(Integer)
    w_dim: Mapped[int] = mapped_column(Integer)
    aligned_key: Mapped[str] = mapped_column(String(128))
    photo_key: Mapped[str] = mapped_column(String(128))
    reconstruction_key: Mapped[str] = mapped_column(String(128))
    alignment: Mapped[dict[str, Any]] = mapped_column()
    quality: Mapped[dict[str, Any]] = mapped_column()
    job_id: Mapped[str | None] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class FaceShare(Base):
    __tablename__ = "face_shares"
    __table_args__ = (Index(None, "chat_id"),)

    face_id: Mapped[int] = mapped_column(ForeignKey("faces.id", ondelete="CASCADE"), primary_key=True)
    chat_id: Mapped[int] = mapped_column(ForeignKey("chats.id", ondelete="CASCADE"), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ConsentGrant(Base):
    """"Always allow this person": ``grantee`` may use ``owner``'s faces without asking."""

    __tablename__ = "consent_grants"

    owner_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), primary_key=True)
    grantee_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        CheckConstraint(_in("status", JOB_STATUSES), name="status"),
        Index(None, "status", "created_at"),
        Index(None, "user_id"),
        Index(None, "chat_id"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)  # uuid4 hex
    kind: Mapped[str] = mapped_column(String(32))
    model: Mapped[str] = mapped_column(String(128))
    payload: Mapped[dict[str, Any]] = mapped_column()
    status: Mapped[str] = mapped_column(String(16), default="queued")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    timeout_s: Mapped[float] = mapped_column(Float)
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    progress_info: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True))
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True))
    error: Mapped[str | None] = mapped_column(Text)
    error_code: Mapped[str | None] = mapped_column(String(64))
    reply_to: Mapped[dict[str, Any]] = mapped_column()  # opaque to storage: where the adapter replies
    # People asked for their consent (privacy "ask"): {"waiting": [user ids], "allowed": [user ids]}
    consent: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True))
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    chat_id: Mapped[int | None] = mapped_column(ForeignKey("chats.id", ondelete="SET NULL"))
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    lease_until: Mapped[datetime | None] = mapped_column()
    batch_id: Mapped[str | None] = mapped_column(String(32))  # jobs claimed (and run) together
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column()
    finished_at: Mapped[datetime | None] = mapped_column()
    # Delivering the reply (storage.repo.delivery): set once the bot is done with it, whatever the outcome.
    replied_at: Mapped[datetime | None] = mapped_column()
    reply_outcome: Mapped[str | None] = mapped_column(String(16))
    reply_error: Mapped[str | None] = mapped_column(Text)  # why it was not (fully) delivered
    # "tidy": the result is out; the progress message beside it is still to be edited
    reply_step: Mapped[str | None] = mapped_column(String(16))
    reply_attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    reply_after: Mapped[datetime | None] = mapped_column()  # not before (a platform asked to wait)

    @property
    def spec(self) -> JobSpec:
        """The payload as its kind's typed spec (:mod:`storage.specs`)."""
        return spec_of(self.kind, self.payload)
