"""Delivering finished jobs' replies: what is due, in which order, and how it ended.

Replies go out in *lanes*: one per chat (a job without a chat: one per user). Within a lane,
replies go out oldest first, one at a time; lanes are independent, so one chat that cannot be
reached (blocked, rate-limited, down) never holds up another chat's replies.

A reply is pending while its job is done or failed and ``replied_at`` is empty. It ends with
``replied_at`` set and ``reply_outcome`` one of :data:`storage.models.REPLY_OUTCOMES`:
``delivered``, ``undeliverable`` (the platform said it never will, ``reply_error`` says why) or
``gave_up`` (it kept failing; ``reply_error`` holds the last reason). Until then a transient
failure postpones it (``reply_attempts + 1``, ``reply_after``). A reply of two steps records the
first one (``reply_step = "tidy"``: the result is out, only the progress message is left), so a
retry never sends the result twice.
"""

from __future__ import annotations

from collections.abc import Collection
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from storage.models import REPLY_OUTCOMES, Job, utcnow

__all__ = [
    "TIDY",
    "end_reply",
    "lane_of",
    "mark_replied",
    "mark_result_sent",
    "postpone_reply",
    "replies_due",
]

TIDY = "tidy"

# The lane of a job: its chat, else minus its user (chat ids are positive), else 0.
_lane = func.coalesce(Job.chat_id, -Job.user_id, 0)


def lane_of(job: Job) -> int:
    """The lane a job's reply goes out in (as :func:`replies_due` computes it)."""
    if job.chat_id is not None:
        return job.chat_id
    return -job.user_id if job.user_id is not None else 0


def _pending() -> tuple[ColumnElement[bool], ...]:
    return (Job.status.in_(("done", "failed")), Job.replied_at.is_(None))


async def replies_due(
    s: AsyncSession, *, now: datetime | None = None, lane: int | None = None,
    busy: Collection[int] = (), limit: int = 500,
) -> list[Job]:
    """The oldest pending reply of each lane (only ``lane``, when given; none of ``busy``), if it
    is due (no ``reply_after``, or it has passed): oldest first, at most ``limit``.

    A lane whose oldest reply is waiting gives nothing, so replies in a chat stay in order.
    Rows already loaded in the session are refreshed (a job may have finished since)."""
    now = now or utcnow()
    first = (select(Job.id.label("id"), func.row_number().over(
        partition_by=_lane, order_by=(Job.created_at, Job.id)).label("n")).where(*_pending()))
    if lane is not None:
        first = first.where(_lane == lane)
    ranked = first.subquery()
    query = (select(Job).join(ranked, ranked.c.id == Job.id)
             .where(ranked.c.n == 1, or_(Job.reply_after.is_(None), Job.reply_after <= now)))
    if busy:
        query = query.where(_lane.not_in(list(busy)))
    query = query.order_by(Job.created_at, Job.id).limit(limit)
    return list(await s.scalars(query, execution_options={"populate_existing": True}))


async def _set(s: AsyncSession, job_id: str, values: dict[str, Any]) -> bool:
    stmt = update(Job).where(Job.id == job_id, Job.replied_at.is_(None)).values(**values).returning(Job.id)
    return (await s.execute(stmt, execution_options={"synchronize_session": False})).first() is not None


async def mark_result_sent(s: AsyncSession, *, job_id: str) -> bool:
    """The result is out; only the progress message is left to edit (its own attempts)."""
    return await _set(s, job_id, {"reply_step": TIDY, "reply_attempts": 0, "reply_after": None})


async def end_reply(s: AsyncSession, *, job_id: str, outcome: str, reason: str | None = None) -> bool:
    """The bot is done with this job's reply (``outcome``: delivered, undeliverable, gave_up).

    Also for a job still queued or running whose chat is already known to be unreachable: its
    reply is then never attempted. False when the reply had already ended."""
    if outcome not in REPLY_OUTCOMES:
        raise ValueError(f"unknown reply outcome {outcome!r}")
    return await _set(s, job_id, {"replied_at": utcnow(), "reply_outcome": outcome, "reply_error": reason,
                                  "reply_after": None})


async def mark_replied(s: AsyncSession, *, job_id: str) -> bool:
    """Delivered. False when the reply had already ended."""
    return await end_reply(s, job_id=job_id, outcome="delivered")


async def postpone_reply(s: AsyncSession, *, job_id: str, until: datetime, reason: str) -> bool:
    """A transient failure: try again from ``until``; one more attempt counted."""
    return await _set(s, job_id, {"reply_attempts": Job.reply_attempts + 1, "reply_after": until,
                                  "reply_error": reason})
