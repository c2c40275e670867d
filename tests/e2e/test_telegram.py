"""Telegram end to end: the real python-telegram-bot client against a local fake Bot API server, the
real service and a real engine process on the demo model.

One world per installation kind (one engine process each): SQLite with the local queue, and PostgreSQL
with the Redis queue (scale-out). In each, the tests run in order and build on each other: alice saves
a selfie in private, alice and bob save theirs in a group, morph, privacy, edit, forget.
Everything logged meanwhile (this process at DEBUG, the engine's output) is checked last for the token
and for face data.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from log_privacy import LogCapture, assert_no_private_data, capturing_logs, read_log
from PIL import Image
from postgres_db import fresh_postgres_database
from servers import empty_redis, scale_out_config
from sqlalchemy import func, select
from telegram import Update

from bot.adapters.telegram import TelegramAdapter
from bot.parse import COMMANDS
from bot.replies import USER_JOBS_OPEN
from settings import load_config
from storage.media import MediaStore
from storage.models import Face, Job, User

from .fake_telegram import FakeChat, FakeTelegram, FakeUser
from .telegram_world import CONFIG, TOKEN, World, astronaut, dm, jpeg, replying_to, running_world

pytestmark = pytest.mark.asyncio(loop_scope="module")

ALICE = FakeUser(id=1001, first_name="Alice", username="alice")
BOB = FakeUser(id=1002, first_name="Bob", username="bob")
CAROL = FakeUser(id=1003, first_name="Carol", username="carol")
DAN = FakeUser(id=1004, first_name="Dan", username="dan")
# No username; her name starts beyond the Basic Multilingual Plane (entity offsets count UTF-16).
ZOE = FakeUser(id=1006, first_name="\N{CHERRY BLOSSOM} Zo\N{LATIN SMALL LETTER E WITH DIAERESIS}")
GROUP = FakeChat(id=-100500, type="supergroup", title="Face Club")

@pytest.fixture(scope="module")
def logs() -> Iterator[LogCapture]:
    """Everything this process logs while the module runs, every logger at DEBUG (PTB, its HTTP
    client, the bot): checked by the last test."""
    with capturing_logs() as capture:
        yield capture


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=["sqlite", "postgresql+redis"])
async def world(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
                logs: LogCapture) -> AsyncIterator[World]:
    """The whole flow once on one machine's defaults (SQLite, the local queue) and once as a
    scale-out installation runs it (PostgreSQL, the Redis queue, the engine as a queue worker)."""
    # The engine process logs at DEBUG too (its output goes to world.engine_log).
    config_text = '[bot]\nlog_level = "DEBUG"\n' + CONFIG
    async with contextlib.AsyncExitStack() as stack:
        if request.param == "postgresql+redis":
            redis_url = await empty_redis(request.getfixturevalue("redis_url"))
            db_url = await stack.enter_async_context(
                fresh_postgres_database(request.getfixturevalue("postgres_url")))
            config_text += scale_out_config(db_url=db_url, redis_url=redis_url)
        w = await stack.enter_async_context(running_world(tmp_path_factory.mktemp("telegram"),
                                                          config_text=config_text))
        assert w.config.queue.backend == ("redis" if request.param == "postgresql+redis" else "local")
        yield w


async def test_private_selfie_saves_the_face_and_shows_the_panel(world: World) -> None:
    tg = world.tg
    commands = tg.called("setMyCommands")[0].params["commands"]
    assert {c["command"] for c in commands} == set(COMMANDS)
    msg = await tg.send_photo(ALICE, dm(ALICE), astronaut())
    progress = await tg.wait_for("sendMessage", replying_to(msg), timeout=20)
    assert "queue" in progress.params["text"]
    photo = await tg.wait_for("sendPhoto", replying_to(msg), timeout=120)
    caption = photo.params["caption"]
    assert "Saved as your face" in caption and "not a face model" in caption
    assert "parse_mode" not in photo.params
    panel = Image.open(io.BytesIO(photo.files["photo"]))
    assert panel.width >= 2 * panel.height  # aligned | reconstruction, side by side
    mid = progress.result["message_id"]
    await tg.wait_for("editMessageText", lambda c: c.params["message_id"] == mid, timeout=10)
    # The bot downloaded the large photo, not the thumbnail.
    assert tg.called("getFile")[-1].params["file_id"] == msg["photo"][-1]["file_id"]


async def test_group_selfies_then_morph_sends_an_mp4(world: World) -> None:
    tg = world.tg
    ignored = await tg.send_photo(CAROL, GROUP, astronaut(3))  # a plain photo in a group: not for us
    a = await tg.send_photo(ALICE, GROUP, astronaut(2), caption="/selfie")
    b = await tg.send_photo(BOB, GROUP, astronaut(6), caption="/selfie@stylebot_test_bot")
    for msg in (a, b):
        done = await tg.wait_for("sendPhoto", replying_to(msg), timeout=120)
        assert "Saved as your face" in done.params["caption"]
    assert not [c for c in tg.calls if replying_to(ignored)(c)]
    n = len(tg.calls)
    morph = await tg.send_text(ALICE, GROUP, "/morph @alice @bob 8")
    video = await tg.wait_for("sendVideo", replying_to(morph), timeout=120, after=n)
    data = video.files["video"]
    assert data[4:8] == b"ftyp" and len(data) > 1000
    assert video.params["caption"].startswith("Morph: Alice to Bob, ")
    assert str(video.params.get("supports_streaming")).lower() == "true"
    # Carol answers her own plain photo with /selfie: now it counts, and the photo replied to is used.
    reply = await tg.send_text(CAROL, GROUP, "/selfie", reply_to=ignored["message_id"])
    queued = await tg.wait_for("sendMessage", replying_to(reply), timeout=10)
    assert "queue" in queued.params["text"]
    assert tg.called("getFile")[-1].params["file_id"] == ignored["photo"][-1]["file_id"]
    await tg.wait_for("sendPhoto", replying_to(reply), timeout=120)


def _labels(message: dict[str, Any]) -> list[str]:
    return [b["text"] for row in (message.get("reply_markup") or {}).get("inline_keyboard", []) for b in row]


async def _done_above(tg: FakeTelegram, request: dict[str, Any], after: int) -> dict[str, Any]:
    """The progress message replying to ``request``, once edited into "Done." (with the buttons)."""
    progress = await tg.wait_for("sendMessage", replying_to(request), timeout=20, after=after)
    mid = progress.result["message_id"]
    await tg.wait_for("editMessageText", lambda c: c.params["message_id"] == mid
                      and c.params["text"] == "Done.", timeout=120, after=after)
    return tg.messages[(request["chat"]["id"], mid)]


async def _answer_to(tg: FakeTelegram, query: str) -> dict[str, Any]:
    said = await tg.wait_for("answerCallbackQuery", lambda c: c.params["callback_query_id"] == query,
                             timeout=10)
    return said.params


async def test_buttons_under_a_morph_remake_it_for_anyone_it_may_be_shown_to(world: World) -> None:
    tg = world.tg
    n = len(tg.calls)
    morph = await tg.send_text(ALICE, GROUP, "/morph @alice @bob 6")
    done = await _done_above(tg, morph, n)
    assert _labels(done) == ["As GIF", "Reverse", "Slower", "Faster"]
    # Carol is neither face, but both allow everyone here: she may ask for the GIF. (A morph of n
    # frames loops there and back: 2n - 2 frames.)
    for who, label, method, start in ((CAROL, "As GIF", "sendAnimation", "Morph: Alice to Bob, 10 frames"),
                                      (ALICE, "Reverse", "sendVideo", "Morph: Bob to Alice, 10 frames"),
                                      (ALICE, "Slower", "sendVideo", "Morph: Alice to Bob, 22 frames"),
                                      (BOB, "Faster", "sendVideo", "Morph: Alice to Bob, 4 frames")):
        m = len(tg.calls)
        query = await tg.press(who, done, button=label)
        assert not (await _answer_to(tg, query)).get("text")
        sent = await tg.wait_for(method, replying_to(done), timeout=120, after=m)
        assert sent.params["caption"].startswith(start), (label, sent.params["caption"])
        assert sent.files


async def test_a_tour_of_three_naming_someone_without_a_username(world: World) -> None:
    """Telegram links the name of a person who has no username (a text mention): that person."""
    tg = world.tg
    selfie = await tg.send_photo(ZOE, GROUP, astronaut(4), caption="/selfie")
    await tg.wait_for("sendPhoto", replying_to(selfie), timeout=120)
    # A group tour: alice, zoe, carol, and back to alice (4 frames a leg, each leg's end left out).
    morph = await tg.send_text(ALICE, GROUP, f"/morph @alice {ZOE.first_name} @carol 4", mentions=(ZOE,))
    video = await tg.wait_for("sendVideo", replying_to(morph), timeout=120)
    assert video.params["caption"].startswith(
        f"Morph: Alice to {ZOE.first_name} to Carol and back to Alice, 9 frames")
    lineup = await tg.send_text(CAROL, GROUP, "/lineup smiling face")
    grid = await tg.wait_for("sendPhoto", replying_to(lineup), timeout=120)
    caption = grid.params["caption"]
    assert caption.startswith("Lineup: smiling face") and "(left to right, top to bottom)" in caption
    assert all(name in caption for name in ("Alice", "Bob", "Carol", ZOE.first_name))


async def _morph_jobs(world: World) -> int:
    async with world.service.sessions() as s:
        return int((await s.execute(select(func.count()).select_from(Job).where(Job.kind == "morph")))
                   .scalar_one())


async def test_privacy_ask_asks_bob_in_the_chat_and_waits_for_his_answer(world: World) -> None:
    tg = world.tg
    said = await tg.send_text(BOB, GROUP, "/privacy ask")
    assert "Privacy: ask" in (await tg.wait_for("sendMessage", replying_to(said), timeout=10)).params["text"]
    for answer, who in (("Deny", "no"), ("Allow once", "yes")):
        n = len(tg.calls)
        morph = await tg.send_text(ALICE, GROUP, "/morph @me @bob 4")
        ask = await tg.wait_for("sendMessage", replying_to(morph), timeout=10, after=n)
        assert ask.params["text"].startswith("Bob, Alice would like to use your face in a morph.")
        message = tg.messages[(GROUP.id, ask.result["message_id"])]
        labels = [b["text"] for row in message["reply_markup"]["inline_keyboard"] for b in row]
        assert labels == ["Allow once", "Always allow Alice", "Deny"]
        query = await tg.press(CAROL, message, button="Allow once")  # not hers to answer
        refused = await tg.wait_for("answerCallbackQuery",
                                    lambda c, q=query: c.params["callback_query_id"] == q, timeout=10)
        assert "Only the person who was asked" in refused.params["text"]
        await tg.press(BOB, message, button=answer)
        if who == "no":
            sorry = await tg.wait_for("sendMessage", lambda c, m=morph: replying_to(m)(c)
                                      and c.params["text"].startswith("Sorry"), timeout=30, after=n)
            assert sorry.params["text"] == "Sorry: Bob said no to using their face."
        else:
            video = await tg.wait_for("sendVideo", replying_to(morph), timeout=120, after=n)
            assert video.params["caption"].startswith("Morph: Alice to Bob, ")
    # No answer at all: after [limits] consent_wait_s (5 s here) Alice is told, and a late press
    # changes nothing.
    service = world.service
    waited = service.config
    service.config = waited.model_copy(update={"limits": waited.limits.model_copy(
        update={"consent_wait_s": 5})})
    try:
        n = len(tg.calls)
        morphs = await _morph_jobs(world)
        morph = await tg.send_text(ALICE, GROUP, "/morph @me @bob 4")
        ask = await tg.wait_for("sendMessage", replying_to(morph), timeout=10, after=n)
        late = await tg.wait_for("sendMessage", lambda c: replying_to(morph)(c)
                                 and c.params["text"].startswith("Sorry"), timeout=30, after=n)
        assert late.params["text"] == "Sorry: nobody answered my question within 1 minute."
        query = await tg.press(BOB, tg.messages[(GROUP.id, ask.result["message_id"])], button="Allow once")
        assert "doesn't work any more" in (await _answer_to(tg, query))["text"]
        await asyncio.sleep(1.0)
        assert not [c for c in tg.calls[n:] if c.method == "sendVideo"]
        assert await _morph_jobs(world) == morphs + 1  # the one that waited, failed
    finally:
        service.config = waited


async def test_privacy_nobody_refuses_the_morph_politely(world: World) -> None:
    tg = world.tg
    morphs_before = await _morph_jobs(world)
    bobs = await tg.send_text(BOB, GROUP, "/privacy nobody")
    said = await tg.wait_for("sendMessage", replying_to(bobs), timeout=10)
    assert "Privacy: nobody" in said.params["text"]
    videos = len(tg.called("sendVideo"))
    # Alice replies to Bob's message with /morph: the reply names Bob.
    morph = await tg.send_text(ALICE, GROUP, "/morph", reply_to=bobs["message_id"])
    refusal = await tg.wait_for("sendMessage", replying_to(morph), timeout=10)
    assert "hasn't allowed" in refusal.params["text"]
    by_name = await tg.send_text(ALICE, GROUP, "/morph @me @bob")
    refusal = await tg.wait_for("sendMessage", replying_to(by_name), timeout=10)
    assert refusal.params["text"] == "Sorry, @bob hasn't allowed their face to be used here."
    # A button under an earlier morph of Bob's face is refused the same way, privately.
    earlier = next(m for (chat, _), m in tg.messages.items() if chat == GROUP.id and "Reverse" in _labels(m))
    query = await tg.press(ALICE, earlier, button="Reverse")
    said = await _answer_to(tg, query)
    assert str(said.get("show_alert")).lower() == "true" and "hasn't allowed" in said["text"]
    await asyncio.sleep(1.0)
    assert len(tg.called("sendVideo")) == videos
    assert await _morph_jobs(world) == morphs_before  # refused: no job at all


async def test_edit_sends_the_edited_face(world: World) -> None:
    tg = world.tg
    n = len(tg.calls)
    # /edit! (latent optimisation, 5 steps here): a plain /edit on a fresh demo model first builds
    # the global-direction table, minutes on a small CPU.
    msg = await tg.send_text(ALICE, dm(ALICE), "/edit! smiling face")
    sent = await tg.wait_for("sendMediaGroup", replying_to(msg), timeout=90, after=n)
    media = sent.params["media"]
    assert media[0]["caption"].startswith("Before / after: smiling face")
    assert len(sent.files) == len(media) == 2
    for data in sent.files.values():
        Image.open(io.BytesIO(data)).verify()


async def test_buttons_under_a_selfie_edit_it_for_its_owner_only(world: World) -> None:
    tg = world.tg
    n = len(tg.calls)
    selfie = await tg.send_photo(DAN, GROUP, astronaut(5), caption="/selfie")
    progress = await tg.wait_for("sendMessage", replying_to(selfie), timeout=20, after=n)
    await tg.wait_for("sendPhoto", replying_to(selfie), timeout=120, after=n)
    # The progress message above the result is edited into "Done." with the buttons.
    mid = progress.result["message_id"]
    await tg.wait_for("editMessageText", lambda c: c.params["message_id"] == mid
                      and c.params["text"] == "Done.", timeout=20, after=n)
    message = tg.messages[(GROUP.id, mid)]
    labels = [b["text"] for row in message["reply_markup"]["inline_keyboard"] for b in row]
    assert labels == ["Smile", "Older", "Younger", "Glasses", "Morph with..."]
    edits = await _edit_jobs(world)
    # Carol is in the group but it is not her face; a forged press names a job that never was.
    for who, press in ((CAROL, {"button": "Smile"}), (DAN, {"data": "b1 " + "f" * 32 + " smile"})):
        query = await tg.press(who, message, **press)
        said = await tg.wait_for("answerCallbackQuery",
                                 lambda c, q=query: c.params["callback_query_id"] == q, timeout=10)
        assert str(said.params.get("show_alert")).lower() == "true"
        assert ("Only the person" if who == CAROL else "doesn't work any more") in said.params["text"]
    # The engine builds the demo model's direction table while idle (seconds, one sample a
    # channel): with it, a one-tap edit is a global-direction edit, whose strength can slide.
    for _ in range(240):
        if list((world.home / "directions").glob("*.safetensors")):
            break
        await asyncio.sleep(0.5)
    m = len(tg.calls)
    query = await tg.press(DAN, message, button="Smile")
    answered = await tg.wait_for("answerCallbackQuery", lambda c: c.params["callback_query_id"] == query,
                                 timeout=10)
    assert not answered.params.get("text")  # a press that was taken: the spinner just stops
    done = await _done_above(tg, message, m)
    result = await tg.wait_for("sendMediaGroup", replying_to(message), timeout=120, after=m)
    caption = result.params["media"][0]["caption"]
    assert caption.startswith("Before / after: a smiling face")
    assert await _edit_jobs(world) == edits + 1  # Dan's press only

    # Under the edit: the same edit weaker or stronger, the thorough method, a morph.
    assert _labels(done) == ["Weaker", "Stronger", "Thorough (slower)", "Morph with..."]
    used = float(re.search(r"\(strength (-?[0-9.]+), from -10 to 10\)", caption)[1])
    query = await tg.press(CAROL, done, button="Stronger")
    assert "Only the person" in (await _answer_to(tg, query))["text"]
    for label, expected in (("Stronger", f"(strength {used + 2:g}, from -10 to 10)"),
                            ("Weaker", f"(strength {used - 2:g}, from -10 to 10)"),
                            ("Thorough (slower)", "a smiling face")):
        m = len(tg.calls)
        await tg.press(DAN, done, button=label)
        again = await tg.wait_for("sendMediaGroup", replying_to(done), timeout=120, after=m)
        said = again.params["media"][0]["caption"]
        assert said.startswith("Before / after: a smiling face") and expected in said, (label, said)
        assert len(again.files) == 2
    assert "strength" not in said  # the thorough method has no strength to slide
    assert await _edit_jobs(world) == edits + 4
    m = len(tg.calls)
    await tg.press(DAN, done, button="Morph with...")
    whom = await tg.wait_for("sendMessage", lambda c: c.params["text"].startswith("Morph with whom?"),
                             timeout=10, after=m)
    people = tg.messages[(GROUP.id, whom.result["message_id"])]
    assert _labels(people) == [ZOE.first_name, "Carol", "Alice"]  # not Dan, not Bob (nobody)
    await tg.press(DAN, people, button="Alice")
    video = await tg.wait_for("sendVideo", replying_to(people), timeout=120, after=m)
    assert video.params["caption"].startswith("Morph: Dan to Alice, ")


async def _edit_jobs(world: World) -> int:
    async with world.service.sessions() as s:
        count = select(func.count()).select_from(Job).where(Job.kind == "edit")
        return int((await s.execute(count)).scalar_one())


async def test_files_that_are_not_photos_get_a_clear_reply(world: World) -> None:
    tg = world.tg
    text_file = await tg.send_document(CAROL, dm(CAROL), b"hello, not a face\n", file_name="notes.txt",
                                       mime_type="text/plain")
    said = await tg.wait_for("sendMessage", replying_to(text_file), timeout=10)
    assert "isn't a photo" in said.params["text"]
    big = await tg.send_document(CAROL, dm(CAROL), astronaut(), file_name="big.jpg",
                                 mime_type="image/jpeg", file_size=5 * 1024 * 1024)
    said = await tg.wait_for("sendMessage", replying_to(big), timeout=10)
    assert "too large" in said.params["text"]
    selfie_alone = await tg.send_text(CAROL, dm(CAROL), "/selfie")
    said = await tg.wait_for("sendMessage", replying_to(selfie_alone), timeout=10)
    assert "caption of a photo" in said.params["text"]


async def test_a_photo_without_a_face_says_so(world: World) -> None:
    tg = world.tg
    gradient = jpeg(Image.linear_gradient("L").convert("RGB"))
    msg = await tg.send_photo(CAROL, dm(CAROL), gradient)
    progress = await tg.wait_for("sendMessage", replying_to(msg), timeout=10)
    mid = progress.result["message_id"]
    failed = await tg.wait_for("editMessageText", lambda c: c.params["message_id"] == mid
                               and c.params["text"].startswith("Sorry"), timeout=120)
    assert "No face" in failed.params["text"]


async def test_forget_yes_erases_the_user(world: World) -> None:
    tg = world.tg
    ask = await tg.send_text(ALICE, dm(ALICE), "/forget")
    said = await tg.wait_for("sendMessage", replying_to(ask), timeout=10)
    assert "/forget yes" in said.params["text"]
    yes = await tg.send_text(ALICE, dm(ALICE), "/forget yes")
    said = await tg.wait_for("sendMessage", replying_to(yes), timeout=10)
    assert "erased everything" in said.params["text"]
    async with world.service.sessions() as s:
        users = (await s.execute(select(User).where(User.platform == "telegram"))).scalars().all()
        assert {u.platform_user_id for u in users} == {str(p.id) for p in (BOB, CAROL, DAN, ZOE)}
        faces = (await s.execute(select(Face))).scalars().all()
        assert sorted(f.user_id for f in faces) == sorted(u.id for u in users)  # everyone's but alice's


async def test_too_many_open_jobs_get_a_clear_reply(world: World) -> None:
    tg = world.tg
    dave = FakeUser(id=1004, first_name="Dave", username="dave")
    cap = world.config.limits.per_user_open_jobs
    sent = [await tg.send_photo(dave, dm(dave), astronaut(i)) for i in range(cap + 1)]
    answers = [await tg.wait_for("sendMessage", replying_to(m), timeout=20) for m in sent]
    texts = [a.params["text"] for a in answers]
    assert sum("queue" in t for t in texts) == cap
    assert texts.count(USER_JOBS_OPEN) == 1
    for msg, text in zip(sent, texts, strict=True):  # the queued ones still finish
        if text != USER_JOBS_OPEN:
            await tg.wait_for("sendPhoto", replying_to(msg), timeout=180)


async def test_logs_hold_neither_the_token_nor_face_data(world: World, logs: LogCapture) -> None:
    """All of the above, as logged by the bot (at DEBUG) and the engine process."""
    bot_log = logs.text()
    engine_log = read_log(world.engine_log)
    assert "/bot<token>/getUpdates" in bot_log  # PTB's HTTP client logged its URLs, token redacted
    assert "telegram: polling as @" in bot_log
    assert "engine worker tg-e2e ready" in engine_log and "invert job(s)" in engine_log
    media = MediaStore(world.config.media_dir)  # photos, aligned faces, reconstructions, results
    stored = [media.read(key) for key in list(media.keys())]
    async with world.service.sessions() as s:
        latents = (await s.scalars(select(Face.latent))).all()  # the faces /forget left
    face_data = list(dict.fromkeys([*world.tg.files.values(), *stored, *latents]))  # sent, made, kept
    assert len(latents) >= 3 and len(face_data) > 20
    for name, text in (("bot", bot_log), ("engine", engine_log)):
        scan = assert_no_private_data(text, secrets=[TOKEN], face_data=face_data)
        print(f"telegram {name} log: {scan} scanned, {len(face_data)} blobs of face data")


async def test_building_the_adapter_logs_no_token(tmp_path: Path) -> None:
    token = "987654321:AAF-another_SECRET_token"  # not the world's: its running adapter redacts that one
    path = tmp_path / "config.toml"
    path.write_text(CONFIG.format(base_url="http://127.0.0.1:9/bot", base_file_url="http://127.0.0.1:9/file/bot"))
    config = load_config(path, env={"STYLEBOT_HOME": str(tmp_path), "TELEGRAM_BOT_TOKEN": token})
    with capturing_logs() as capture:
        TelegramAdapter(config)
    assert capture.lines  # PTB said something
    assert_no_private_data(capture.text(), secrets=[token])


async def test_a_flooding_group_does_not_hold_up_other_chats(tmp_path: Path) -> None:
    """Handling a group message ends with a reply there, which Telegram's ~20 messages a minute per
    group holds back. 100 such messages, their handlers all waiting, must not keep a private
    message from being handled; the group's own wait their turn (8 at a time) and all run."""
    path = tmp_path / "config.toml"
    path.write_text(CONFIG.format(base_url="http://127.0.0.1:9/bot", base_file_url="http://127.0.0.1:9/file/bot"))
    config = load_config(path, env={"STYLEBOT_HOME": str(tmp_path), "TELEGRAM_BOT_TOKEN": TOKEN})
    processor = TelegramAdapter(config).app.update_processor
    replies_allowed = asyncio.Event()
    handled: list[str] = []

    async def handle(who: str) -> None:
        handled.append(who)
        if who == "group":
            await replies_allowed.wait()

    def update(n: int, chat: FakeChat) -> Update:
        message = {"message_id": n, "date": 0, "text": "/help", "chat": chat.json(),
                   "from": CAROL.json()}
        return Update.de_json({"update_id": n, "message": message}, None)

    flood = [asyncio.create_task(processor.process_update(update(n, GROUP), handle("group")))
             for n in range(100)]
    await asyncio.sleep(0.1)
    await asyncio.wait_for(processor.process_update(update(100, dm(CAROL)), handle("private")), 5)
    assert handled.count("private") == 1
    assert 1 <= handled.count("group") <= 8
    replies_allowed.set()
    await asyncio.wait_for(asyncio.gather(*flood), 5)
    assert handled.count("group") == 100
