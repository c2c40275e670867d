"""Load: many users in several group chats at once, through the real Telegram adapter, the service
and a real engine process on the demo model.

Every message that asks for work gets exactly one final answer (its result, a failure, or a clear
refusal): none lost, none twice. A chat that floods the bot gets "too much in progress" replies
and does not starve the others: a quiet chat's job never waits behind more than
``per_chat_open_jobs`` of the flooding chat's jobs. The figures (messages, answers by kind,
p50/p95 time from job to reply, deepest queue) are printed. ``STYLEBOT_SOAK=1`` (``make soak``)
runs the full size, 200 users in 5 groups; otherwise 20 users.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
from sqlalchemy import select

import storage.repo as repo
from bot.replies import CHAT_JOBS_OPEN, USER_JOBS_OPEN
from storage.models import Job

from .fake_telegram import Call, FakeChat, FakeUser
from .telegram_world import CONFIG, World, astronaut, replying_to, running_world

pytestmark = pytest.mark.asyncio(loop_scope="module")

SOAK = os.environ.get("STYLEBOT_SOAK") == "1"
_STALL_S = 300.0  # no new answer for this long: the bot is stuck, stop waiting
USERS, GROUPS = (200, 5) if SOAK else (20, 5)
LOAD_CONFIG = CONFIG.replace("invert_steps = 20", "invert_steps = 2").replace(
    "edit_steps = 5", "edit_steps = 2").replace("batch_size = 4", "batch_size = 8").replace(
    "per_user_per_minute = 30", f"per_user_per_minute = 30\nqueue_cap = {USERS * 4}\n"
    # Room for every member of a quiet group at once (40 in the soak), not for a flood of 5 each.
    f"per_chat_open_jobs = {max(6, 2 * USERS // GROUPS)}")
RESULTS = ("sendPhoto", "sendVideo", "sendAnimation", "sendMediaGroup")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def world(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[World]:
    async with running_world(tmp_path_factory.mktemp("load"), config_text=LOAD_CONFIG) as w:
        yield w


def _answer(tg_calls: list[Call], msg: dict[str, Any]) -> list[tuple[str, str]]:
    """The final answers to one message: ("result", method), ("refused", text) or ("failed", text)."""
    mine = [c for c in tg_calls if replying_to(msg)(c)]
    out = [("result", c.method) for c in mine if c.method in RESULTS]
    said = [c for c in mine if c.method == "sendMessage"]
    progress = {c.result["message_id"] for c in said if "queue" in c.params["text"]}
    out += [("refused", c.params["text"]) for c in said if "queue" not in c.params["text"]]
    out += [("failed", c.params["text"]) for c in tg_calls if c.method == "editMessageText"
            and c.params.get("message_id") in progress and c.params["text"].startswith("Sorry")]
    return out


async def _settle(world: World, sent: list[dict[str, Any]], timeout: float) -> None:
    """Wait until every message has an answer (or the timeout: the assertions then say which)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    answered, progress_at = 0, loop.time()
    while loop.time() < deadline and loop.time() - progress_at < _STALL_S:
        now_answered = sum(1 for m in sent if _answer(world.tg.calls, m))
        if now_answered == len(sent):
            break
        if now_answered > answered:
            answered, progress_at = now_answered, loop.time()
        await asyncio.sleep(0.5)
    if any(not _answer(world.tg.calls, m) for m in sent):  # late or stalled: show where tasks wait
        print(f"\nunanswered at the deadline; {len(world.tg.calls)} Bot API calls so far; tasks:")
        for task in asyncio.all_tasks():
            task.print_stack(limit=6, file=sys.stdout)
    await asyncio.sleep(1.0)  # a duplicate would arrive now


async def _sample_queue(world: World, depths: list[int], stop: asyncio.Event) -> None:
    while not stop.is_set():
        async with world.service.sessions() as s:
            depths.append(await repo.count_queued(s))
        await asyncio.sleep(0.2)


@pytest.mark.timeout(180 + USERS * 18)  # the two phases' deadlines below, and the world around them
async def test_many_users_in_groups_get_one_answer_each(world: World) -> None:
    tg = world.tg
    groups = [FakeChat(id=-200100 - g, type="supergroup", title=f"Group {g}") for g in range(GROUPS)]
    users = [FakeUser(id=5000 + i, first_name=f"U{i}", username=f"user{i}") for i in range(USERS)]
    member = {u.id: groups[i % GROUPS] for i, u in enumerate(users)}
    depths: list[int] = []
    stop = asyncio.Event()
    sampler = asyncio.create_task(_sample_queue(world, depths, stop))
    # 1. A burst: everyone sends a selfie to their group at once.
    selfies = await asyncio.gather(*(tg.send_photo(u, member[u.id], astronaut(i % 7), caption="/selfie")
                                     for i, u in enumerate(users)))
    await _settle(world, list(selfies), timeout=60 + USERS * 6)
    # 2. A burst of morphs (each user with the next one in the same group) and edits.
    work = []
    for i, u in enumerate(users):
        friend = users[(i + GROUPS) % USERS]
        text = f"/morph @{u.username} @{friend.username} 4" if i % 2 == 0 else "/edit! smiling face"
        work.append(tg.send_text(u, member[u.id], text))
    morphs_edits = await asyncio.gather(*work)
    # 3. Meanwhile group 0 floods: every member sends five more selfies at once.
    flooders = [u for u in users if member[u.id] is groups[0]]
    flood = await asyncio.gather(*(tg.send_photo(u, groups[0], astronaut(k), caption="/selfie")
                                   for u in flooders for k in range(5)))
    sent = [*selfies, *morphs_edits, *flood]
    await _settle(world, sent, timeout=60 + USERS * 12)
    stop.set()
    await sampler

    answers = {m["message_id"]: _answer(tg.calls, m) for m in sent}
    lost = [mid for mid, a in answers.items() if not a]
    twice = [mid for mid, a in answers.items() if len(a) > 1]
    kinds = Counter(kind for a in answers.values() for kind, _ in a)
    for _ in range(40):  # the reply is sent first, then noted on the job
        async with world.service.sessions() as s:
            jobs = list(await s.scalars(select(Job)))
        if all(j.replied_at is not None for j in jobs):
            break
        await asyncio.sleep(0.25)
    refused = [text for m in flood for kind, text in answers[m["message_id"]] if kind == "refused"]
    waits = sorted((j.replied_at - j.created_at).total_seconds() for j in jobs if j.replied_at)
    print(f"\nload: {USERS} users in {GROUPS} groups, {len(sent)} messages, answers {dict(kinds)}, "
          f"refused in the flood {len(refused)}, jobs {len(jobs)}, "
          f"time to reply p50 {statistics.median(waits):.1f} s, "
          f"p95 {waits[int(0.95 * (len(waits) - 1))]:.1f} s, deepest queue {max(depths, default=0)}")
    assert not lost, f"{len(lost)} messages got no answer"
    assert not twice, f"{len(twice)} messages were answered twice: {[answers[m] for m in twice[:3]]}"
    assert all(j.replied_at is not None for j in jobs)  # every job's answer was delivered
    # In the other groups, every request was served (nobody was refused).
    quiet = [m for m in [*selfies, *morphs_edits] if m["chat"]["id"] != groups[0].id]
    assert all(answers[m["message_id"]][0][0] == "result" for m in quiet), Counter(
        a[0][0] for m in quiet for a in [answers[m["message_id"]]])
    # The flooding group's refusals are the clear "too much in progress" replies.
    group0 = [m for m in sent if m["chat"]["id"] == groups[0].id]
    assert {text for m in group0 for kind, text in answers[m["message_id"]] if kind == "refused"} <= {
        CHAT_JOBS_OPEN, USER_JOBS_OPEN}
    # Fairness: no job of another chat waited behind more than the cap of the flooding chat's jobs.
    flood_chat = {j.chat_id for j in jobs if j.reply_to.get("chat_id") == groups[0].id}
    cap = world.config.limits.per_chat_open_jobs
    for q in (j for j in jobs if j.chat_id not in flood_chat):
        ahead = [f for f in jobs if f.chat_id in flood_chat and f.created_at < q.created_at
                 and f.finished_at is not None and f.finished_at > q.created_at]
        assert len(ahead) <= cap
