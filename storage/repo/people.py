"""Users, chats, chat membership and privacy."""

from __future__ import annotations

from sqlalchemy import exists, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from storage.models import CHAT_KINDS, PRIVACY_POLICIES, Chat, ChatMember, User, utcnow
from storage.repo._util import insert_ignore

__all__ = [
    "add_member",
    "find_user",
    "find_user_by_username",
    "get_or_create_chat",
    "get_or_create_user",
    "get_user",
    "is_member",
    "set_privacy",
    "usernames",
]


def _clean_username(username: str | None) -> str | None:
    cleaned = (username or "").strip().lstrip("@").strip()
    return cleaned or None


def _username_key(username: str | None) -> str | None:
    cleaned = _clean_username(username)
    return cleaned.casefold() if cleaned else None


async def find_user(s: AsyncSession, *, platform: str, platform_user_id: str) -> User | None:
    return await s.scalar(
        select(User).where(User.platform == platform, User.platform_user_id == str(platform_user_id)))


async def get_user(s: AsyncSession, user_id: int) -> User | None:
    return await s.get(User, user_id)


async def get_or_create_user(
    s: AsyncSession, *, platform: str, platform_user_id: str, username: str | None = None,
    display_name: str | None = None,
) -> User:
    """The user with this platform id, created on first sight.

    A username or display name that differs from the stored one replaces it; None means "not
    known here" and keeps the stored value. A username moves: another user of the platform who
    still holds it (renamed since) loses it, so ``find_user_by_username`` is unambiguous.
    """
    platform_user_id = str(platform_user_id)
    user = await find_user(s, platform=platform, platform_user_id=platform_user_id)
    if user is None:
        await insert_ignore(s, User, {"platform": platform, "platform_user_id": platform_user_id,
                                      "privacy": "chat", "created_at": utcnow()},
                            ["platform", "platform_user_id"])
        user = await find_user(s, platform=platform, platform_user_id=platform_user_id)
        if user is None:  # pragma: no cover - the row was just inserted (or by someone else)
            raise RuntimeError("user row vanished right after it was created")
    name = _clean_username(username)
    if name is not None and name != user.username:
        key = _username_key(name)
        await s.execute(
            update(User).where(User.platform == platform, User.username_key == key, User.id != user.id)
            .values(username=None, username_key=None)
            .execution_options(synchronize_session="fetch"))
        user.username, user.username_key = name, key
    if display_name is not None and display_name != user.display_name:
        user.display_name = display_name
    await s.flush()
    return user


async def find_user_by_username(s: AsyncSession, *, platform: str, username: str) -> User | None:
    """Case-insensitive; a leading "@" is ignored."""
    key = _username_key(username)
    if key is None:
        return None
    return await s.scalar(
        select(User).where(User.platform == platform, User.username_key == key)
        .order_by(User.id.desc()).limit(1))


async def usernames(s: AsyncSession, *, platform: str) -> list[str]:
    """The usernames people have on ``platform``."""
    query = select(User.username).where(User.platform == platform, User.username.is_not(None))
    return [name for name in await s.scalars(query) if name]


async def set_privacy(s: AsyncSession, *, user_id: int, policy: str) -> None:
    """``policy``: everyone | chat | nobody. ValueError for anything else, LookupError for no user."""
    if policy not in PRIVACY_POLICIES:
        raise ValueError(f"unknown privacy policy {policy!r}; one of {', '.join(PRIVACY_POLICIES)}")
    user = await s.get(User, user_id)
    if user is None:
        raise LookupError(f"no user {user_id}")
    user.privacy = policy
    await s.flush()


async def get_or_create_chat(
    s: AsyncSession, *, platform: str, platform_chat_id: str, kind: str, title: str | None = None,
) -> Chat:
    """The chat with this platform id, created on first sight; kind and title follow the platform."""
    if kind not in CHAT_KINDS:
        raise ValueError(f"unknown chat kind {kind!r}; one of {', '.join(CHAT_KINDS)}")
    platform_chat_id = str(platform_chat_id)
    query = select(Chat).where(Chat.platform == platform, Chat.platform_chat_id == platform_chat_id)
    chat = await s.scalar(query)
    if chat is None:
        await insert_ignore(s, Chat, {"platform": platform, "platform_chat_id": platform_chat_id,
                                      "kind": kind, "title": title, "created_at": utcnow()},
                            ["platform", "platform_chat_id"])
        chat = await s.scalar(query)
        if chat is None:  # pragma: no cover
            raise RuntimeError("chat row vanished right after it was created")
    if chat.kind != kind:
        chat.kind = kind
    if title is not None and title != chat.title:
        chat.title = title
    await s.flush()
    return chat


async def add_member(s: AsyncSession, *, chat_id: int, user_id: int) -> None:
    """Record that the user was seen in the chat (idempotent; refreshes ``seen_at``)."""
    member = await s.get(ChatMember, (chat_id, user_id))
    if member is None:
        await insert_ignore(s, ChatMember, {"chat_id": chat_id, "user_id": user_id, "seen_at": utcnow()},
                            ["chat_id", "user_id"])
    else:
        member.seen_at = utcnow()
        await s.flush()


async def is_member(s: AsyncSession, *, chat_id: int, user_id: int) -> bool:
    query = exists().where(ChatMember.chat_id == chat_id, ChatMember.user_id == user_id)
    return bool(await s.scalar(select(query)))
