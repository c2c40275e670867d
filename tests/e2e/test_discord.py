"""Discord end to end: the real discord.py client (through the adapter) against a local fake Discord,
the real service, and a real engine process on the demo model.

Everything logged meanwhile (this process and the engine process, both at DEBUG) is checked last for the
token and for face data."""

from __future__ import annotations

import asyncio
import io
import re
import time
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
import skimage.data
from log_privacy import assert_no_private_data, capturing_logs, read_log
from PIL import Image
from sqlalchemy import select

import storage.repo as repo
from bot.commands import Media, Reply
from bot.replies import NO_OWN_FACE, RATE_LIMITED, personal_in_a_channel
from storage.models import Face, Job, User

from .discord_world import ANN, BOB, CYD, DEE, EVE, TOKEN, World, running_world
from .fake_discord import APP_ID, BOT_ID, CHANNEL_ID, DM_BASE, FakeDiscord, Sent

pytestmark = pytest.mark.asyncio(loop_scope="module")


def _jpeg(shift: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(skimage.data.astronaut()).rotate(shift).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def world(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[World]:
    with capturing_logs() as logs:
        async with running_world(tmp_path_factory.mktemp("discord"), logs) as w:
            yield w


async def test_connects_and_registers_slash_commands(world: World) -> None:
    fake = world.fake
    assert fake.identify is not None and fake.identify["token"] == TOKEN
    intents = fake.identify["intents"]
    assert intents & (1 << 9) and intents & (1 << 12)  # guild messages, DMs
    assert not intents & (1 << 15)  # no privileged Message Content unless [discord] message_content
    assert fake.gateway_query.get("encoding") == "json"
    names = {c["name"] for c in fake.commands}
    assert names == {"selfie", "morph", "edit", "mix", "lineup", "me", "privacy", "forget", "help",
                     "Morph with me"}
    menu = next(c for c in fake.commands if c["name"] == "Morph with me")
    assert menu["type"] == 2  # a USER command: in the menu of a person, no options
    selfie = next(c for c in fake.commands if c["name"] == "selfie")
    photo = next(o for o in selfie["options"] if o["name"] == "photo")
    assert photo["type"] == 11 and photo["required"] is True  # an ATTACHMENT option
    morph = next(c for c in fake.commands if c["name"] == "morph")
    assert [o["type"] for o in morph["options"][:2]] == [6, 6]  # two USER options
    more = [o for o in morph["options"] if o["name"] in "cdefgh"]  # a group tour's, optional
    assert [(o["type"], o.get("required", False)) for o in more] == [(6, False)] * 6


async def _slash_selfie(fake: FakeDiscord, user: str, data: bytes, name: str) -> str:
    att = fake.add_file(name, data, "image/jpeg")
    return await fake.slash(user, "selfie", [{"name": "photo", "type": 11, "value": att["id"]}],
                            attachments=[att])


def _labels(message: Sent) -> list[str]:
    return [c["label"] for row in message.components for c in row["components"]]


def _final(fake: FakeDiscord, token: str) -> bool:
    return any(m.filenames or m.text.startswith("Sorry") for m in fake.for_token(token))


async def test_slash_selfies_then_morph_with_user_options(world: World) -> None:
    fake = world.fake
    ann = await _slash_selfie(fake, ANN, _jpeg(0), "ann.jpg")
    bob = await _slash_selfie(fake, BOB, _jpeg(5), "bob.jpg")
    await fake.wait_for(lambda: len(fake.callbacks) >= 2, timeout=10)
    assert {c["type"] for c in fake.callbacks if c["token"] in (ann, bob)} == {5}  # deferred at once
    await fake.wait_for(lambda: _final(fake, ann) and _final(fake, bob), timeout=120)
    for token in (ann, bob):
        [msg] = fake.for_token(token)  # the followup, edited from "queued" into the result
        assert msg.via == "webhook" and "queue" in (msg.first or "")
        assert "Saved as your face" in msg.text and "not a face model" in msg.text
        assert len(msg.filenames) == 1 and msg.filenames[0].endswith(".png")
        assert msg.files[0][1].startswith(b"\x89PNG")
        assert msg.allowed_mentions == {"parse": []}

    token = await fake.slash(ANN, "morph", [{"name": "a", "type": 6, "value": ANN},
                                            {"name": "b", "type": 6, "value": BOB},
                                            {"name": "frames", "type": 4, "value": 4}], users=[ANN, BOB])
    await fake.wait_for(lambda: _final(fake, token), timeout=120)
    [msg] = fake.for_token(token)
    assert msg.filenames and msg.filenames[0].endswith(".mp4") and msg.text.startswith("Morph: Ann to Bob, ")
    assert b"ftyp" in msg.files[0][1][:16]

    assert msg.flags == 0  # a result is the group's to see
    # Its buttons: Cyd is in neither face, but both allow everyone here; Bob turns it round.
    morph = msg
    assert _labels(morph) == ["As GIF", "Reverse", "Slower", "Faster"]
    for who, label, suffix, start in ((CYD, "As GIF", ".gif", "Morph: Ann to Bob, 6 frames"),
                                      (BOB, "Reverse", ".mp4", "Morph: Bob to Ann, 6 frames")):
        token = await fake.press(who, morph, label)
        await fake.wait_for(lambda t=token: _final(fake, t), timeout=120)
        [made] = [m for m in fake.for_token(token) if m.filenames]
        assert made.filenames[0].endswith(suffix) and made.text.startswith(start), made.text

    # Bob right-clicks Ann: "Morph with me" makes the morph of the two of them.
    token = await fake.user_menu(BOB, "Morph with me", ANN)
    await fake.wait_for(lambda: _final(fake, token), timeout=120)
    [msg] = fake.for_token(token)
    assert msg.text.startswith("Morph: Bob to Ann, ") and msg.filenames[0].endswith(".mp4")

    # Bob says nobody may use his face (only he sees the answer): Ann's morph is refused, to her alone.
    token = await fake.slash(BOB, "privacy", [{"name": "policy", "type": 3, "value": "nobody"}])
    await fake.wait_for(lambda: any("Privacy: nobody" in m.text for m in fake.for_token(token)), timeout=10)
    assert [m.flags for m in fake.for_token(token)] == [64]
    token = await fake.slash(ANN, "morph", [{"name": "a", "type": 6, "value": ANN},
                                            {"name": "b", "type": 6, "value": BOB}], users=[ANN, BOB])
    await fake.wait_for(lambda: bool(fake.for_token(token)), timeout=10)
    await asyncio.sleep(0.5)
    [msg] = fake.for_token(token)
    assert msg.text == "Sorry, @bob hasn't allowed their face to be used here." and not msg.filenames
    assert msg.flags == 64 and token in fake.deleted_originals
    # A button under the earlier morph of Bob's face is refused the same way, to the presser alone.
    token = await fake.press(CYD, morph, "Slower")
    await fake.wait_for(lambda: bool(fake.for_token(token)), timeout=10)
    [said] = fake.for_token(token)
    assert "hasn't allowed" in said.text and said.flags == 64 and not said.filenames


async def test_dm_photo_and_a_photo_with_a_mention_are_selfies(world: World) -> None:
    fake = world.fake
    fake.add_user(DEE, "dee")
    att = fake.add_file("cyd.jpg", _jpeg(10), "image/jpeg")
    channel = await fake.message(CYD, "", dm=True, attachments=[att])
    before = len(fake.in_channel(CHANNEL_ID))
    att = fake.add_file("dee.jpg", _jpeg(15), "image/jpeg")
    await fake.message(DEE, f"<@{BOT_ID}> here I am", attachments=[att], mentions=[BOT_ID])
    await fake.wait_for(lambda: any(m.filenames for m in fake.in_channel(channel))
                        and any(m.filenames for m in fake.in_channel(CHANNEL_ID)[before:]), timeout=120)
    [dm] = fake.in_channel(channel)
    [guild] = fake.in_channel(CHANNEL_ID)[before:]
    for msg in (dm, guild):
        assert msg.via == "channel" and "Saved as your face" in msg.text and "not a face model" in msg.text
        assert msg.reference is not None and msg.allowed_mentions == {"parse": []}


async def test_mention_prefix_command_in_the_guild(world: World) -> None:
    fake = world.fake
    before = len(fake.in_channel(CHANNEL_ID))
    # A personal command written in the channel is pointed to its slash command, answered nowhere.
    await fake.message(BOB, f"<@{BOT_ID}> /me", mentions=[BOT_ID])
    await fake.wait_for(lambda: len(fake.in_channel(CHANNEL_ID)) > before, timeout=10)
    said = fake.in_channel(CHANNEL_ID)[-1]
    assert said.text == personal_in_a_channel("me") and not said.filenames
    before += 1
    await fake.message(CYD, f"<@{BOT_ID}> /morph @me <@{BOB}>", mentions=[BOT_ID, BOB])
    await fake.wait_for(lambda: len(fake.in_channel(CHANNEL_ID)) > before, timeout=10)
    msg = fake.in_channel(CHANNEL_ID)[-1]
    assert msg.via == "channel" and msg.text == "Sorry, @bob hasn't allowed their face to be used here."
    # Without a mention the bot stays quiet in the server.
    await fake.message(CYD, "/help")
    await asyncio.sleep(0.5)
    assert len(fake.in_channel(CHANNEL_ID)) == before + 1


async def test_not_an_image_and_too_big(world: World) -> None:
    fake = world.fake
    pdf = fake.add_file("cv.pdf", b"%PDF-1.4 not a photo", "application/pdf")
    token = await fake.slash(CYD, "selfie", [{"name": "photo", "type": 11, "value": pdf["id"]}],
                             attachments=[pdf])
    await fake.wait_for(lambda: bool(fake.for_token(token)), timeout=10)
    assert "doesn't look like a photo" in fake.for_token(token)[0].text
    big = fake.add_file("huge.jpg", b"\xff\xd8\xff" + b"\0" * (9 * 1024 * 1024), "image/jpeg")
    channel = await fake.message(CYD, "", dm=True, attachments=[big])
    await fake.wait_for(lambda: any("too large" in m.text for m in fake.in_channel(channel)), timeout=10)


async def test_a_photo_without_a_face_says_so(world: World) -> None:
    fake = world.fake
    buf = io.BytesIO()
    Image.linear_gradient("L").convert("RGB").save(buf, format="JPEG")
    att = fake.add_file("sky.jpg", buf.getvalue(), "image/jpeg")
    channel = await fake.message(CYD, "", dm=True, attachments=[att])
    await fake.wait_for(lambda: any(m.text.startswith("Sorry") for m in fake.in_channel(channel)),
                        timeout=120)
    failed = next(m for m in fake.in_channel(channel) if m.text.startswith("Sorry"))
    assert "No face" in failed.text and not failed.filenames
    assert "queue" in (failed.first or "")  # the progress message, edited into the answer


async def test_edit_fast_then_thorough(world: World) -> None:
    fake = world.fake
    # Fast (global directions): the first one also builds the demo model's direction table.
    token = await fake.slash(ANN, "edit", [{"name": "text", "type": 3, "value": "smiling face"}])
    await fake.wait_for(lambda: _final(fake, token), timeout=300)
    [msg] = fake.for_token(token)
    assert msg.text.startswith("Before / after: smiling face") and "+ In your photo" in msg.text
    assert len(msg.filenames) == 2
    for _, data in msg.files:
        Image.open(io.BytesIO(data)).verify()
    token = await fake.slash(ANN, "edit", [{"name": "text", "type": 3, "value": "old face"},
                                           {"name": "strength", "type": 10, "value": 6},
                                           {"name": "method", "type": 3, "value": "thorough"}])
    await fake.wait_for(lambda: _final(fake, token), timeout=300)
    [msg] = fake.for_token(token)
    assert msg.text.startswith("Before / after: old face") and len(msg.filenames) == 2
    async with world.service.sessions() as s:
        edits = (await s.scalars(select(Job).where(Job.kind == "edit").order_by(Job.created_at))).all()
    assert [(j.payload["method"], j.payload.get("strength")) for j in edits] == [
        ("global", None), ("optimize", 6)]


async def test_buttons_under_a_selfie_edit_it_for_its_owner_only(world: World) -> None:
    fake = world.fake
    selfie = await _slash_selfie(fake, DEE, _jpeg(7), "dee.jpg")
    await fake.wait_for(lambda: _final(fake, selfie), timeout=120)
    [result] = fake.for_token(selfie)
    labels = [c["label"] for row in result.components for c in row["components"]]
    assert labels == ["Smile", "Older", "Younger", "Glasses", "Morph with..."]
    async with world.service.sessions() as s:
        edits = len((await s.scalars(select(Job).where(Job.kind == "edit"))).all())
    # Cyd's press under Dee's face, and a forged one: answered only to the presser, nothing queued.
    for who, press, answer in ((CYD, {"label": "Smile"}, "Only the person whose face it is"),
                               (DEE, {"custom_id": "b1 " + "f" * 32 + " smile"}, "doesn't work any more")):
        token = await fake.press(who, result, **press)
        await fake.wait_for(lambda t=token: bool(fake.for_token(t)), timeout=10)
        [said] = fake.for_token(token)
        assert answer in said.text and said.flags == 64
        assert [c["type"] for c in fake.callbacks if c["token"] == token] == [6]  # message unchanged
    # The engine builds the demo model's direction table while idle (one sample a channel): with
    # it, a one-tap edit is a global-direction edit, whose strength can slide.
    await fake.wait_for(lambda: bool(list((world.home / "directions").glob("*.safetensors"))), timeout=120)
    token = await fake.press(DEE, result, "Smile")
    await fake.wait_for(lambda: _final(fake, token), timeout=300)
    [edited] = fake.for_token(token)  # the queued note, edited into the result
    assert edited.text.startswith("Before / after: a smiling face") and edited.flags == 0
    async with world.service.sessions() as s:
        assert len((await s.scalars(select(Job).where(Job.kind == "edit"))).all()) == edits + 1
    # Under the edit: the same edit stronger, for Dee only.
    assert _labels(edited) == ["Weaker", "Stronger", "Thorough (slower)", "Morph with..."]
    used = float(re.search(r"\(strength (-?[0-9.]+), from -10 to 10\)", edited.text)[1])
    fay = "800000000000000006"  # new here: Cyd has pressed her minute's worth
    fake.add_user(fay, "fay")
    token = await fake.press(fay, edited, "Stronger")
    await fake.wait_for(lambda: bool(fake.for_token(token)), timeout=10)
    [said] = fake.for_token(token)
    assert "Only the person whose face it is" in said.text and said.flags == 64
    token = await fake.press(DEE, edited, "Stronger")
    await fake.wait_for(lambda: _final(fake, token), timeout=120)
    [stronger] = fake.for_token(token)
    assert f"(strength {used + 2:g}, from -10 to 10)" in stronger.text and len(stronger.filenames) == 2
    # "Morph with..." lists the people here who shared a face and allow it (Bob said nobody).
    token = await fake.press(DEE, result, "Morph with...")
    await fake.wait_for(lambda: any(m.components for m in fake.for_token(token)), timeout=10)
    [menu] = [m for m in fake.for_token(token) if m.components]
    people = [c["label"] for row in menu.components for c in row["components"]]
    assert "Ann" in people and "Bob" not in people and "Dee" not in people
    token = await fake.press(DEE, menu, "Ann")
    await fake.wait_for(lambda: _final(fake, token), timeout=120)
    assert any(m.text.startswith("Morph: Dee to Ann, ") for m in fake.for_token(token))


async def test_too_many_commands_a_minute_get_a_clear_reply(world: World) -> None:
    fake = world.fake
    fake.add_user(EVE, "eve")
    limit = world.service.config.limits.per_user_per_minute
    channel = str(DM_BASE + int(EVE) % 1000)
    for _ in range(limit + 1):
        await fake.message(EVE, "/edit smiling face", dm=True)
    await fake.wait_for(lambda: len(fake.in_channel(channel)) >= limit + 1, timeout=20)
    await asyncio.sleep(0.5)
    said = sorted(m.text for m in fake.in_channel(channel))  # handled concurrently: any order
    assert said == [NO_OWN_FACE] * limit + [RATE_LIMITED]


async def test_forget_erases_the_user_everywhere(world: World) -> None:
    fake, service = world.fake, world.service
    async with service.sessions() as s:
        ann = await repo.find_user(s, platform="discord", platform_user_id=ANN)
        assert ann is not None
        faces = (await s.scalars(select(Face).where(Face.user_id == ann.id))).all()
        keys = set().union(*(repo.face_media_keys(f) for f in faces))
        jobs = (await s.scalars(select(Job).where(Job.user_id == ann.id))).all()
        keys |= {v for j in jobs for k, v in (j.result or {}).items() if k.endswith("_key")}
    assert faces and len(keys) >= 6 and all(service.media.path(k).exists() for k in keys)
    token = await fake.slash(ANN, "forget")
    await fake.wait_for(lambda: bool(fake.for_token(token)), timeout=10)
    assert "confirm" in fake.for_token(token)[0].text
    token = await fake.slash(ANN, "forget", [{"name": "confirm", "type": 5, "value": True}])
    await fake.wait_for(lambda: bool(fake.for_token(token)), timeout=10)
    assert "erased everything" in fake.for_token(token)[0].text
    async with service.sessions() as s:
        assert await repo.find_user(s, platform="discord", platform_user_id=ANN) is None
        assert not (await s.scalars(select(Face).where(Face.user_id == ann.id))).all()
        assert not (await s.scalars(select(Job).where(Job.user_id == ann.id))).all()
        left = {u.platform_user_id for u in await s.scalars(select(User))}
        referenced = await repo.referenced_media_keys(s)
    assert ANN not in left and BOB in left
    assert not [k for k in keys if service.media.path(k).exists()]
    assert set(service.media.keys()) == referenced  # no file left that no row needs


async def test_long_job_past_the_interaction_window_posts_to_the_channel(
    world: World, tmp_path_factory: pytest.TempPathFactory
) -> None:
    fake, adapter = world.fake, world.adapter
    hook = {"application_id": APP_ID, "token": "interaction-token-late", "expires_at": time.time() + 600}
    reply_to = {"platform": "discord", "channel_id": CHANNEL_ID, "interaction": hook}
    ref = await adapter.deliver(Reply(reply_to=reply_to, text="Got it. The morph is next in the queue."))
    assert ref is not None and fake.for_token("interaction-token-late")
    picture = tmp_path_factory.mktemp("late") / "result.png"
    Image.new("RGB", (8, 8)).save(picture)
    expired = {**hook, "expires_at": time.time() - 1}  # 15 minutes later: the token is dead
    before = len(fake.messages)
    await adapter.deliver(Reply(reply_to={**reply_to, "interaction": expired}, text="Done @everyone",
                                media=(Media(picture, "photo", "Done"),),
                                edit_of={**ref, "interaction": expired}))
    [late] = fake.messages[before:]
    assert late.via == "channel" and late.channel_id == CHANNEL_ID and late.filenames == ["stylebot.png"]
    assert late.allowed_mentions == {"parse": []}  # "@everyone" in the text pings nobody
    assert not fake.for_token("interaction-token-late")[0].edits


async def test_logs_hold_neither_the_token_nor_face_data(world: World) -> None:
    """All of the above, as logged by the bot and by the engine process, both at DEBUG."""
    fake, media = world.fake, world.service.media
    bot_log, engine_log = world.logs.text(), read_log(world.engine_log)
    assert "discord.gateway DEBUG: " in bot_log and "connected to Discord as" in bot_log
    assert "engine worker discord-e2e ready" in engine_log and "invert job(s)" in engine_log
    assert "DEBUG aiosqlite" not in engine_log  # libraries log at INFO at most, whatever log_level says
    stored = [media.read(key) for key in list(media.keys())]  # photos, aligned faces, renders
    async with world.service.sessions() as s:
        latents = (await s.scalars(select(Face.latent))).all()  # the faces /forget left
    face_data = list(dict.fromkeys([*(data for data, _ in fake.files.values()), *fake.uploads,
                                    *stored, *latents]))
    assert len(latents) >= 3 and len(face_data) > 20
    for name, text in (("bot", bot_log), ("engine", engine_log)):
        scan = assert_no_private_data(text, secrets=[TOKEN], face_data=face_data)
        print(f"discord {name} log: {scan} scanned, {len(face_data)} blobs of face data")
    assert not fake.unauthorized
