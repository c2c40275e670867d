"""Service policy against a real SQLite file and a real PostgreSQL database (no engine needed): limits,
consent, erasure."""

from __future__ import annotations

import asyncio
import io
import itertools
import json
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from postgres_db import BACKENDS, fresh_postgres_database
from service_on_disk import service_on_disk
from sqlalchemy import func, select, update

import storage.repo as repo
from bot import buttons
from bot.commands import (
    Edit,
    Forget,
    Help,
    Lineup,
    Mix,
    Morph,
    Origin,
    Press,
    Reply,
    Selfie,
    SetPrivacy,
    ShowFaces,
    Target,
)
from bot.replies import (
    ANSWERED,
    DELETED,
    LINEUP_NOBODY,
    MORPH_WITH_WHOM,
    NOT_YOURS_TO_ANSWER,
)
from bot.service import Service
from storage.models import Face, Job, User, utcnow
from storage.specs import EditSpec, JobSpec, LineupSpec, MorphSpec

from .drills import Inbox


@pytest.fixture(params=BACKENDS)
async def storage_url(request: pytest.FixtureRequest) -> AsyncIterator[str]:
    """"" (the default: SQLite under the data dir), or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        yield ""
        return
    async with fresh_postgres_database(request.getfixturevalue("postgres_url")) as db_url:
        yield db_url


@pytest.fixture
async def svc(tmp_path: Path, storage_url: str) -> AsyncIterator[tuple[Service, Inbox]]:
    inbox = Inbox()
    config = ("[limits]\nper_user_open_jobs = 2\nper_user_per_minute = 4\n"
              f"[storage]\nurl = {json.dumps(storage_url)}\n")
    async with service_on_disk(tmp_path, config, inbox.deliver) as service:
        yield service, inbox


def _photo(seed: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((64, 64, 3), seed, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _origin(user: str, chat: str = "g1") -> Origin:
    return Origin(platform="test", user_id=user, chat_id=chat, chat_kind="group", username=user,
                  reply_to={"chat": chat})


async def _count(service: Service, model: type) -> int:
    async with service.sessions() as s:
        return int((await s.execute(select(func.count()).select_from(model))).scalar_one())


async def _give_face(service: Service, user: str, chat: str = "g1") -> None:
    """Store a finished face for a user as the engine would (share it in the chat)."""
    async with service.sessions.begin() as s:
        u = await repo.get_or_create_user(s, platform="test", platform_user_id=user, username=user)
        c = await repo.get_or_create_chat(s, platform="test", platform_chat_id=chat, kind="group")
        await repo.add_member(s, chat_id=c.id, user_id=u.id)
        key = service.media.put(_photo(hash(user) % 200), suffix=".png")
        face = await repo.save_face(s, job_id=f"job-{user}", user_id=u.id, label="default",
                                    model_id="m", latent=np.zeros((4, 8), np.float32),
                                    aligned_key=key, photo_key=key, reconstruction_key=key,
                                    alignment={}, quality={"psnr": 20.0})
        await repo.share_face(s, face_id=face.id, chat_id=c.id)


async def test_open_job_and_rate_limits_refuse_without_storing(svc: tuple[Service, Inbox]) -> None:
    service, inbox = svc
    await service.handle(Selfie(origin=_origin("ann"), photo=_photo(1)))
    await service.handle(Selfie(origin=_origin("ann"), photo=_photo(2)))
    assert await _count(service, Job) == 2
    await service.handle(Selfie(origin=_origin("ann"), photo=_photo(3)))
    assert "already have work in progress" in inbox.last and await _count(service, Job) == 2
    await service.handle(Selfie(origin=_origin("ann"), photo=_photo(4)))  # 4th command this minute
    await service.handle(Selfie(origin=_origin("ann"), photo=_photo(5)))  # 5th: over the limit of 4
    assert "faster than I can keep up" in inbox.last and await _count(service, Job) == 2
    await service.handle(Selfie(origin=_origin("bob"), photo=_photo(5)))  # others still served
    assert await _count(service, Job) == 3


async def test_bad_uploads_get_clear_replies(svc: tuple[Service, Inbox]) -> None:
    service, inbox = svc
    for data, needle in [(b"", "empty"), (b"hello", "doesn't look"),
                         (b"\xff\xd8\xff" + b"0" * (21 * 1024 * 1024), "too large")]:
        await service.handle(Selfie(origin=_origin("cyd"), photo=data))
        assert needle in inbox.last
    assert await _count(service, Job) == 0


async def test_consent_matrix(svc: tuple[Service, Inbox]) -> None:
    service, inbox = svc
    ticks = itertools.count(step=61)  # a minute passes between commands: no rate limit here
    service.clock = lambda: float(next(ticks))
    await _give_face(service, "ann")
    await _give_face(service, "bob")
    await _give_face(service, "eve", chat="other")
    morph = Morph(origin=_origin("ann"), a=Target(me=True), b=Target(username="bob"), frames=8)
    await service.handle(morph)  # default policy "chat": bob shared in g1
    assert "queue" in inbox.last
    await service.handle(Morph(origin=_origin("ann"), a=Target(me=True), b=Target(username="eve")))
    assert "hasn't allowed" in inbox.last  # eve shared only in another chat
    await service.handle(SetPrivacy(origin=_origin("eve", chat="other"), policy="everyone"))
    await service.handle(Morph(origin=_origin("ann"), a=Target(me=True), b=Target(username="@EVE")))
    assert "queue" in inbox.last
    await service.handle(SetPrivacy(origin=_origin("bob"), policy="nobody"))
    jobs = await _count(service, Job)
    await service.handle(morph)
    assert "hasn't allowed" in inbox.last and await _count(service, Job) == jobs
    await service.handle(Morph(origin=_origin("ann"), a=Target(me=True), b=Target(username="zed")))
    assert "don't know @zed" in inbox.last
    await service.handle(Morph(origin=_origin("ann"), a=Target(me=True), b=Target(me=True)))
    assert inbox.last == "A morph needs different faces: each person once."
    await service.handle(Mix(origin=_origin("ann"), a=Target(me=True), b=Target(me=True)))
    assert inbox.last == "A mix needs different faces: each person once."
    assert await _count(service, Job) == jobs


async def test_forget_erases_rows_and_files_but_not_shared_files(svc: tuple[Service, Inbox]) -> None:
    service, inbox = svc
    await _give_face(service, "ann")
    await _give_face(service, "bob")
    await service.handle(Selfie(origin=_origin("ann"), photo=_photo(7)))
    same_photo = _photo(9)
    await service.handle(Selfie(origin=_origin("ann", chat="g2"), photo=same_photo))
    await service.handle(Selfie(origin=_origin("bob"), photo=same_photo))  # bob sent the same file
    files_before = set(service.media.keys())
    await service.handle(Forget(origin=_origin("ann")))
    assert "/forget yes" in inbox.last and await _count(service, User) == 2
    await service.handle(Forget(origin=_origin("ann"), confirmed=True))
    assert "erased everything" in inbox.last
    async with service.sessions() as s:
        assert await repo.find_user(s, platform="test", platform_user_id="ann") is None
        left = (await s.execute(select(Job))).scalars().all()
    assert all(j.user_id is not None for j in left) and len(left) == 1  # bob's job only
    assert await _count(service, Face) == 1
    remaining = set(service.media.keys())
    assert remaining < files_before
    assert service.media.exists(left[0].payload["photo_key"])  # bob's copy of the photo stays


async def test_me_privacy_and_help(svc: tuple[Service, Inbox]) -> None:
    service, inbox = svc
    await service.handle(ShowFaces(origin=_origin("ann")))
    assert "no saved faces" in inbox.last
    await _give_face(service, "ann")
    await service.handle(ShowFaces(origin=_origin("ann")))
    assert "default" in inbox.last and len(inbox.replies[-2].media) == 1  # pictures, then the list
    await service.handle(SetPrivacy(origin=_origin("ann")))
    assert "Privacy: chat" in inbox.last
    await service.handle(Help(origin=_origin("ann")))
    assert "/morph" in inbox.last and "/forget" in inbox.last


@pytest.mark.parametrize("policy", ["everyone", "chat", "nobody"])
@pytest.mark.parametrize("presence", ["shared here", "member, shared elsewhere", "never here"])
@pytest.mark.parametrize("asker", ["owner", "other"])
@pytest.mark.parametrize("command", [Morph, Mix])
@pytest.mark.parametrize("owner_first", [False, True])
async def test_consent_matrix_policy_by_presence_by_asker(
    svc: tuple[Service, Inbox], policy: str, presence: str, asker: str, command: type[Morph | Mix],
    owner_first: bool,
) -> None:
    """Who may put the owner's face in a morph or mix asked for in chat g1: the owner always; anyone
    else when the policy is "everyone", or "chat" and the owner shared a face in g1; never "nobody".
    Whichever of the two faces is the owner's."""
    service, inbox = svc
    await _give_face(service, "asker", chat="g1")
    await _give_face(service, "owner", chat="g1" if presence == "shared here" else "other")
    if presence == "member, shared elsewhere":  # the owner talks in g1 but shared the face elsewhere
        await service.handle(ShowFaces(origin=_origin("owner", chat="g1")))
    await service.handle(SetPrivacy(origin=_origin("owner", chat="other"), policy=policy))
    jobs = await _count(service, Job)
    people = [Target(username="asker"), Target(username="owner")][::-1 if owner_first else 1]
    await service.handle(command(origin=_origin("owner" if asker == "owner" else "asker", chat="g1"),
                                 a=people[0], b=people[1]))
    allowed = asker == "owner" or policy == "everyone" or (policy == "chat" and presence == "shared here")
    if allowed:
        assert "queue" in inbox.last and await _count(service, Job) == jobs + 1
    else:
        assert inbox.last == "Sorry, @owner hasn't allowed their face to be used here."
        assert await _count(service, Job) == jobs


async def test_a_chat_held_back_by_its_platform_does_not_hold_up_other_chats(
    svc: tuple[Service, Inbox]
) -> None:
    """Telegram lets a bot send ~20 messages a minute to one group: while the replies to group A
    wait for that, the reply to group B goes out."""
    service, _ = svc
    async with service.sessions.begin() as s:
        for chat_name in ("A", "A", "B"):
            chat = await repo.get_or_create_chat(s, platform="test", platform_chat_id=chat_name,
                                                 kind="group")
            job = await repo.create_job(s, kind="mix", model="m", payload={}, user_id=None,
                                        chat_id=chat.id, reply_to={"platform": "test", "chat": chat_name})
            await repo.claim_jobs(s, worker="w", kinds=None, limit=1, lease_s=60)
            await repo.fail_job(s, job_id=job.id, worker="w", error="no such faces", code="engine_error")
    group_a_may_send = asyncio.Event()
    delivered: list[str] = []

    async def deliver(reply: Reply) -> dict[str, int]:
        if reply.reply_to["chat"] == "A":
            await group_a_may_send.wait()  # the per-group send limit
        delivered.append(reply.reply_to["chat"])
        return {"message_id": len(delivered)}

    pump = asyncio.create_task(Service(
        sessions=service.sessions, queue=service.queue, media=service.media, config=service.config,
        deliver=deliver).pump_once())
    for _ in range(100):
        if delivered:
            break
        await asyncio.sleep(0.02)
    assert delivered == ["B"]  # not behind the two older replies to A
    group_a_may_send.set()
    assert await asyncio.wait_for(pump, 10) == 3
    assert delivered == ["B", "A", "A"]


async def _finished(service: Service, user: str, spec: JobSpec, result: dict[str, object]) -> Job:
    """A job of ``user``'s that the engine finished with ``result``."""
    async with service.sessions.begin() as s:
        u = await repo.find_user(s, platform="test", platform_user_id=user)
        assert u is not None
        job = await repo.create_job(s, kind=spec.kind, model="m", payload=spec.payload(), user_id=u.id,
                                    chat_id=None, reply_to={"chat": "g1"})
        job.status, job.result = "done", result
    return job


async def _jobs(service: Service, kind: str) -> list[Job]:
    async with service.sessions() as s:
        rows = await s.execute(select(Job).where(Job.kind == kind).order_by(Job.created_at))
        return list(rows.scalars())


async def _face_id(service: Service, user: str) -> int:
    async with service.sessions() as s:
        u = await repo.find_user(s, platform="test", platform_user_id=user)
        assert u is not None
        face = await repo.latest_face(s, user_id=u.id)
        assert face is not None
        return face.id


async def test_buttons_under_an_edit_ask_for_the_same_edit_weaker_or_stronger(
    svc: tuple[Service, Inbox],
) -> None:
    service, inbox = svc
    ticks = itertools.count(step=61)
    service.clock = lambda: float(next(ticks))
    await _give_face(service, "ann")
    await _give_face(service, "bob")
    face = await _face_id(service, "ann")
    edit = await _finished(service, "ann", EditSpec(face_id=face, text="smiling face"),
                           {"method": "global", "strength": 4.0, "face_key": "k"})
    labels = [b.label for row in buttons.buttons_for(edit) for b in row]
    assert labels == ["Weaker", "Stronger", "Thorough (slower)", "Morph with..."]
    await service.handle(Press(origin=_origin("bob"), data=buttons.encode(edit.id, "morphwith")))
    assert "Only the person whose face it is" in inbox.last
    await service.handle(Press(origin=_origin("ann"), data=buttons.encode(edit.id, "morphwith")))
    assert inbox.last == MORPH_WITH_WHOM, inbox.last
    assert [b.label for row in inbox.replies[-1].buttons for b in row] == ["@bob"]
    await service.handle(Press(origin=_origin("ann"), data=buttons.encode(edit.id, "stronger")))
    assert "queue" in inbox.last
    await service.handle(Press(origin=_origin("ann"), data=buttons.encode(edit.id, "weaker")))
    await service.handle(Press(origin=_origin("ann"), data=buttons.encode(edit.id, "thorough")))
    assert "already have work in progress" in inbox.last  # a press is held to a command's limits
    async with service.sessions.begin() as s:
        for job in await _jobs(service, "edit"):
            (await s.merge(job)).status = "done"
    await service.handle(Press(origin=_origin("ann"), data=buttons.encode(edit.id, "thorough")))
    made = [j.spec for j in await _jobs(service, "edit")][1:]
    assert made == [EditSpec(face_id=face, text="smiling face", strength=6.0),
                    EditSpec(face_id=face, text="smiling face", strength=2.0),
                    EditSpec(face_id=face, text="smiling face", method="optimize")]
    # Someone else's press, a forged job id, a button this result never had, garbage: refused,
    # privately, and nothing is queued.
    before = await _count(service, Job)
    for who, data, answer in [("bob", buttons.encode(edit.id, "stronger"), "Only the person"),
                              ("ann", buttons.encode("0" * 32, "stronger"), "doesn't work any more"),
                              ("ann", buttons.encode(edit.id, "gif"), "doesn't work any more"),
                              ("ann", "b1 ../../etc stronger", "doesn't work any more")]:
        await service.handle(Press(origin=_origin(who), data=data))
        assert answer in inbox.last and inbox.replies[-1].private
    assert await _count(service, Job) == before


async def test_a_job_done_before_its_queued_note_went_out_still_answers_in_the_note(
    svc: tuple[Service, Inbox],
) -> None:
    """On a GPU a job can end while "Got it" is still on its way: the reply waits for the note
    and replaces it (else the note says "in the queue" for ever, and an album loses its buttons)."""
    service, inbox = svc
    await _give_face(service, "ann")
    pumped: list[int] = []

    async def deliver(reply: Reply) -> dict[str, int]:
        ref = await inbox.deliver(reply)
        if reply.text.startswith("Got it"):
            async with service.sessions.begin() as s:  # the engine is quicker than the platform
                job = (await s.execute(select(Job).where(Job.kind == "edit"))).scalar_one()
                job.status, job.error = "failed", "the engine stopped"
            pumped.append(await service.pump_once())
        return ref

    service.replies.deliver = deliver
    await service.handle(Edit(origin=_origin("ann"), text="smiling face"))
    note = next(i for i, r in enumerate(inbox.replies) if r.text.startswith("Got it"))
    assert pumped == [0] and len(inbox.replies) == note + 1  # nothing beside the note meanwhile
    assert await service.pump_once() == 1
    assert inbox.last == "Sorry: the engine stopped"
    assert inbox.replies[-1].edit_of == {"message_id": note + 1}  # in place of the note


async def test_buttons_under_a_morph_check_consent_again(svc: tuple[Service, Inbox]) -> None:
    service, inbox = svc
    ticks = itertools.count(step=61)
    service.clock = lambda: float(next(ticks))
    await _give_face(service, "ann")
    await _give_face(service, "bob")
    ann, bob = await _face_id(service, "ann"), await _face_id(service, "bob")
    morph = await _finished(service, "ann", MorphSpec(a_id=ann, b_id=bob, frames=8, names=["Ann", "Bob"]),
                            {"format": "mp4", "media_key": "k"})
    # Bob is in the morph and the chat: he may press too; ann's face first, his second.
    await service.handle(Press(origin=_origin("bob"), data=buttons.encode(morph.id, "reverse")))
    await service.handle(Press(origin=_origin("ann"), data=buttons.encode(morph.id, "gif")))
    await service.handle(Press(origin=_origin("ann"), data=buttons.encode(morph.id, "slower")))
    made = [j.spec for j in await _jobs(service, "morph")][1:]
    assert made == [MorphSpec(a_id=bob, b_id=ann, frames=8, names=["Bob", "Ann"]),
                    MorphSpec(a_id=ann, b_id=bob, frames=8, format="gif", names=["Ann", "Bob"]),
                    MorphSpec(a_id=ann, b_id=bob, frames=16, names=["Ann", "Bob"])]
    await service.handle(SetPrivacy(origin=_origin("ann"), policy="nobody"))
    before = await _count(service, Job)
    await service.handle(Press(origin=_origin("bob"), data=buttons.encode(morph.id, "faster")))
    assert "@ann hasn't allowed" in inbox.last and await _count(service, Job) == before


async def test_the_queued_note_estimates_from_recent_runs(svc: tuple[Service, Inbox]) -> None:
    service, inbox = svc
    await service.handle(Selfie(origin=_origin("ann"), photo=_photo(1)))
    assert inbox.last == "Got it. Your selfie is next in the queue."  # nothing has run yet: no guess
    async with service.sessions.begin() as s:  # the engine ran it: 12 s from claim to result
        [job] = (await s.execute(select(Job))).scalars().all()
        job.status, job.started_at = "done", utcnow() - timedelta(seconds=12)
        job.finished_at = utcnow()
    await service.handle(Selfie(origin=_origin("bob"), photo=_photo(2)))
    assert inbox.last == "Got it. Your selfie is next in the queue. It should be ready in about 10 s."
    await service.handle(Selfie(origin=_origin("cyd"), photo=_photo(3)))
    assert inbox.last == ("Got it. 1 job is ahead of yours in the queue. "
                          "It should be ready in about 10 s.")  # both fit one batch


async def _selfie_done(service: Service, user: str) -> tuple[Job, set[str]]:
    """A selfie the engine inverted: the job, its face, and the four files they name."""
    await _give_face(service, f"{user}-friend")  # someone else's files, which must stay
    async with service.sessions.begin() as s:
        u = await repo.get_or_create_user(s, platform="test", platform_user_id=user, username=user)
        keys = [service.media.put(_photo(i) + user.encode(), suffix=".png") for i in range(4)]
        job = await repo.create_job(s, kind="invert", model="m", payload={"photo_key": keys[0]},
                                    user_id=u.id, chat_id=None, reply_to={"chat": "g1"})
        job.status, job.result = "done", {"panel_key": keys[3]}
        await repo.save_face(s, job_id=job.id, user_id=u.id, label="default", model_id="m",
                             latent=np.zeros((4, 8), np.float32), aligned_key=keys[1], photo_key=keys[0],
                             reconstruction_key=keys[2], alignment={}, quality={"psnr": 30.0})
    return job, set(keys)


async def test_the_gallery_deletes_one_item_with_every_file_of_it(svc: tuple[Service, Inbox]) -> None:
    service, inbox = svc
    selfie, face_files = await _selfie_done(service, "ann")
    edit_files = {service.media.put(_photo(9) + bytes([i]), suffix=".png") for i in range(3)}
    k1, k2, k3 = sorted(edit_files)
    await _finished(service, "ann", EditSpec(face_id=await _face_id(service, "ann"), text="smiling face"),
                    {"before_after_key": k1, "pasted_key": k2, "face_key": k3, "method": "global"})
    await service.handle(ShowFaces(origin=_origin("ann")))
    assert '1. edit "smiling face"' in inbox.last
    rows = inbox.replies[-1].buttons
    assert [b.label for row in rows for b in row] == ["Delete face default", "Delete result 1"]
    delete_face, delete_edit = rows[0]
    everything = set(service.media.keys())
    for who, data in (("bob", delete_face.data), ("bob", delete_edit.data),
                      ("ann", f"b1 {'0' * 32} delete")):
        await service.handle(Press(origin=_origin(who), data=data))
        assert "doesn't work any more" in inbox.last and inbox.replies[-1].private
    assert set(service.media.keys()) == everything

    await service.handle(Press(origin=_origin("ann"), data=delete_edit.data))
    assert inbox.last == DELETED and inbox.replies[-1].private
    assert set(service.media.keys()) == everything - edit_files  # every file of the edit, no other
    assert len(await _jobs(service, "edit")) == 0
    await service.handle(Press(origin=_origin("ann"), data=delete_face.data))
    assert set(service.media.keys()) == everything - edit_files - face_files
    assert await _count(service, Face) == 1 and not await _jobs(service, "invert")  # the friend's stays
    await service.handle(Press(origin=_origin("ann"), data=delete_face.data))
    assert "doesn't work any more" in inbox.last


async def test_a_group_tour_asks_every_face_and_forget_takes_it_away(svc: tuple[Service, Inbox]) -> None:
    """/morph through three people: each must allow it (whichever place they have), the same face
    twice is refused, long tours share the frames of a two-face morph; forget erases the tour."""
    service, inbox = svc
    for user in ("ann", "bob", "cyd"):
        await _give_face(service, user)
    await service.handle(SetPrivacy(origin=_origin("cyd"), policy="nobody"))
    three = [Target(me=True), Target(username="bob"), Target(username="cyd")]
    await service.handle(Morph(origin=_origin("ann"), a=three[0], b=three[1], more=(three[2],)))
    assert inbox.last == "Sorry, @cyd hasn't allowed their face to be used here."
    await service.handle(SetPrivacy(origin=_origin("cyd"), policy="chat"))
    await service.handle(Morph(origin=_origin("ann"), a=three[0], b=three[1],
                               more=(Target(username="ann"),)))
    assert "each person once" in inbox.last and not await _jobs(service, "morph")
    await service.handle(Morph(origin=_origin("ann"), a=three[0], b=three[1], more=(three[2],),
                               frames=120))
    [tour] = await _jobs(service, "morph")
    faces = [await _face_id(service, u) for u in ("ann", "bob", "cyd")]
    assert tour.spec == MorphSpec(a_id=faces[0], b_id=faces[1], more_ids=faces[2:], frames=80,
                                  names=["@ann", "@bob", "@cyd"])  # 2 x 120 frames shared by 3 legs
    async with service.sessions.begin() as s:
        tour = await s.get(Job, tour.id)
        assert tour is not None
        tour.status, tour.result = "done", {"media_key": service.media.put(b"tour", suffix=".mp4")}
    await service.handle(Forget(origin=_origin("cyd"), confirmed=True))
    assert not await _jobs(service, "morph")  # cyd's face was in it


async def test_a_lineup_takes_everyone_here_who_allows_it(svc: tuple[Service, Inbox]) -> None:
    service, inbox = svc
    await service.handle(Lineup(origin=_origin("ann", chat="empty"), text="smiling face"))
    assert inbox.last == LINEUP_NOBODY and not await _jobs(service, "lineup")
    for user in ("ann", "bob", "cyd"):
        await _give_face(service, user)
    await _give_face(service, "dee", chat="elsewhere")  # not shared here
    await service.handle(SetPrivacy(origin=_origin("cyd"), policy="nobody"))
    await service.handle(Lineup(origin=_origin("ann"), text="smiling face", strength=3))
    assert "queue" in inbox.last
    [job] = await _jobs(service, "lineup")
    ids = {u: await _face_id(service, u) for u in ("ann", "bob")}
    assert job.spec == LineupSpec(face_ids=[ids["bob"], ids["ann"]], text="smiling face", strength=3.0,
                                  names=["@bob", "@ann"])  # latest first; cyd said nobody


async def test_privacy_ask_waits_for_the_answer_allow_always_deny_or_none(
    svc: tuple[Service, Inbox]
) -> None:
    service, inbox = svc
    for user in ("ann", "bob", "cyd"):
        await _give_face(service, user)
    await service.handle(SetPrivacy(origin=_origin("bob"), policy="ask"))

    async def ask() -> tuple[Job, Reply]:
        async with service.sessions.begin() as s:  # the engine ran what was queued before
            await s.execute(update(Job).where(Job.status == "queued").values(status="done"))
        await service.handle(Morph(origin=_origin("ann"), a=Target(me=True), b=Target(username="bob")))
        return (await _jobs(service, "morph"))[-1], inbox.replies[-1]

    job, prompt = await ask()
    assert job.status == "held" and not prompt.private
    assert prompt.text == ("@bob, @ann would like to use your face in a morph. Only you can answer; "
                           "I'll wait 5 minutes.")
    allow_once, always, deny = prompt.buttons[0]
    assert [b.label for b in prompt.buttons[0]] == ["Allow once", "Always allow @ann", "Deny"]
    await service.handle(Press(origin=_origin("cyd"), data=allow_once.data))  # not asked
    assert inbox.last == NOT_YOURS_TO_ANSWER and inbox.replies[-1].private
    await service.handle(Press(origin=_origin("bob"), data=allow_once.data))
    assert inbox.last == ANSWERED["allow"]
    assert (await _jobs(service, "morph"))[-1].status == "queued"
    await service.handle(Press(origin=_origin("bob"), data=deny.data))  # answered already
    assert "doesn't work any more" in inbox.last

    job, prompt = await ask()
    await service.handle(Press(origin=_origin("bob"), data=prompt.buttons[0][2].data))
    denied = (await _jobs(service, "morph"))[-1]
    assert (denied.status, denied.error) == ("failed", "@bob said no to using their face.")

    job, prompt = await ask()
    await service.handle(Press(origin=_origin("bob"), data=prompt.buttons[0][1].data))
    assert (await _jobs(service, "morph"))[-1].status == "queued"
    n = len(inbox.replies)
    async with service.sessions.begin() as s:
        await s.execute(update(Job).where(Job.status == "queued").values(status="done"))
    await service.handle(Morph(origin=_origin("ann"), a=Target(me=True), b=Target(username="bob")))
    assert (await _jobs(service, "morph"))[-1].status == "queued"  # always allowed: no question
    assert "queue" in inbox.last and len(inbox.replies) == n + 1

    await service.handle(SetPrivacy(origin=_origin("ann"), policy="ask"))
    await service.handle(Morph(origin=_origin("cyd"), a=Target(me=True), b=Target(username="ann")))
    [waiting] = [j for j in await _jobs(service, "morph") if j.status == "held"]
    await service.expire_asks()
    assert [j.status for j in await _jobs(service, "morph") if j.id == waiting.id] == ["held"]
    async with service.sessions.begin() as s:
        await s.execute(update(Job).where(Job.id == waiting.id)
                        .values(created_at=utcnow() - timedelta(seconds=301)))
    await service.expire_asks()
    [expired] = [j for j in await _jobs(service, "morph") if j.id == waiting.id]
    assert (expired.status, expired.error) == ("failed", "nobody answered my question within 5 minutes.")


async def test_morph_with_lists_the_people_here_and_a_press_morphs(svc: tuple[Service, Inbox]) -> None:
    service, inbox = svc
    selfie, _ = await _selfie_done(service, "ann")
    async with service.sessions.begin() as s:  # ann's face shared here, as the worker shares it
        chat = await repo.get_or_create_chat(s, platform="test", platform_chat_id="g1", kind="group")
        face = await repo.latest_face(s, user_id=(await repo.find_user(s, platform="test",
                                                                       platform_user_id="ann")).id)
        await repo.share_face(s, face_id=face.id, chat_id=chat.id)
    for user in ("bob", "cyd"):
        await _give_face(service, user)
    await _give_face(service, "dee", chat="elsewhere")
    await service.handle(SetPrivacy(origin=_origin("cyd"), policy="nobody"))
    await service.handle(Press(origin=_origin("bob"), data=buttons.encode(selfie.id, "morphwith")))
    assert "Only the person whose face it is" in inbox.last
    await service.handle(Press(origin=_origin("ann"), data=buttons.encode(selfie.id, "morphwith")))
    assert inbox.last == MORPH_WITH_WHOM
    people = [b for row in inbox.replies[-1].buttons for b in row]
    assert [b.label for b in people] == ["@bob", "@ann-friend"]  # not ann, cyd (nobody), dee (elsewhere)
    await service.handle(Press(origin=_origin("ann"), data=people[0].data))
    [morph] = await _jobs(service, "morph")
    assert morph.spec == MorphSpec(a_id=face.id, b_id=await _face_id(service, "bob"), names=["@ann", "@bob"])
    await service.handle(Press(origin=_origin("ann"), data=f"b1 {selfie.id} p99999"))
    assert "doesn't work any more" in inbox.last
