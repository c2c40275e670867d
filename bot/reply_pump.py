"""The reply pump: finished jobs' results out to their chats, progress edits while jobs run.

Each chat is a *lane* (:func:`storage.repo.lane_of`) served by its own task, at most one at a
time: a chat's replies go out in order, and a chat the platform is slow with, rate-limits or
refuses holds up nobody else. What the platform answered decides what happens next
(:mod:`bot.delivery`): ``Undeliverable`` ends the reply for good with one log line;
``TryLater`` postpones it in the database (``reply_after``), doubling the wait up to the
configured cap and never shorter than the platform asked, and gives up after the configured
number of tries.

A final reply may take two steps: the result, then (when the result went out as a new message
beside the progress message, as on Telegram) an edit of the progress message into "Done.". The
first step is recorded before the second is tried, so the result is never sent twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

import storage.repo as repo
from bot import replies
from bot.buttons import buttons_for
from bot.commands import Reply
from bot.delivery import RetryPolicy, TryLater, Undeliverable
from storage.media import MediaStore
from storage.models import Job, utcnow
from storage.queue import JobQueue

__all__ = ["Deliver", "ReplyPump"]

log = logging.getLogger("stylebot.replies")

# Sends (or edits) a message; returns a reference the adapter can later edit, or None.
Deliver = Callable[[Reply], Awaitable[dict[str, Any] | None]]

# A chat's progress messages are edited at most this often (each job's in a private chat, one
# job's at a time in a group): Telegram lets a bot send one group about 20 messages a minute.
PROGRESS_EVERY_S = 3.0
_PROGRESS_EVERY_S = {"web": 1.0}  # our own web chat has no edit limits: its progress moves faster
_INLINE_TRIES = 3  # a command's direct answer is tried this often while the user waits
_INLINE_WAIT_S = 30.0  # ... and not when the platform asks for a longer pause


class ReplyPump:
    def __init__(self, *, sessions: async_sessionmaker[AsyncSession], queue: JobQueue, media: MediaStore,
                 deliver: Deliver, policy: RetryPolicy, clock: Callable[[], float] = time.monotonic) -> None:
        self.sessions, self.queue, self.media = sessions, queue, media
        self.deliver, self.policy, self.clock = deliver, policy, clock
        self._lanes: dict[int, asyncio.Task[int]] = {}
        self._shown_progress: dict[str, float] = {}
        self._edited_at: dict[int | str, float] = {}  # a lane's (or job's) last progress edit
        self._quiet_until: dict[int, float] = {}  # lanes a platform asked to slow down: no progress edits
        self._noting: set[str] = set()  # jobs whose "queued" note is being sent: their reply waits
        self._noted = asyncio.Event()  # a note went out: its job's reply may be due now

    # --- a command's direct answer -----------------------------------------------------------------

    async def send_now(self, reply: Reply) -> dict[str, Any] | None:
        """Send while the user waits, trying again shortly after a ``TryLater``.

        Raises :class:`Undeliverable`, or the last :class:`TryLater` when it keeps failing."""
        failures = 0
        while True:
            try:
                return await self.deliver(reply)
            except TryLater as exc:
                failures += 1
                wait = self.policy.wait_s(failures, exc.retry_after)
                if failures >= _INLINE_TRIES or wait > _INLINE_WAIT_S:
                    raise
                await asyncio.sleep(wait)

    @contextlib.asynccontextmanager
    async def noting(self, job_id: str) -> AsyncIterator[None]:
        """While the job's "queued" note is sent (and its message remembered), its reply waits: a
        job faster than the note would otherwise come out beside it rather than in its place,
        leaving the note saying "in the queue" and a result without its buttons."""
        self._noting.add(job_id)
        try:
            yield
        finally:
            self._noting.discard(job_id)
            self._noted.set()

    async def not_deliverable(self, job_id: str, reason: str) -> None:
        """The job's chat cannot be reached: end its reply now (no progress, no result later)."""
        async with self.sessions.begin() as s:
            ended = await repo.end_reply(s, job_id=job_id, outcome="undeliverable", reason=reason)
        if ended:
            log.warning("job %s: reply not deliverable: %s", job_id, reason)
        self._shown_progress.pop(job_id, None)

    # --- the loop ------------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Start lanes as replies fall due (after each event a worker announces, a lane finishing,
        or every ``queue.poll_s``) until ``stop``; then wait for the lanes' replies in flight."""
        stopping = asyncio.create_task(stop.wait())
        try:
            while not stop.is_set():
                try:
                    await self.dispatch(stop)
                except Exception:
                    log.exception("reply pump failed; retrying")
                event = asyncio.create_task(self.queue.changed(self.queue.poll_s))
                noted = asyncio.create_task(self._noted.wait())
                await asyncio.wait([stopping, event, noted, *self._lanes.values()],
                                   return_when=asyncio.FIRST_COMPLETED)
                event.cancel()
                noted.cancel()
                self._noted.clear()
        finally:
            stopping.cancel()
            await asyncio.gather(*self._lanes.values(), return_exceptions=True)

    async def pump_once(self, *, stop: asyncio.Event | None = None) -> int:
        """Start every lane that has work and wait for them; returns the replies delivered."""
        await self.dispatch(stop)
        return sum(await asyncio.gather(*self._lanes.values()))

    async def dispatch(self, stop: asyncio.Event | None) -> None:
        """A task for each lane with a reply due or a progress edit to show, unless it has one."""
        busy = set(self._lanes)  # what these lanes read may be outdated by what they send now
        async with self.sessions() as s:
            running = await repo.jobs_in_progress(s)
            due = [j for j in await repo.replies_due(s, busy=busy) if j.id not in self._noting]
        now = self.clock()
        progress: defaultdict[int, list[Job]] = defaultdict(list)
        for job in running:
            lane = repo.lane_of(job)
            if lane in busy or self._quiet_until.get(lane, 0.0) > now:
                continue
            every = _PROGRESS_EVERY_S.get(str((job.reply_to or {}).get("platform")), PROGRESS_EVERY_S)
            waited = now - self._edited_at.get(lane, -every) >= every
            if _first_look_due(job) or (waited and self._moved(job)):
                progress[lane].append(job)
        for jobs in progress.values():
            if (jobs[0].reply_to or {}).get("group"):  # the job shown longest ago, and first looks
                edit = min((j for j in jobs if not _first_look_due(j)), default=None,
                           key=lambda j: self._edited_at.get(j.id, -1.0))
                jobs[:] = [j for j in jobs if j is edit or _first_look_due(j)]
        for lane in {repo.lane_of(job) for job in due} | set(progress):
            task = asyncio.create_task(self._serve_lane(lane, progress.get(lane, []), stop))
            self._lanes[lane] = task
            task.add_done_callback(functools.partial(self._lane_done, lane))

    def _lane_done(self, lane: int, task: asyncio.Task[int]) -> None:
        if self._lanes.get(lane) is task:
            del self._lanes[lane]
        if not task.cancelled() and task.exception() is not None:
            log.error("replies to one chat failed", exc_info=task.exception())

    async def _serve_lane(self, lane: int, progress: list[Job], stop: asyncio.Event | None) -> int:
        """The lane's due replies, oldest first, until one has to wait; then its progress edits."""
        delivered = 0
        while stop is None or not stop.is_set():
            async with self.sessions() as s:
                due = await repo.replies_due(s, lane=lane)
            if not due or due[0].id in self._noting:
                break
            delivered += await self._finish(due[0])
        for job in progress:
            if self._quiet_until.get(lane, 0.0) > self.clock():
                break
            if _first_look_due(job):
                await self._first_look(job)
            else:
                await self._progress(job)
                self._edited_at[lane] = self._edited_at[job.id] = self.clock()
        return delivered

    # --- one job's final reply -------------------------------------------------------------------

    def _final_reply(self, job: Job) -> Reply:
        try:
            return dataclasses.replace(replies.final_reply(job, self.media), buttons=buttons_for(job))
        except Exception:  # a result we cannot show: say so rather than stall the chat
            log.exception("job %s finished with a result the bot cannot show", job.id)
            return Reply(reply_to=job.reply_to, text=replies.OOPS,
                         edit_of=(job.reply_to or {}).get("progress_ref"))

    async def _finish(self, job: Job) -> int:
        """One try at the job's reply, step by step; 1 when it was delivered, else 0."""
        progress_ref = (job.reply_to or {}).get("progress_ref")
        tidy, attempts = job.reply_step == repo.TIDY, job.reply_attempts
        try:
            if not tidy:
                reply = self._final_reply(job)
                ref = await self.deliver(reply)
                if not (reply.media and progress_ref is not None and ref != progress_ref):
                    return await self._ended(job, "delivered")
                async with self.sessions.begin() as s:  # the result is out: never again
                    await repo.mark_result_sent(s, job_id=job.id)
                tidy, attempts = True, 0
            # The buttons go here too: where a result cannot carry them (Telegram's albums), the
            # message above it does.
            await self.deliver(Reply(reply_to=job.reply_to, text=replies.DONE, edit_of=progress_ref,
                                     edit_only=True, buttons=buttons_for(job)))
            return await self._ended(job, "delivered")
        except Undeliverable as exc:
            if tidy:  # the result reached the chat; only the progress message was left
                return await self._ended(job, "delivered", f"progress message not updated: {exc.reason}")
            await self.not_deliverable(job.id, exc.reason)
            return 0
        except TryLater as exc:
            await self._postpone(job, tidy, attempts + 1, exc.reason, exc.retry_after)
        except Exception as exc:  # not the platform's answer: a bug; shown, then tried like a TryLater
            log.error("job %s: sending its reply failed", job.id, exc_info=True)
            await self._postpone(job, tidy, attempts + 1, f"{type(exc).__name__} in the bot", None)
        return 0

    async def _ended(self, job: Job, outcome: str, reason: str | None = None) -> int:
        async with self.sessions.begin() as s:
            await repo.end_reply(s, job_id=job.id, outcome=outcome, reason=reason)
        self._shown_progress.pop(job.id, None)
        self._edited_at.pop(job.id, None)
        return int(outcome == "delivered")

    async def _postpone(self, job: Job, tidy: bool, failures: int, reason: str,
                        retry_after: float | None) -> None:
        wait = self.policy.wait_s(failures, retry_after)
        self._quiet_until[repo.lane_of(job)] = self.clock() + wait
        if self.policy.gives_up_after(failures):
            outcome = "delivered" if tidy else "gave_up"
            await self._ended(job, outcome, f"after {failures} tries: {reason}")
            log.warning("job %s: gave up on its %s after %d tries: %s", job.id,
                        "progress message" if tidy else "reply", failures, reason)
            return
        async with self.sessions.begin() as s:
            await repo.postpone_reply(s, job_id=job.id, until=utcnow() + timedelta(seconds=wait),
                                      reason=reason)
        log.info("job %s: reply postponed %.1f s (try %d): %s", job.id, wait, failures, reason)

    # --- progress --------------------------------------------------------------------------------

    async def _first_look(self, job: Job) -> None:
        """Show the job's first look (best effort, once) while it is still running."""
        async with self.sessions() as s:
            fresh = await repo.get_job(s, job.id)
        if fresh is None or fresh.status != "running" or fresh.replied_at is not None:
            return  # done meanwhile: its result goes out instead
        try:
            ref = await self.deliver(replies.first_look(fresh, self.media))
        except Undeliverable as exc:
            await self.not_deliverable(job.id, exc.reason)
            return
        except TryLater as exc:
            self._quiet_until[repo.lane_of(job)] = self.clock() + self.policy.wait_s(1, exc.retry_after)
            return
        except Exception:
            log.warning("could not show the first look of job %s", job.id, exc_info=True)
            ref = None
        async with self.sessions.begin() as s:  # shown or not, never tried again
            await repo.set_reply_ref(s, job_id=job.id, ref=ref or {}, name="preview_ref")

    async def _progress(self, job: Job) -> None:
        """Edit the job's progress message (best effort: a failure skips this update)."""
        self._shown_progress[job.id] = job.progress
        update = Reply(reply_to=job.reply_to, text=replies.working(job),
                       edit_of=(job.reply_to or {}).get("progress_ref"), final=False, edit_only=True)
        try:
            await self.deliver(update)
        except Undeliverable as exc:
            await self.not_deliverable(job.id, exc.reason)
        except TryLater as exc:
            self._quiet_until[repo.lane_of(job)] = self.clock() + self.policy.wait_s(1, exc.retry_after)
        except Exception:
            log.warning("could not update the progress message of job %s", job.id)

    def _moved(self, job: Job) -> bool:
        """Whether the job's progress moved since its message last showed it."""
        shown = self._shown_progress.get(job.id, -1.0)
        return (job.reply_to or {}).get("progress_ref") is not None and job.progress > shown


def _first_look_due(job: Job) -> bool:
    """A first look at the result came (an encoder's guess) and has not been shown."""
    return bool((job.progress_info or {}).get("preview_key")) and "preview_ref" not in (job.reply_to or {})
