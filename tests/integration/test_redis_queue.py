"""The Redis queue backend against a real Redis server and a real database (SQLite and
PostgreSQL): job ids over taskiq's stream broker, claims in the jobs table, events to the bot."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from postgres_db import BACKENDS, fresh_postgres_database
from redis.asyncio import Redis
from servers import empty_redis
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from settings import QueueConfig
from storage import repo
from storage.db import make_db, make_sessionmaker, sqlite_url, upgrade
from storage.queue import JobQueue, open_queue
from storage.redis_queue import JOBS_STREAM, WORKER_GROUP

KINDS = ["invert", "edit", "morph", "mix"]


@pytest.fixture
async def fresh_redis(redis_url: str) -> str:
    return await empty_redis(redis_url)


@pytest.fixture(params=BACKENDS)
async def sessions(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    async with contextlib.AsyncExitStack() as stack:
        if request.param == "postgresql":
            url = await stack.enter_async_context(
                fresh_postgres_database(request.getfixturevalue("postgres_url")))
        else:
            url = sqlite_url(tmp_path / "jobs.db")
        await upgrade(url)
        db = make_db(url)
        stack.push_async_callback(db.dispose)
        yield make_sessionmaker(db)


def _redis(url: str, **keys: int) -> QueueConfig:
    return QueueConfig(backend="redis", redis_url=url, **keys)


async def _jobs(sessions: async_sessionmaker[AsyncSession], n: int, *, kind: str = "invert") -> list[str]:
    async with sessions.begin() as s:
        return [(await repo.create_job(s, kind=kind, model="m", payload={}, user_id=None, chat_id=None,
                                       reply_to={})).id for _ in range(n)]


async def _finish(sessions: async_sessionmaker[AsyncSession], queue: JobQueue, worker: str,
                  job_ids: list[str]) -> None:
    async with sessions.begin() as s:
        for job_id in job_ids:
            assert await repo.finish_job(s, job_id=job_id, worker=worker, result={})
    await queue.settled(job_ids)


async def _take(queue: JobQueue, worker: str, *, limit: int = 4, wait_s: float = 2.0) -> list[str]:
    jobs = await queue.take(worker=worker, kinds=KINDS, limit=limit, lease_s=30, gather_s=0.05,
                            wait_s=wait_s)
    return [j.id for j in jobs]


async def _pending(url: str) -> dict[str, int]:
    """Unacknowledged messages per consumer."""
    client = Redis.from_url(url)
    try:
        info = await client.xpending(JOBS_STREAM, WORKER_GROUP)
    finally:
        await client.aclose()
    return {c["name"].decode(): int(c["pending"]) for c in info["consumers"]}


async def test_a_burst_spreads_over_workers_and_each_job_is_taken_once(
    sessions: async_sessionmaker[AsyncSession], fresh_redis: str
) -> None:
    async with (open_queue(_redis(fresh_redis), sessions=sessions) as bot,
                open_queue(_redis(fresh_redis), sessions=sessions, consumer="w1") as w1,
                open_queue(_redis(fresh_redis), sessions=sessions, consumer="w2") as w2):
        ids = await _jobs(sessions, 8)
        await bot.notify(ids)
        first1, first2 = await asyncio.gather(_take(w1, "w1", limit=2), _take(w2, "w2", limit=2))
        # Each worker took a batch of two while the other still had work to find: the rest of the
        # burst was left in the stream, not read ahead by the first worker.
        assert len(first1) == 2 and len(first2) == 2 and not set(first1) & set(first2)
        await _finish(sessions, w1, "w1", first1)
        await _finish(sessions, w2, "w2", first2)
        taken = first1 + first2
        while len(taken) < 8:
            got1, got2 = await asyncio.gather(_take(w1, "w1"), _take(w2, "w2"))
            assert got1 or got2, "jobs were left behind"
            await _finish(sessions, w1, "w1", got1)
            await _finish(sessions, w2, "w2", got2)
            taken += got1 + got2
        assert sorted(taken) == sorted(ids)  # every job once, none twice
        assert await _pending(fresh_redis) == {}  # every message acknowledged


async def test_duplicates_and_stale_messages_are_dropped_without_running_anything(
    sessions: async_sessionmaker[AsyncSession], fresh_redis: str
) -> None:
    async with (open_queue(_redis(fresh_redis), sessions=sessions) as bot,
                open_queue(_redis(fresh_redis), sessions=sessions, consumer="w1") as w1):
        done, erased, fresh = await _jobs(sessions, 3)
        await bot.notify([done])
        assert await _take(w1, "w1") == [done]
        await _finish(sessions, w1, "w1", [done])
        async with sessions.begin() as s:
            job = await repo.get_job(s, erased)
            assert job is not None
            await s.delete(job)  # /forget erased it
        client = Redis.from_url(fresh_redis)
        await client.xadd(JOBS_STREAM, {b"data": b"not a taskiq message"})
        await client.aclose()
        await bot.notify([done, erased, done, fresh])
        assert await _take(w1, "w1") == [fresh]
        await _finish(sessions, w1, "w1", [fresh])
        assert await _take(w1, "w1", wait_s=0.5) == []
        assert await _pending(fresh_redis) == {}
        async with sessions() as s:
            assert (await repo.get_job(s, done)).attempts == 1  # type: ignore[union-attr]


async def test_messages_a_dead_worker_held_go_to_another_worker(
    sessions: async_sessionmaker[AsyncSession], fresh_redis: str
) -> None:
    async with (open_queue(_redis(fresh_redis), sessions=sessions) as bot,
                open_queue(_redis(fresh_redis, redeliver_after_s=1), sessions=sessions,
                           consumer="w2") as w2):
        ids = await _jobs(sessions, 3)
        async with open_queue(_redis(fresh_redis), sessions=sessions, consumer="w1") as w1:
            await bot.notify(ids)
            running = await _take(w1, "w1", limit=1)  # takes one, and reads one more ahead
            assert len(running) == 1
        # w1 is gone without acknowledging anything: its messages stay pending under its name.
        assert await _pending(fresh_redis) == {"w1": 2}
        await asyncio.sleep(1.1)  # past redeliver_after_s
        taken = []
        for _ in range(5):
            taken += await _take(w2, "w2", wait_s=0.5)
            if len(taken) == 2:
                break
            # An idle worker resends what waits in the table; the stream read that brings the resent
            # message also claims the dead consumer's idle messages.
            await w2.resend_waiting(older_than_s=0)
        assert sorted(taken) == sorted(set(ids) - set(running))
        await _finish(sessions, w2, "w2", taken)
        # The job w1 was running keeps w1's lease: its message was acknowledged and dropped (no
        # second run now); when the lease runs out, requeue_expired hands it on.
        assert await _pending(fresh_redis) == {}
        async with sessions() as s:
            job = await repo.get_job(s, running[0])
            assert job is not None and job.status == "running" and job.lease_owner == "w1"


async def test_workers_wake_the_bot_when_jobs_move(
    sessions: async_sessionmaker[AsyncSession], fresh_redis: str
) -> None:
    async with (open_queue(_redis(fresh_redis), sessions=sessions) as bot,
                open_queue(_redis(fresh_redis), sessions=sessions, consumer="w1") as w1):
        await bot.changed(0.01)  # subscribed
        waiting = asyncio.create_task(bot.changed(30))
        await asyncio.sleep(0.2)
        assert not waiting.done()
        started = time.monotonic()
        await w1.announce(["job-1"])
        await asyncio.wait_for(waiting, 5)
        assert time.monotonic() - started < 5  # woken by the event, not by the 30 s poll
