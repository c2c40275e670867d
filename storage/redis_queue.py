"""The scale-out queue backend: job ids travel to engine workers on many machines over taskiq's
Redis stream broker; progress and completion events come back over Redis pub/sub.

The jobs table stays the source of truth: a message says only "job X may be ready". A worker
reads messages through a consumer group (``taskiq_redis.RedisStreamBroker``), claims the
delivered jobs in the database exactly as the local backend does (one conditional UPDATE, so a
job is taken by one worker however many messages name it), runs them, stores the results, and
only then acknowledges the messages. What can go wrong, and what puts it right:

- A worker dies holding messages: they stay pending in its consumer's list, and any worker
  that reads from the stream takes them over once they have been idle ``redeliver_after_s``
  (the broker's XAUTOCLAIM). The jobs it was running keep its lease in the database until it
  runs out; then ``requeue_expired`` puts them back in the queue.
- A message is lost (Redis restarted without persistence; a send failed after the row was
  committed), or a job came back to the queue: an idle worker resends the jobs that have been
  queued longer than a few seconds (``resend_waiting``).
- A message names a job that is done, failed, erased or running under a live lease elsewhere:
  acknowledged and dropped. So duplicates cost one database read, never a second run.

A worker reads only as many messages as it is about to run (the broker reads one message per
call, and only while the worker is waiting for work), so a burst spreads over the workers
instead of piling up behind the first one. Photos and results never travel through Redis: the
media store is a directory every worker reaches.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import time
from collections.abc import AsyncGenerator, Sequence
from datetime import timedelta

from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.exceptions import RedisError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from taskiq import AckableMessage
from taskiq.kicker import AsyncKicker
from taskiq_redis import RedisStreamBroker

import storage.repo as repo
from storage.models import Job, utcnow

__all__ = ["EVENTS_CHANNEL", "JOBS_STREAM", "TASK_NAME", "WORKER_GROUP", "RedisQueue"]

log = logging.getLogger("stylebot.queue")

JOBS_STREAM = "stylebot:jobs"
WORKER_GROUP = "stylebot-engines"
EVENTS_CHANNEL = "stylebot:events"
TASK_NAME = "stylebot.run_job"  # the message: TASK_NAME(job_id)
_STREAM_MAXLEN = 100_000  # old, acknowledged entries are trimmed (approximately) beyond this
_RETRY_S, _RETRY_MAX_S = 0.5, 30.0  # pauses between attempts to reach Redis again


class RedisQueue:
    """Job ids over a Redis stream (taskiq), events over pub/sub, claims in the database."""

    def __init__(
        self, sessions: async_sessionmaker[AsyncSession], *, url: str, consumer: str | None = None,
        redeliver_after_s: float, poll_s: float = 2.0,
    ) -> None:
        self.sessions, self.poll_s = sessions, poll_s
        self._broker = RedisStreamBroker(
            url, queue_name=JOBS_STREAM, consumer_group_name=WORKER_GROUP, consumer_name=consumer,
            consumer_id="0",  # a group created after the first jobs were sent still gets them
            xread_block=1000, xread_count=1, maxlen=_STREAM_MAXLEN,
            idle_timeout=int(redeliver_after_s * 1000), unacknowledged_batch_size=16,
            unacknowledged_lock_timeout=5.0)
        self._kicker: AsyncKicker[[str], None] = AsyncKicker(TASK_NAME, broker=self._broker, labels={})
        self._redis: Redis = Redis.from_url(url)
        self._pubsub: PubSub | None = None
        # worker side: messages read but not yet acknowledged, by job id
        self._inbox: asyncio.Queue[tuple[str, AckableMessage]] = asyncio.Queue()
        self._held: dict[str, list[AckableMessage]] = {}  # delivered, not claimed yet
        self._taken: dict[str, list[AckableMessage]] = {}  # claimed by this worker, running
        self._hungry = asyncio.Event()
        self._listener: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._broker.startup()  # creates the stream and the consumer group if missing

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
        if self._pubsub is not None:
            with contextlib.suppress(RedisError, OSError):
                await self._pubsub.aclose()
        await self._broker.shutdown()
        await self._redis.aclose()

    # --- bot and worker: sending --------------------------------------------------------------

    async def notify(self, job_ids: Sequence[str]) -> None:
        for job_id in job_ids:
            await self._kicker.kiq(job_id)

    async def announce(self, job_ids: Sequence[str]) -> None:
        if not job_ids:
            return
        try:
            await self._redis.publish(EVENTS_CHANNEL, json.dumps({"jobs": list(job_ids)}))
        except (RedisError, OSError) as exc:  # the bot polls the table anyway, only later
            log.warning("could not publish a job event: %s", exc)

    # --- bot: events ----------------------------------------------------------------------------

    async def changed(self, timeout_s: float) -> None:
        try:
            if self._pubsub is None:
                self._pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
                await self._pubsub.subscribe(EVENTS_CHANNEL)
            if await self._pubsub.get_message(timeout=timeout_s) is not None:
                while await self._pubsub.get_message(timeout=0) is not None:
                    pass  # one wake-up for a burst of events
        except (RedisError, OSError) as exc:
            log.warning("job events unavailable (%s); polling the database", exc)
            self._pubsub = None
            await asyncio.sleep(timeout_s)

    # --- worker: taking jobs ------------------------------------------------------------------

    async def take(
        self, *, worker: str, kinds: Sequence[str], limit: int, lease_s: float, gather_s: float,
        wait_s: float,
    ) -> list[Job]:
        if self._listener is None or self._listener.done():
            self._listener = asyncio.create_task(self._listen())
        self._hungry.set()
        try:
            if not self._held and not await self._receive(wait_s):
                return []
            end = time.monotonic() + gather_s
            while len(self._held) < limit and await self._receive(end - time.monotonic()):
                pass
        finally:
            self._hungry.clear()
        delivered = list(self._held)
        async with self.sessions.begin() as s:
            jobs = await repo.claim_jobs(s, worker=worker, kinds=kinds, limit=limit, lease_s=lease_s,
                                         among=delivered)
            still_queued = set(await repo.queued_job_ids(s, among=delivered))
        for job in jobs:
            self._taken[job.id] = self._held.pop(job.id)
        for job_id in [j for j in self._held if j not in still_queued]:
            await self._ack(self._held.pop(job_id))  # done, erased, or someone else's now
        return jobs

    async def settled(self, job_ids: Sequence[str]) -> None:
        for job_id in job_ids:
            await self._ack(self._taken.pop(job_id, []))

    async def resend_waiting(self, *, older_than_s: float) -> int:
        async with self.sessions() as s:
            ids = await repo.queued_job_ids(s, created_before=utcnow() - timedelta(seconds=older_than_s),
                                            limit=100)
        ids = [i for i in ids if i not in self._held]
        await self.notify(ids)
        return len(ids)

    async def _receive(self, timeout_s: float) -> bool:
        """One message into ``_held`` within ``timeout_s``; False if none came."""
        try:
            if timeout_s <= 0:  # only what the listener has already read
                job_id, message = self._inbox.get_nowait()
            else:
                job_id, message = await asyncio.wait_for(self._inbox.get(), timeout_s)
        except (TimeoutError, asyncio.QueueEmpty):
            return False
        self._held.setdefault(job_id, []).append(message)
        return True

    async def _listen(self) -> None:
        """Read messages from the stream while the worker is hungry (the broker reads one per
        call), parse them into the inbox; malformed ones are acknowledged and dropped. When Redis
        goes away: one warning, retries with a growing pause (up to ``_RETRY_MAX_S``), one line
        when it is back."""
        pause = 0.0
        while True:
            messages: AsyncGenerator[AckableMessage, None] = self._broker.listen()
            try:
                while True:
                    await self._hungry.wait()
                    message = await anext(messages)
                    if pause:
                        log.warning("job stream is back")
                        pause = 0.0
                    job_id = self._job_id(message)
                    if job_id is None:
                        await self._ack([message])
                    else:
                        self._inbox.put_nowait((job_id, message))
            except (RedisError, OSError) as exc:
                if not pause:
                    log.warning("lost the job stream (%s); retrying", exc)
                pause = min(max(pause * 2, _RETRY_S), _RETRY_MAX_S)
                await asyncio.sleep(pause)
            finally:
                await messages.aclose()

    def _job_id(self, message: AckableMessage) -> str | None:
        try:
            parsed = self._broker.formatter.loads(message.data)
        except ValueError:
            log.warning("dropped a malformed message on the job stream")
            return None
        if parsed.task_name != TASK_NAME or len(parsed.args) != 1 or not isinstance(parsed.args[0], str):
            log.warning("dropped a message for an unknown task on the job stream")
            return None
        return parsed.args[0]

    async def _ack(self, messages: Sequence[AckableMessage]) -> None:
        for message in messages:
            try:
                acked = message.ack()
                if inspect.isawaitable(acked):  # RedisStreamBroker's ack is a coroutine
                    await acked
            except (RedisError, OSError) as exc:  # redelivered later, then dropped as settled
                log.warning("could not acknowledge a job message: %s", exc)
