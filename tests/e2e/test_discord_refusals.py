"""Discord as it really answers: the real discord.py client against the local fake Discord saying no
(a gateway that refuses the Message Content intent, channels that refuse the bot, rate-limited
edits), personal answers only the asker sees, and slash commands registered only when they change.

No engine process: finished jobs are written to the database as the engine would."""

from __future__ import annotations

import asyncio
import io
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from log_privacy import capturing_logs
from PIL import Image

import storage.repo as repo
from bot.adapters import discord_commands
from bot.commands import Reply
from bot.replies import NO_OWN_FACE
from storage.models import Job

from .discord_world import ANN, BOB, CONFIG, TOKEN, World, running_world
from .fake_discord import APP_ID, CHANNEL_ID, DM_BASE, FakeDiscord

MESSAGE_CONTENT = 1 << 15


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    with capturing_logs() as logs:
        async with running_world(tmp_path, logs, engine=False) as w:
            yield w


def _flags(callback: dict[str, Any]) -> int:
    return int((callback.get("data") or {}).get("flags") or 0)


async def _answered(fake: FakeDiscord, token: str) -> Any:
    await fake.wait_for(lambda: bool(fake.for_token(token)), timeout=10)
    [answer] = fake.for_token(token)
    [callback] = [c for c in fake.callbacks if c["token"] == token]
    return callback, answer


async def test_personal_answers_are_seen_by_the_asker_alone(world: World) -> None:
    fake = world.fake
    for name, options in (("me", []), ("privacy", []), ("forget", []),
                          ("privacy", [{"name": "policy", "type": 3, "value": "nobody"}])):
        token = await fake.slash(ANN, name, options)
        callback, answer = await _answered(fake, token)
        assert callback["type"] == 5 and _flags(callback) == 64, name  # "thinking...", ephemeral
        assert answer.flags == 64, name
    # A refusal of a group command: the public "thinking..." goes, the refusal is the asker's.
    token = await fake.slash(ANN, "edit", [{"name": "text", "type": 3, "value": "smiling face"}])
    callback, answer = await _answered(fake, token)
    assert _flags(callback) == 0 and token in fake.deleted_originals
    assert answer.text == NO_OWN_FACE and answer.flags == 64
    # What is not personal stays in the channel.
    token = await fake.slash(BOB, "help")
    callback, answer = await _answered(fake, token)
    assert _flags(callback) == 0 and answer.flags == 0 and token not in fake.deleted_originals


async def test_a_gateway_refusing_message_content_is_said_once_and_commands_still_work(
    tmp_path: Path,
) -> None:
    fake = FakeDiscord(TOKEN)
    await fake.start()
    fake.refused_intents = MESSAGE_CONTENT  # the portal's default for a new application
    config = CONFIG.replace("max_upload_mb = 8", "max_upload_mb = 8\nmessage_content = true")
    try:
        with capturing_logs() as logs:
            async with running_world(tmp_path, logs, config_text=config, engine=False, fake=fake) as w:
                token = await fake.slash(ANN, "help")
                _, answer = await _answered(fake, token)
                assert "selfie" in answer.text
                assert w.adapter.ready.is_set()
    finally:
        await fake.stop()
    assert [bool(i["intents"] & MESSAGE_CONTENT) for i in fake.identifies] == [True, False]
    said = [line for line in logs.lines if "4014" in line and line.startswith("stylebot")]
    assert len(said) == 1 and "Privileged Gateway Intents -> Message Content Intent" in said[0]
    assert not [line for line in logs.lines if re.match(r"\S+ (ERROR|CRITICAL): ", line)]


async def test_slash_commands_are_registered_only_when_their_definition_changed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeDiscord(TOKEN)
    await fake.start()
    try:
        with capturing_logs() as logs:
            for _ in range(2):  # started twice, the same commands
                async with running_world(tmp_path, logs, engine=False, fake=fake):
                    pass
            assert fake.registrations == 1
            monkeypatch.setitem(discord_commands.COMMANDS, "help", "What I can do, and how")
            async with running_world(tmp_path, logs, engine=False, fake=fake):
                pass
    finally:
        await fake.stop()
    assert fake.registrations == 2
    assert next(c for c in fake.commands if c["name"] == "help")["description"] == "What I can do, and how"


async def _finished(world: World, reply_to: dict[str, Any], chat: str) -> str:
    """A finished /mix job whose reply goes to ``reply_to``, as the engine leaves it."""
    service = world.service
    buf = io.BytesIO()
    Image.new("RGB", (48, 16), "teal").save(buf, format="PNG")
    async with service.sessions.begin() as s:
        user = await repo.get_or_create_user(s, platform="discord", platform_user_id=ANN)
        c = await repo.get_or_create_chat(s, platform="discord", platform_chat_id=chat, kind="private")
        job = await repo.create_job(s, kind="mix", model="demo", payload={}, user_id=user.id, chat_id=c.id,
                                    reply_to=reply_to)
        await repo.claim_jobs(s, worker="w", kinds=None, limit=1, lease_s=60)
        key = service.media.put(buf.getvalue(), suffix=".png")
        await repo.finish_job(s, job_id=job.id, worker="w", result={"media_key": key, "layers": "coarse"})
    await service.queue.notify([job.id])
    return job.id


async def _outcome(world: World, job_id: str) -> Job:
    for _ in range(200):
        async with world.service.sessions() as s:
            job = await repo.get_job(s, job_id)
        assert job is not None
        if job.replied_at is not None:
            return job
        await asyncio.sleep(0.1)
    raise AssertionError(f"job {job_id} was never answered")


async def test_a_dm_that_refuses_the_bot_costs_one_line_and_rate_limited_edits_send_once(
    world: World,
) -> None:
    fake, adapter = world.fake, world.adapter
    closed_dm = str(DM_BASE + 777)
    fake.refuse("channel_send", 403, "Cannot send messages to this user", code=50007, channel_id=closed_dm)
    gone = await _finished(world, {"platform": "discord", "channel_id": closed_dm}, "dm-777")
    # A slash command's result, while edits of its followup are rate limited for a while.
    hook = {"application_id": APP_ID, "token": "interaction-token-busy", "expires_at": 4e9}
    to = {"platform": "discord", "channel_id": CHANNEL_ID, "interaction": hook}
    note = await adapter.deliver(Reply(reply_to=to, text="Got it. The mix is next in the queue."))
    fake.refuse("webhook_edit", 429, "You are being rate limited.", retry_after=0.2, times=7)
    busy = await _finished(world, {**to, "progress_ref": note}, "guild")

    job = await _outcome(world, gone)
    assert (job.reply_outcome, job.reply_error) == (
        "undeliverable", "discord: 403 Cannot send messages to this user")
    job = await _outcome(world, busy)
    assert job.reply_outcome == "delivered" and job.reply_attempts >= 1  # it had to wait, once at least
    [result] = fake.for_token("interaction-token-busy")
    assert len(result.edits) == 1 and result.filenames == ["stylebot.png"]
    assert [r for r in fake.refused if r[0] == "webhook_edit"] == [("webhook_edit", 429)] * 7
    await asyncio.sleep(1.5)  # nothing more goes to the closed DM
    assert [r for r in fake.refused if r[0] == "channel_send"] == [("channel_send", 403)]
    lines = [line for line in world.logs.lines if gone in line and line.startswith("stylebot")]
    assert lines == [f"stylebot.replies WARNING: job {gone}: reply not deliverable: "
                     "discord: 403 Cannot send messages to this user"]

