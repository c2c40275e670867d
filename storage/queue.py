"""The job queue interface, and its local backend (the jobs table itself).

Jobs are always durable rows first (``repo.create_job``). A queue only decides how workers
learn about them and take them: the local backend polls the table; a distributed backend
(taskiq + Redis streams, a later issue) carries job ids to workers on many machines and keeps
the same rows as the source of truth.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

import storage.repo as repo
from storage.models import Job

__all__ = ["JobQueue", "LocalQueue"]


class JobQueue(Protocol):
    async def notify(self, job_id: str) -> None:
        """A job row was committed: let the workers know."""

    async def pending(self) -> int:
        """How many jobs wait to be taken (a hint for micro-batching)."""

    async def claim(self, *, worker: str, kinds: Sequence[str], limit: int, lease_s: float) -> list[Job]:
        """Take up to ``limit`` compatible jobs (one kind and model) under a lease."""


class LocalQueue:
    """One database, any number of workers polling it (SQLite or PostgreSQL)."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self.sessions = sessions

    async def notify(self, job_id: str) -> None:
        return None  # workers poll the table

    async def pending(self) -> int:
        async with self.sessions() as s:
            return await repo.count_queued(s)

    async def claim(self, *, worker: str, kinds: Sequence[str], limit: int, lease_s: float) -> list[Job]:
        async with self.sessions.begin() as s:
            return await repo.claim_jobs(s, worker=worker, kinds=kinds, limit=limit, lease_s=lease_s)
