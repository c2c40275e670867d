"""The reply pump against a real SQLite file, with a platform that says no (the adapters'
``deliver`` is where a platform's answer arrives, translated into :mod:`bot.delivery`'s words).

The real platforms' answers, through the real clients, are in tests/e2e."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from service_on_disk import service_on_disk
from sqlalchemy import select, update

import storage.repo as repo
from bot.commands import Reply
from bot.delivery import TryLater, Undeliverable
from bot.replies import DONE
from bot.reply_pump import PROGRESS_EVERY_S
from bot.service import Service
from storage.models import Job, utcnow

BLOCKED = "Forbidden: bot was blocked by the user"


@dataclass
class Platform:
    """Answers per chat: ``rules[chat]`` raises (or waits) before the message is taken."""

    rules: dict[str, Callable[[Reply], Any]] = field(default_factory=dict)
    taken: list[Reply] = field(default_factory=list)
    tried: list[Reply] = field(default_factory=list)

    async def deliver(self, reply: Reply) -> dict[str, Any]:
        self.tried.append(reply)
        rule = self.rules.get(reply.reply_to["chat"])
        if rule is not None:
            outcome = rule(reply)
            if asyncio.iscoroutine(outcome):
                await outcome
        self.taken.append(reply)
        return {"message_id": 1000 + len(self.taken)}

    def to(self, chat: str, *, tried: bool = False) -> list[Reply]:
        return [r for r in (self.tried if tried else self.taken) if r.reply_to["chat"] == chat]


@pytest.fixture
async def pump(tmp_path: Path) -> AsyncIterator[tuple[Service, Platform]]:
    platform = Platform()
    config = "[delivery]\nattempts = 3\nfirst_retry_s = 2\n"
    async with service_on_disk(tmp_path, config, platform.deliver) as service:
        yield service, platform


async def _job(service: Service, chat: str, *, result: bool = False, progress_ref: int | None = None,
               finish: bool = True, group: bool = False) -> str:
    """A job in ``chat``, finished (a failure, or a picture with ``result``) unless ``finish`` is off."""
    async with service.sessions.begin() as s:
        c = await repo.get_or_create_chat(s, platform="test", platform_chat_id=chat, kind="private")
        to: dict[str, Any] = {"platform": "test", "chat": chat}
        if progress_ref is not None:
            to["progress_ref"] = {"message_id": progress_ref}
        if group:
            to["group"] = True
        job = await repo.create_job(s, kind="mix", model="m", payload={}, user_id=None, chat_id=c.id,
                                    reply_to=to)
        await repo.claim_jobs(s, worker="w", kinds=None, limit=1, lease_s=60)
        if not finish:
            await repo.set_progress(s, job_id=job.id, progress=0.5, info=None)
        elif result:
            key = service.media.put(b"\x89PNG\r\n\x1a\n" + chat.encode(), suffix=".png")
            await repo.finish_job(s, job_id=job.id, worker="w", result={"media_key": key, "layers": "coarse"})
        else:
            await repo.fail_job(s, job_id=job.id, worker="w", error="no face found", code="no_face")
        return job.id


async def _jobs(service: Service) -> dict[str, Job]:
    async with service.sessions() as s:
        return {j.id: j for j in await s.scalars(select(Job))}


async def _time_passes(service: Service) -> None:
    """Every postponed reply falls due (as if its wait were over)."""
    async with service.sessions.begin() as s:
        await s.execute(update(Job).where(Job.reply_after.is_not(None))
                        .values(reply_after=utcnow() - timedelta(seconds=1)))


async def test_sixty_blocked_chats_hold_up_nobody_and_are_logged_once_each(
    pump: tuple[Service, Platform], caplog: pytest.LogCaptureFixture
) -> None:
    service, platform = pump
    blocked = [f"blocked{i}" for i in range(60)]
    for chat in blocked:
        platform.rules[chat] = lambda r: (_ for _ in ()).throw(Undeliverable(f"test: {BLOCKED}"))
    stuck = [await _job(service, chat) for chat in blocked]  # the oldest replies, all undeliverable
    running = await _job(service, "blocked0", progress_ref=7, finish=False)
    users = [f"user{i}" for i in range(5)]
    for chat in users:
        await _job(service, chat)
    with caplog.at_level(logging.INFO, logger="stylebot"):
        assert await service.pump_once() == 5
        assert await service.pump_once() == 0  # never tried again
    assert all(len(platform.to(u)) == 1 for u in users)
    assert all(len(platform.to(chat, tried=True)) == 1 for chat in blocked[1:])
    lines = [r for r in caplog.records if r.name.startswith("stylebot")]
    assert len([r for r in lines if "not deliverable" in r.getMessage()]) == 61  # each job once
    assert all(r.exc_info is None for r in lines)
    jobs = await _jobs(service)
    assert {(jobs[j].reply_outcome, jobs[j].reply_error) for j in [*stuck, running]} == {
        ("undeliverable", f"test: {BLOCKED}")}
    # The running job's chat is known now: when it finishes, no reply is attempted.
    async with service.sessions.begin() as s:
        assert await repo.finish_job(s, job_id=running, worker="w", result={})
    tries = len(platform.tried)
    assert await service.pump_once() == 0 and len(platform.tried) == tries


async def test_a_rate_limited_reply_waits_as_asked_then_goes_out_once(pump: tuple[Service, Platform]) -> None:
    service, platform = pump
    flood = iter([TryLater("test: flood control", retry_after=30)])

    def limited(reply: Reply) -> None:
        if (exc := next(flood, None)) is not None:
            raise exc

    platform.rules["a"] = limited
    job_id = await _job(service, "a", result=True)
    assert await service.pump_once() == 0
    job = (await _jobs(service))[job_id]
    assert job.reply_after is not None and job.reply_after - utcnow() > timedelta(seconds=25)
    assert (job.reply_attempts, job.reply_error) == (1, "test: flood control")
    assert await service.pump_once() == 0 and len(platform.tried) == 1  # not before it is due
    await _time_passes(service)
    assert await service.pump_once() == 1
    assert len(platform.to("a")) == 1 and platform.to("a")[0].media


async def test_a_reply_that_keeps_failing_is_given_up_with_its_reason(
    pump: tuple[Service, Platform], caplog: pytest.LogCaptureFixture
) -> None:
    service, platform = pump
    platform.rules["down"] = lambda r: (_ for _ in ()).throw(TryLater("test: Bad Gateway (502)"))
    job_id = await _job(service, "down")
    with caplog.at_level(logging.INFO, logger="stylebot"):
        for _ in range(3):  # [delivery] attempts = 3
            assert await service.pump_once() == 0
            await _time_passes(service)
        assert await service.pump_once() == 0
    assert len(platform.tried) == 3
    job = (await _jobs(service))[job_id]
    assert (job.reply_outcome, job.reply_error) == ("gave_up", "after 3 tries: test: Bad Gateway (502)")
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == [
        f"job {job_id}: gave up on its reply after 3 tries: test: Bad Gateway (502)"]


async def test_the_result_goes_out_once_whatever_happens_to_the_progress_edit(
    pump: tuple[Service, Platform],
) -> None:
    service, platform = pump
    edits = iter([TryLater("test: flood control", retry_after=1), TryLater("test: flood control")])

    def edits_limited(reply: Reply) -> None:
        if reply.edit_of is not None and (exc := next(edits, None)) is not None:
            raise exc

    platform.rules["a"] = edits_limited
    job_id = await _job(service, "a", result=True, progress_ref=5)
    for _ in range(3):
        await service.pump_once()
        await _time_passes(service)
    results = [r for r in platform.to("a") if r.media]
    done = [r for r in platform.to("a") if r.text == DONE]
    assert len(results) == 1 and results[0].edit_of == {"message_id": 5}
    assert len(done) == 1 and done[0].edit_of == {"message_id": 5} and done[0].edit_only
    assert len(platform.to("a", tried=True)) == 4  # the result once, the edit three times
    job = (await _jobs(service))[job_id]
    assert (job.reply_outcome, job.reply_step) == ("delivered", repo.TIDY)


async def test_a_chat_whose_platform_hangs_does_not_delay_another_chats_reply(
    pump: tuple[Service, Platform],
) -> None:
    service, platform = pump
    never = asyncio.Event()
    platform.rules["slow"] = lambda r: never.wait()
    stop = asyncio.Event()
    runner = asyncio.create_task(service.run(stop))
    await _job(service, "slow")
    for _ in range(100):
        if platform.to("slow", tried=True):
            break
        await asyncio.sleep(0.05)
    assert platform.to("slow", tried=True)  # sending there now, and it never returns
    await _job(service, "quick")
    for _ in range(200):
        if platform.to("quick"):
            break
        await asyncio.sleep(0.05)
    assert len(platform.to("quick")) == 1
    never.set()
    stop.set()
    await asyncio.wait_for(runner, 10)
    assert len(platform.to("slow")) == 1


async def test_progress_moves_every_few_seconds_one_job_at_a_time_in_a_group(
    pump: tuple[Service, Platform]
) -> None:
    """Each private job's message shows its progress again once it moved and PROGRESS_EVERY_S
    passed; a group (Telegram: 20 messages a minute) sees one job's edit per interval, in turns."""
    service, platform = pump
    now = [100.0]
    service.replies.clock = lambda: now[0]
    alice = await _job(service, "alice", progress_ref=7, finish=False)
    club = [await _job(service, "club", progress_ref=ref, finish=False, group=True) for ref in (8, 9)]

    async def progress(value: float) -> None:
        async with service.sessions.begin() as s:
            for job_id in (alice, *club):
                await repo.set_progress(s, job_id=job_id, progress=value, info=None)

    await service.pump_once()
    assert [r.text for r in platform.to("alice")] == ["Working... 50%"]
    assert len(platform.to("club")) == 1
    await progress(0.6)
    now[0] += PROGRESS_EVERY_S - 1
    await service.pump_once()
    assert len(platform.to("alice")) == 1 and len(platform.to("club")) == 1  # not yet
    now[0] += 1
    await service.pump_once()
    assert [r.text for r in platform.to("alice")] == ["Working... 50%", "Working... 60%"]
    edited = [r.edit_of for r in platform.to("club")]
    assert len(edited) == 2 and edited[0] != edited[1]  # the other job's turn
    now[0] += 2 * PROGRESS_EVERY_S
    await service.pump_once()  # nothing moved: nothing edited
    assert len(platform.to("alice")) == 2
    assert all(r.edit_of and r.edit_only and not r.final for r in platform.taken)
