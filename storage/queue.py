"""The job queue interface, its local backend (the jobs table itself), and the factory.

Jobs are always durable rows first (``repo.create_job``). A queue only decides how workers
learn about them and take them, and how the bot learns that they moved: the local backend polls
the table; the Redis backend (:mod:`storage.redis_queue`, taskiq + Redis streams) carries job
ids to workers on many machines and progress events back to the bot, with the same rows as the
source of truth.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Protocol

from sqlalchemy import make_url
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

import storage.repo as repo
from settings import QueueConfig
from storage.models import Job

__all__ = ["JobQueue", "LocalQueue", "QueueUnavailable", "open_queue"]


class QueueUnavailable(Exception):
    """The queue's server cannot be reached (one line for the user in ``message``)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class JobQueue(Protocol):
    #: how often the bot re-reads the jobs table when no event arrives (seconds)
    poll_s: float

    async def notify(self, job_ids: Sequence[str]) -> None:
        """Job rows were committed (new, or back in the queue): let the workers know."""

    async def take(
        self, *, worker: str, kinds: Sequence[str], limit: int, lease_s: float, gather_s: float,
        wait_s: float,
    ) -> list[Job]:
        """Claim up to ``limit`` compatible jobs (one kind and model) under a lease: wait up to
        ``wait_s`` for a first job, then ``gather_s`` for more to batch with it. [] if none."""

    async def settled(self, job_ids: Sequence[str]) -> None:
        """The outcomes of these taken jobs are stored (or were dropped): forget them."""

    async def resend_waiting(self, *, older_than_s: float) -> int:
        """An idle worker: notify again the jobs queued longer than ``older_than_s`` (their
        message was lost, or they came back to the queue). Returns how many."""

    async def announce(self, job_ids: Sequence[str]) -> None:
        """A worker stored progress or an outcome of these jobs: wake the bot processes."""

    async def changed(self, timeout_s: float) -> None:
        """Wait until a worker announces something, or ``timeout_s`` passes."""


class LocalQueue:
    """One database, any number of workers polling it (SQLite or PostgreSQL)."""

    poll_s = 0.2

    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self.sessions = sessions

    async def notify(self, job_ids: Sequence[str]) -> None:
        return None  # workers poll the table

    async def take(
        self, *, worker: str, kinds: Sequence[str], limit: int, lease_s: float, gather_s: float,
        wait_s: float,
    ) -> list[Job]:
        async with self.sessions() as s:
            waiting = await repo.count_queued(s)
        if not waiting:
            await asyncio.sleep(wait_s)
            return []
        if waiting < limit and gather_s > 0:
            await asyncio.sleep(gather_s)  # let a burst gather
        async with self.sessions.begin() as s:
            return await repo.claim_jobs(s, worker=worker, kinds=kinds, limit=limit, lease_s=lease_s)

    async def settled(self, job_ids: Sequence[str]) -> None:
        return None

    async def resend_waiting(self, *, older_than_s: float) -> int:
        return 0  # nothing to resend: the table is the queue

    async def announce(self, job_ids: Sequence[str]) -> None:
        return None  # the bot polls the table

    async def changed(self, timeout_s: float) -> None:
        await asyncio.sleep(timeout_s)


@contextlib.asynccontextmanager
async def open_queue(
    config: QueueConfig, *, sessions: async_sessionmaker[AsyncSession], consumer: str | None = None,
) -> AsyncIterator[JobQueue]:
    """The ``[queue]`` backend, connected for the duration of the block; ``consumer``: a worker's id."""
    if config.backend == "local":
        yield LocalQueue(sessions)
        return
    from redis.exceptions import RedisError

    from storage.redis_queue import RedisQueue  # imports taskiq and redis only when used

    redis_url = config.redis_url
    queue = RedisQueue(sessions, url=redis_url, consumer=consumer,
                       redeliver_after_s=config.redeliver_after_s)
    try:
        await queue.start()
    except (RedisError, OSError) as exc:
        await queue.close()
        shown = make_url(redis_url).render_as_string(hide_password=True)
        raise QueueUnavailable(f"cannot reach Redis at {shown}: {exc}") from None
    try:
        yield queue
    finally:
        await queue.close()
