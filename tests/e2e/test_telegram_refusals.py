"""Telegram saying no, as it does every day: the real python-telegram-bot client against the local
fake Bot API answering 403 / 400 / 429 with ``retry_after`` / 500, the real service and a real
engine process on the demo model.

Users who blocked the bot (or deleted their account, or whose chat is gone) cost one log line per
job and hold up nobody; a rate limit is waited out as long as Telegram asks; a result goes out once
whatever happens to the edits around it.
"""

from __future__ import annotations

import asyncio
import re
import statistics
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from log_privacy import LogCapture, capturing_logs
from service_on_disk import service_on_disk
from sqlalchemy import select

from bot.adapters.telegram import TelegramAdapter
from bot.commands import Reply
from bot.delivery import TryLater
from bot.replies import DONE
from settings import load_config
from storage.models import Job

from .fake_telegram import (
    BLOCKED,
    CHAT_NOT_FOUND,
    DEACTIVATED,
    KICKED,
    SERVER_ERROR,
    Call,
    FakeTelegram,
    FakeUser,
    too_many_requests,
)
from .telegram_world import CONFIG, TOKEN, World, astronaut, dm, replying_to, running_world

pytestmark = pytest.mark.asyncio(loop_scope="module")

ALICE = FakeUser(id=7300, first_name="Alice")

REFUSALS_CONFIG = CONFIG.replace("invert_steps = 20", "invert_steps = 2").replace(
    "batch_size = 4", "batch_size = 8").replace(
    "per_user_per_minute = 30", "per_user_per_minute = 30\nqueue_cap = 400") + """
[delivery]
first_retry_s = 1
"""
USUAL_S = 120.0  # a generous bound on one selfie's time to result on this machine


@pytest.fixture(scope="module")
def logs() -> Iterator[LogCapture]:
    with capturing_logs() as capture:
        yield capture


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def world(tmp_path_factory: pytest.TempPathFactory, logs: LogCapture) -> AsyncIterator[World]:
    async with running_world(tmp_path_factory.mktemp("refusals"), config_text=REFUSALS_CONFIG) as w:
        yield w


def _users(first_id: int, n: int, name: str) -> list[FakeUser]:
    return [FakeUser(id=first_id + i, first_name=f"{name}{i}") for i in range(n)]


async def _selfies(tg: FakeTelegram, users: list[FakeUser], rotate: int) -> list[dict[str, Any]]:
    return list(await asyncio.gather(*(tg.send_photo(u, dm(u), astronaut(rotate)) for u in users)))


async def _seconds_to_result(tg: FakeTelegram, messages: list[dict[str, Any]]) -> list[float]:
    start = time.monotonic()
    photos = await asyncio.gather(*(tg.wait_for("sendPhoto", replying_to(m), timeout=USUAL_S)
                                    for m in messages))
    return [p.at - start for p in photos]


async def _noted(tg: FakeTelegram, message: dict[str, Any]) -> None:
    """Until the bot tried to say it got the message (Telegram may have refused it)."""
    for _ in range(600):
        if any(replying_to(message)(c) for c in [*tg.calls, *tg.refused]):
            return
        await asyncio.sleep(0.1)
    raise AssertionError("the bot never answered a selfie")


async def _finished_jobs(world: World) -> list[Job]:
    async with world.service.sessions() as s:
        return list(await s.scalars(select(Job).where(Job.status.in_(("done", "failed")))))


def _answers(tg: FakeTelegram, message: dict[str, Any], method: str) -> list[Call]:
    return [c for c in tg.called(method) if replying_to(message)(c)]


async def test_sixty_blocked_chats_hold_up_nobody_and_cost_one_line_each(
    world: World, logs: LogCapture
) -> None:
    tg = world.tg
    normal = _users(7000, 5, "N")
    usual = await _seconds_to_result(tg, await _selfies(tg, normal, 0))
    # Ten chats were gone before their selfie's note could go out; fifty right after it.
    gone = _users(6000, 60, "B")
    reasons = [BLOCKED, DEACTIVATED, KICKED, CHAT_NOT_FOUND]
    for i, user in enumerate(gone):
        tg.refuse(reasons[i % 4], chat=dm(user), after=0 if i < 10 else 1)
    log_from = len(logs.lines)
    for first in range(0, 60, 10):  # in tens: the point is their replies, not a burst of uploads
        sent = await _selfies(tg, gone[first:first + 10], 1)
        await asyncio.gather(*(_noted(tg, m) for m in sent))
    for _ in range(600):  # their jobs finish: the oldest finished jobs are theirs, undeliverable
        if len(await _finished_jobs(world)) >= 65:
            break
        await asyncio.sleep(0.5)
    assert len(await _finished_jobs(world)) >= 65

    again = await _selfies(tg, normal, 3)
    blocked_time = await _seconds_to_result(tg, again)
    await asyncio.sleep(2.0)  # a second copy, or a retry to a gone chat, would arrive now
    print(f"\n60 gone chats: time to result of 5 users {statistics.median(usual):.1f} s median "
          f"(max {max(usual):.1f} s) before, {statistics.median(blocked_time):.1f} s "
          f"(max {max(blocked_time):.1f} s) with them")

    for message in again:
        assert len(_answers(tg, message, "sendPhoto")) == 1
    for user in gone:
        assert len(tg.refused_to(dm(user))) == 1, "a chat that said never was tried again"
        assert not [c for c in tg.called("sendPhoto") if c.params.get("chat_id") == user.id]
    jobs = [j for j in await _finished_jobs(world) if j.reply_to["chat_id"] in {u.id for u in gone}]
    assert len(jobs) == 60 and {j.reply_outcome for j in jobs} == {"undeliverable"}
    assert {j.reply_error for j in jobs} == {"telegram: Forbidden: bot was blocked by the user",
                                             "telegram: Forbidden: user is deactivated",
                                             "telegram: Forbidden: bot was kicked from the group chat",
                                             "telegram: Chat not found"}
    lines = logs.lines[log_from:]
    undeliverable = [m for line in lines if (m := re.search(r"job (\w+): reply not deliverable", line))]
    assert sorted(m[1] for m in undeliverable) == sorted(j.id for j in jobs)  # one line per job
    assert all("\n" not in m.string for m in undeliverable)
    assert "Traceback" not in "\n".join(lines)
    loud = [line for line in lines if re.match(r"\S+ (WARNING|ERROR|CRITICAL): ", line)]
    assert len(loud) == 60, loud[:5]  # the log says no more than one line per gone job
    print(f"log: {len(lines)} lines at DEBUG while they were gone, {len(loud)} at WARNING or above, "
          f"{len(undeliverable)} of them 'not deliverable'")


async def test_a_flood_of_429_on_edits_sends_each_result_once(world: World) -> None:
    tg = world.tg
    users = _users(7100, 3, "F")
    lift = tg.refuse(too_many_requests(1), methods=("editMessageText",))
    try:
        messages = await _selfies(tg, users, 4)
        await _seconds_to_result(tg, messages)
        await asyncio.sleep(3.0)  # the flood goes on: edits are refused, the results are not resent
    finally:
        lift()
    assert [len(_answers(tg, m, "sendPhoto")) for m in messages] == [1, 1, 1]
    assert [c for c in tg.refused if c.method == "editMessageText"]
    for message in messages:  # once the flood is over, the progress message says it is done
        [note] = [c for c in _answers(tg, message, "sendMessage") if "queue" in c.params["text"]]
        mid = note.result["message_id"]
        await tg.wait_for("editMessageText", lambda c, mid=mid: c.params["message_id"] == mid
                          and c.params["text"] == DONE, timeout=60)
    assert [len(_answers(tg, m, "sendPhoto")) for m in messages] == [1, 1, 1]


async def test_a_429_on_the_photo_waits_as_asked_and_a_500_is_retried(world: World) -> None:
    tg = world.tg
    limited, broken = _users(7200, 2, "L")
    tg.refuse(too_many_requests(3), chat=dm(limited), methods=("sendPhoto",), times=1)
    tg.refuse(SERVER_ERROR, chat=dm(broken), methods=("sendPhoto",), times=2)
    messages = await _selfies(tg, [limited, broken], 5)
    await _seconds_to_result(tg, messages)
    await asyncio.sleep(1.0)
    assert [len(_answers(tg, m, "sendPhoto")) for m in messages] == [1, 1]
    [refused] = [c for c in tg.refused_to(dm(limited)) if c.method == "sendPhoto"]
    [photo] = _answers(tg, messages[0], "sendPhoto")
    assert photo.at - refused.at >= 3.0  # Telegram said "retry after 3"
    assert [c.refused for c in tg.refused_to(dm(broken))] == [500, 500]


async def test_a_reply_being_sent_when_the_bot_stops_goes_out_whole(tmp_path: Path) -> None:
    tg = FakeTelegram(TOKEN)
    await tg.start()
    tg.slow["sendMessage"] = 1.0
    text = CONFIG.format(base_url=tg.base_url, base_file_url=tg.base_file_url)
    (tmp_path / "config.toml").write_text(text)
    config = load_config(tmp_path / "config.toml",
                         env={"STYLEBOT_HOME": str(tmp_path / "home"), "TELEGRAM_BOT_TOKEN": TOKEN})
    adapter = TelegramAdapter(config, poll_timeout=1)
    stop = asyncio.Event()
    try:
        async with service_on_disk(tmp_path, text, adapter.deliver) as service:
            running = asyncio.create_task(adapter.run(service, stop))
            await tg.wait_for("setMyCommands", timeout=20)
            to = {"platform": "telegram", "chat_id": ALICE.id}
            sending = asyncio.create_task(adapter.deliver(Reply(reply_to=to, text="Your result")))
            await tg.wait_for("sendMessage", timeout=10)
            stop.set()  # while Telegram is still answering
            assert await sending == {"chat_id": ALICE.id, "message_id": tg.calls[-1].result["message_id"]}
            await asyncio.wait_for(running, 20)
            with pytest.raises(TryLater):  # stopped: a reply now waits for the next start
                await adapter.deliver(Reply(reply_to=to, text="Too late"))
    finally:
        await tg.stop()
