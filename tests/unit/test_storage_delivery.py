"""storage.repo.delivery on migrated SQLite and PostgreSQL databases: lanes, order, outcomes."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from storage import repo
from storage.models import utcnow

Sessions = async_sessionmaker[AsyncSession]


async def _finished(s: AsyncSession, chat: str | None, user: str = "u") -> str:
    """A done job of ``user`` in ``chat`` (None: without a chat), its reply pending."""
    u = await repo.get_or_create_user(s, platform="telegram", platform_user_id=user)
    chat_id = None
    if chat is not None:
        chat_id = (await repo.get_or_create_chat(s, platform="telegram", platform_chat_id=chat,
                                                 kind="group")).id
    job = await repo.create_job(s, kind="mix", model="m", payload={}, user_id=u.id, chat_id=chat_id,
                                reply_to={"chat": chat})
    await repo.claim_jobs(s, worker="w", kinds=None, limit=1, lease_s=60)
    assert await repo.finish_job(s, job_id=job.id, worker="w", result={})
    return job.id


async def _due(sessions: Sessions, **kw: object) -> list[str]:
    async with sessions() as s:
        return [j.id for j in await repo.replies_due(s, **kw)]  # type: ignore[arg-type]


async def test_each_chat_gets_its_oldest_reply_and_a_waiting_chat_holds_only_itself(
    sessions: Sessions,
) -> None:
    async with sessions.begin() as s:
        blocked = [await _finished(s, f"blocked{i}") for i in range(3)]
        a1, a2 = await _finished(s, "a"), await _finished(s, "a")
        b1 = await _finished(s, "b")
        alone = await _finished(s, None, user="solo")  # no chat: a lane of its own
    assert await _due(sessions) == [*blocked, a1, b1, alone]
    async with sessions.begin() as s:
        for job_id in blocked:  # a platform said "later" to these chats
            assert await repo.postpone_reply(s, job_id=job_id, until=utcnow() + timedelta(hours=1),
                                             reason="429")
        assert await repo.mark_replied(s, job_id=a1)
    assert await _due(sessions) == [a2, b1, alone]
    async with sessions() as s:
        a_lane = repo.lane_of(await repo.get_job(s, a2))  # type: ignore[arg-type]
        b_lane = repo.lane_of(await repo.get_job(s, b1))  # type: ignore[arg-type]
    assert await _due(sessions, lane=a_lane) == [a2]
    assert await _due(sessions, busy=[a_lane, b_lane]) == [alone]
    # Later, the postponed ones are due again, with their attempts counted.
    later = utcnow() + timedelta(hours=2)
    assert await _due(sessions, now=later) == [*blocked, a2, b1, alone]
    async with sessions() as s:
        job = await repo.get_job(s, blocked[0])
        assert job is not None and (job.reply_attempts, job.reply_error) == (1, "429")


async def test_a_reply_ends_once_with_its_outcome_and_reason(sessions: Sessions) -> None:
    async with sessions.begin() as s:
        gone, sent = await _finished(s, "gone"), await _finished(s, "sent")
        assert await repo.end_reply(s, job_id=gone, outcome="undeliverable",
                                    reason="Forbidden: bot was blocked by the user")
        assert not await repo.end_reply(s, job_id=gone, outcome="gave_up")  # ended already
        assert await repo.mark_result_sent(s, job_id=sent)
    assert await _due(sessions) == [sent]  # only its progress message is left
    async with sessions.begin() as s:
        assert await repo.mark_replied(s, job_id=sent)
        assert not await repo.postpone_reply(s, job_id=sent, until=utcnow(), reason="late")
    async with sessions() as s:
        g, d = await repo.get_job(s, gone), await repo.get_job(s, sent)
    assert g is not None and d is not None
    assert (g.reply_outcome, g.reply_error) == ("undeliverable", "Forbidden: bot was blocked by the user")
    assert (d.reply_outcome, d.reply_step, d.reply_error) == ("delivered", repo.TIDY, None)
    assert g.replied_at is not None and d.replied_at is not None
    assert await _due(sessions) == []


async def test_a_running_job_in_an_unreachable_chat_gets_no_progress_and_no_reply(
    sessions: Sessions,
) -> None:
    async with sessions.begin() as s:
        u = await repo.get_or_create_user(s, platform="telegram", platform_user_id="u")
        job = await repo.create_job(s, kind="mix", model="m", payload={}, user_id=u.id, chat_id=None,
                                    reply_to={})
        await repo.claim_jobs(s, worker="w", kinds=None, limit=1, lease_s=60)
        assert [j.id for j in await repo.jobs_in_progress(s)] == [job.id]
        assert await repo.end_reply(s, job_id=job.id, outcome="undeliverable", reason="chat not found")
        assert await repo.jobs_in_progress(s) == []
        assert await repo.finish_job(s, job_id=job.id, worker="w", result={})
    assert await _due(sessions) == []
