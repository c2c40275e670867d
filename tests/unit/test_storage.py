"""storage/: repositories on migrated SQLite and PostgreSQL databases (never create_all); media store."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from storage import repo
from storage.db import make_db, make_sessionmaker
from storage.media import MediaStore
from storage.models import ChatMember, Face, FaceShare, Job, User, utcnow

Sessions = async_sessionmaker[AsyncSession]


def key(name: str, suffix: str = ".png") -> str:
    return hashlib.sha256(name.encode()).hexdigest() + suffix


async def user(s: AsyncSession, uid: str, username: str | None = None) -> int:
    return (await repo.get_or_create_user(s, platform="telegram", platform_user_id=uid, username=username)).id


async def chat(s: AsyncSession, cid: str = "c1", kind: str = "group") -> int:
    return (await repo.get_or_create_chat(s, platform="telegram", platform_chat_id=cid, kind=kind)).id


async def save(s: AsyncSession, user_id: int, *, label: str = "default", job_id: str | None = None,
               tag: str = "x", latent: np.ndarray | None = None) -> Face:
    return await repo.save_face(
        s, job_id=job_id, user_id=user_id, label=label, model_id="demo",
        latent=np.zeros((4, 8), np.float32) if latent is None else latent,
        aligned_key=key(f"aligned-{tag}"), photo_key=key(f"photo-{tag}", ".jpg"),
        reconstruction_key=key(f"recon-{tag}"), alignment={"quad": [[0, 0], [1, 1]]}, quality={"psnr": 30.5})


async def job(s: AsyncSession, *, kind: str = "edit", model: str = "demo", user_id: int | None = None,
              chat_id: int | None = None, payload: dict[str, Any] | None = None, **kw: Any) -> str:
    created = await repo.create_job(s, kind=kind, model=model, payload=payload or {}, user_id=user_id,
                                    chat_id=chat_id, reply_to={"chat": "c1"}, **kw)
    return created.id


async def claim(sessions: Sessions, worker: str = "w1", limit: int = 10, **kw: Any) -> list[Job]:
    kw.setdefault("lease_s", 60.0)
    async with sessions.begin() as s:
        return await repo.claim_jobs(s, worker=worker, kinds=kw.pop("kinds", None), limit=limit, **kw)


# --- users, chats, privacy -----------------------------------------------------------------------


async def test_username_lookup_ignores_case_and_at_and_follows_renames(sessions: Sessions) -> None:
    async with sessions.begin() as s:
        alice = await user(s, "1", "Alice_X")
        for asked in ("alice_x", "@ALICE_X", " @Alice_x "):
            found = await repo.find_user_by_username(s, platform="telegram", username=asked)
            assert found is not None and found.id == alice
        assert await repo.find_user_by_username(s, platform="discord", username="alice_x") is None
        assert await repo.find_user_by_username(s, platform="telegram", username="@") is None
        # the name moves to someone else: lookups follow it, the old holder loses it
        bob = await user(s, "2", "alice_x")
        found = await repo.find_user_by_username(s, platform="telegram", username="Alice_X")
        assert found is not None and found.id == bob
        old = await repo.get_user(s, alice)
        assert old is not None and old.username is None
        # same platform id again: same row, display name updated, None keeps the username
        again = await repo.get_or_create_user(s, platform="telegram", platform_user_id="2", display_name="B")
        assert (again.id, again.username, again.display_name) == (bob, "alice_x", "B")


async def test_usernames_are_listed_per_platform(sessions: Sessions) -> None:
    async with sessions.begin() as s:
        for platform, uid, name in (("web", "alice", "Alice"), ("web", "bob", "bob"), ("web", "x", None),
                                    ("telegram", "1", "carol")):
            await repo.get_or_create_user(s, platform=platform, platform_user_id=uid, username=name)
        assert sorted(await repo.usernames(s, platform="web")) == ["Alice", "bob"]


async def test_privacy_accepts_the_three_policies_and_rejects_junk(sessions: Sessions) -> None:
    async with sessions.begin() as s:
        uid = await user(s, "1")
        assert (await repo.get_user(s, uid)).privacy == "chat"  # type: ignore[union-attr]
        await repo.set_privacy(s, user_id=uid, policy="nobody")
        with pytest.raises(ValueError, match="privacy"):
            await repo.set_privacy(s, user_id=uid, policy="friends")
    async with sessions() as s:
        assert (await repo.get_user(s, uid)).privacy == "nobody"  # type: ignore[union-attr]
        u = await s.get(User, uid)
        u.privacy = "junk"  # type: ignore[union-attr]
        with pytest.raises(IntegrityError):  # and the database's CHECK holds without the repo
            await s.flush()


async def test_users_chats_and_memberships_are_created_once(sessions: Sessions) -> None:
    async with sessions.begin() as s:
        uid, cid = await user(s, "1"), await chat(s)
        assert await user(s, "1") == uid and await chat(s) == cid
        assert not await repo.is_member(s, chat_id=cid, user_id=uid)
        await repo.add_member(s, chat_id=cid, user_id=uid)
        await repo.add_member(s, chat_id=cid, user_id=uid)
        assert await repo.is_member(s, chat_id=cid, user_id=uid)
        with pytest.raises(ValueError, match="chat kind"):
            await repo.get_or_create_chat(s, platform="telegram", platform_chat_id="c2", kind="channel")
    async with sessions() as s:
        s.add(User(platform="telegram", platform_user_id="1"))
        with pytest.raises(IntegrityError):
            await s.flush()


# --- faces -----------------------------------------------------------------------------------------


async def test_latent_round_trips_bit_exact(sessions: Sessions) -> None:
    rng = np.random.default_rng(0)
    latent = rng.standard_normal((18, 512)).astype(np.float32)
    specials = [-0.0, 0.0, 1e-45, -1e-45, 1.1754942e-38, 3.4028235e38, -3.4028235e38, np.inf, -np.inf, np.nan]
    latent[0, : len(specials)] = np.array(specials, np.float32)
    async with sessions.begin() as s:
        face_id = (await save(s, await user(s, "1"), latent=latent)).id
    async with sessions() as s:
        face = await repo.get_face(s, face_id)
        assert face is not None
        back = repo.latent_of(face)
    assert back.dtype == np.float32 and back.shape == (18, 512) and back.flags.writeable
    assert np.array_equal(back.view(np.uint32), latent.view(np.uint32))  # -0.0 and NaN payloads too
    async with sessions() as s:
        with pytest.raises(ValueError, match="num_ws, w_dim"):
            await save(s, await user(s, "2"), latent=np.zeros(512, np.float32))


async def test_save_face_is_idempotent_by_job_id(sessions: Sessions) -> None:
    async with sessions.begin() as s:
        uid = await user(s, "1")
        first = await save(s, uid, job_id="j1", tag="a")
        again = await save(s, uid, job_id="j1", tag="b", latent=np.ones((4, 8), np.float32))
        assert again.id == first.id
    async with sessions() as s:
        faces = await repo.list_faces(s, user_id=uid)
        assert len(faces) == 1 and faces[0].aligned_key == key("aligned-a")
        assert not repo.latent_of(faces[0]).any()


async def test_same_label_replaces_the_face_and_reports_orphaned_media(sessions: Sessions) -> None:
    async with sessions.begin() as s:
        uid, cid = await user(s, "1"), await chat(s)
        old = await save(s, uid, job_id="j1", tag="a")
        await repo.share_face(s, face_id=old.id, chat_id=cid)
        other = await save(s, uid, label="beach", job_id="j2", tag="b")
    old_keys = repo.face_media_keys(old)
    async with sessions.begin() as s:
        new = await repo.save_face(
            s, job_id="j3", user_id=uid, label="default", model_id="demo", latent=np.ones((4, 8), np.float32),
            aligned_key=key("aligned-c"), photo_key=key("photo-a", ".jpg"),  # the same photo again
            reconstruction_key=key("recon-c"), alignment={}, quality={"psnr": np.float32(31.0)})
        assert new.id == old.id  # replaced in place: shares and queued jobs naming it stay valid
        orphans = await repo.orphaned_media_keys(s, keys=old_keys)
    assert orphans == {key("aligned-a"), key("recon-a")}
    async with sessions() as s:
        assert [f.label for f in await repo.list_faces(s, user_id=uid)] == ["default", "beach"]
        latest = await repo.latest_face(s, user_id=uid)
        assert latest is not None and latest.id == new.id and latest.quality == {"psnr": 31.0}
        beach = await repo.latest_face(s, user_id=uid, label="beach")
        assert beach is not None and beach.id == other.id
        assert await repo.latest_face(s, user_id=uid, label="nope") is None
        assert await repo.shared_in_chat(s, user_id=uid, chat_id=cid)
    async with sessions() as s:  # the database enforces (user, label) and job_id uniqueness itself
        s.add(Face(user_id=uid, label="beach", model_id="m", latent=b"", num_ws=0, w_dim=0, aligned_key="",
                   photo_key="", reconstruction_key="", alignment={}, quality={}))
        with pytest.raises(IntegrityError):
            await s.flush()
    async with sessions() as s:
        s.add(Face(user_id=uid, label="new", model_id="m", latent=b"", num_ws=0, w_dim=0, aligned_key="",
                   photo_key="", reconstruction_key="", alignment={}, quality={}, job_id="j2"))
        with pytest.raises(IntegrityError):
            await s.flush()


async def test_sharing_is_per_chat_and_idempotent(sessions: Sessions) -> None:
    async with sessions.begin() as s:
        uid, group, other = await user(s, "1"), await chat(s, "g1"), await chat(s, "g2")
        face = await save(s, uid)
        assert not await repo.shared_in_chat(s, user_id=uid, chat_id=group)
        await repo.share_face(s, face_id=face.id, chat_id=group)
        await repo.share_face(s, face_id=face.id, chat_id=group)
        assert await repo.shared_in_chat(s, user_id=uid, chat_id=group)
        assert not await repo.shared_in_chat(s, user_id=uid, chat_id=other)


async def test_forget_user_erases_everything_of_theirs_and_returns_their_media(sessions: Sessions) -> None:
    async with sessions.begin() as s:
        alice, bob, cid = await user(s, "1"), await user(s, "2"), await chat(s)
        for uid in (alice, bob):
            await repo.add_member(s, chat_id=cid, user_id=uid)
        a1, a2 = await save(s, alice, tag="a1"), await save(s, alice, label="2", tag="a2")
        await repo.share_face(s, face_id=a1.id, chat_id=cid)
        b1 = await save(s, bob, tag="b1")
        await repo.share_face(s, face_id=b1.id, chat_id=cid)
        done = await job(s, user_id=alice, chat_id=cid, payload={"photo_key": key("p"), "text": "smile"})
        await job(s, user_id=alice, payload={"nested": {"extra_keys": [key("k1"), "not-a-key"]}})
        bob_job = await job(s, user_id=bob, chat_id=cid, payload={"photo_key": key("bob")})
        (claimed,) = await repo.claim_jobs(s, worker="w", kinds=None, limit=1, lease_s=60)
        assert claimed.id == done
        await repo.finish_job(s, job_id=done, worker="w", result={"face_key": key("r1", ".jpg"), "n": 1})
    async with sessions.begin() as s:
        keys = await repo.forget_user(s, user_id=alice)
    assert keys == sorted(repo.face_media_keys(a1) | repo.face_media_keys(a2)
                          | {key("p"), key("k1"), key("r1", ".jpg")})
    async with sessions() as s:
        assert await repo.get_user(s, alice) is None
        assert list(await s.scalars(select(Face.user_id))) == [bob]
        assert list(await s.scalars(select(FaceShare.face_id))) == [b1.id]
        assert list(await s.scalars(select(ChatMember.user_id))) == [bob]
        assert list(await s.scalars(select(Job.id))) == [bob_job]
        assert await repo.count_open_jobs(s, user_id=alice) == 0
        assert await repo.forget_user(s, user_id=alice) == []
        assert repo.face_media_keys(b1) <= await repo.referenced_media_keys(s)


async def test_forget_user_erases_other_peoples_morphs_of_their_face(sessions: Sessions) -> None:
    async with sessions.begin() as s:
        alice, bob = await user(s, "1"), await user(s, "2")
        a, b = await save(s, alice, tag="a"), await save(s, bob, tag="b")
        shown = await job(s, kind="morph", user_id=bob, payload={"a_id": b.id, "b_id": a.id})
        (running,) = await repo.claim_jobs(s, worker="w", kinds=None, limit=1, lease_s=60)
        await repo.finish_job(s, job_id=shown, worker="w", result={"video_key": key("v", ".mp4")})
        waiting = await job(s, kind="mix", user_id=bob, payload={"a_id": a.id, "b_id": b.id})
        bobs_own = await job(s, kind="morph", user_id=bob, payload={"a_id": b.id, "b_id": b.id})
    async with sessions.begin() as s:
        keys = await repo.forget_user(s, user_id=alice)
    assert key("v", ".mp4") in keys  # the video showing alice's face goes with her
    async with sessions() as s:
        left = {j.id: j for j in await s.scalars(select(Job))}
    assert set(left) == {waiting, bobs_own}
    assert left[waiting].status == "failed" and "erased" in (left[waiting].error or "")
    assert left[bobs_own].status == "queued"
    assert running.id == shown


# --- jobs ------------------------------------------------------------------------------------------


async def test_claim_takes_the_oldest_kind_and_model_group_as_one_batch(sessions: Sessions) -> None:
    async with sessions.begin() as s:
        order = [("edit", "demo"), ("invert", "demo"), ("edit", "demo"), ("edit", "ffhq"), ("invert", "demo"),
                 ("edit", "demo"), ("morph", "demo")]
        ids = [await job(s, kind=k, model=m) for k, m in order]
    edits = await claim(sessions, limit=2)
    assert [j.id for j in edits] == [ids[0], ids[2]]  # oldest first, limited
    assert len({j.batch_id for j in edits}) == 1 and edits[0].batch_id
    assert all(j.status == "running" and j.attempts == 1 and j.lease_owner == "w1" for j in edits)
    assert all(j.started_at and j.lease_until and j.lease_until > utcnow() for j in edits)
    inverts = await claim(sessions)  # the rest of edit/demo is newer than the oldest invert
    assert [j.id for j in inverts] == [ids[1], ids[4]] and inverts[0].batch_id != edits[0].batch_id
    assert [j.id for j in await claim(sessions, kinds=["morph"])] == [ids[6]]
    assert [j.id for j in await claim(sessions, model="demo")] == [ids[5]]
    assert await claim(sessions, kinds=[]) == []
    assert [j.id for j in await claim(sessions)] == [ids[3]]
    assert await claim(sessions) == []


async def test_concurrent_claimers_never_share_a_job(url: str, sessions: Sessions) -> None:
    async with sessions.begin() as s:
        ids = {await job(s, kind=("edit", "invert", "morph")[i % 3]) for i in range(150)}
    engines = [make_db(url) for _ in range(3)]

    async def claimer(engine: AsyncEngine, worker: str) -> list[list[Job]]:
        batches, sessions = [], make_sessionmaker(engine)
        while True:
            if batch := await claim(sessions, worker, limit=4):
                batches.append(batch)
            else:
                async with sessions() as s:
                    if not await repo.count_queued(s):
                        return batches
            await asyncio.sleep(0.002)  # "runs" the batch, so the others' claims interleave

    try:
        for e in engines:  # connections open (and PRAGMAs set) before the race starts
            async with e.connect() as conn:
                await conn.exec_driver_sql("SELECT 1")
        results = await asyncio.gather(*(claimer(e, f"w{i}") for i, e in enumerate(engines)))
    finally:
        for e in engines:
            await e.dispose()
    claimed = [j.id for batches in results for batch in batches for j in batch]
    assert len(claimed) == len(set(claimed)) == len(ids) and set(claimed) == ids
    assert all(len(results[i]) > 0 for i in range(3))  # every claimer got work
    for batches in results:
        for batch in batches:
            assert len({(j.kind, j.model, j.batch_id) for j in batch}) == 1


async def test_a_worker_that_lost_its_lease_cannot_finish_or_fail(sessions: Sessions) -> None:
    async with sessions.begin() as s:
        jid = await job(s)
    await claim(sessions, "w1", lease_s=10)
    async with sessions.begin() as s:
        assert await repo.requeue_expired(s) == (0, 0)  # lease still valid
        assert await repo.requeue_expired(s, now=utcnow() + timedelta(seconds=30)) == (1, 0)
    (again,) = await claim(sessions, "w2")
    assert again.attempts == 2
    async with sessions.begin() as s:
        assert not await repo.finish_job(s, job_id=jid, worker="w1", result={"x": 1})
        assert not await repo.fail_job(s, job_id=jid, worker="w1", error="boom", code="engine_error")
        assert await repo.heartbeat(s, job_ids=[jid], worker="w1", lease_s=60) == 0
        assert await repo.heartbeat(s, job_ids=[jid], worker="w2", lease_s=60) == 1
        assert await repo.hold_job(s, job_id=jid, worker="w1", lease_s=60) is None
        held = await repo.hold_job(s, job_id=jid, worker="w2", lease_s=600)
        assert held is not None and held.id == jid and held.lease_until > utcnow() + timedelta(seconds=500)
    async with sessions() as s:
        row = await repo.get_job(s, jid)
        assert row is not None and (row.status, row.lease_owner, row.result) == ("running", "w2", None)
    async with sessions.begin() as s:
        assert await repo.set_progress(s, job_id=jid, progress=1.7, info={"step": np.int64(3)})
        assert await repo.finish_job(s, job_id=jid, worker="w2", result={"x": 2})
        assert not await repo.finish_job(s, job_id=jid, worker="w2", result={"x": 3})  # not twice
        assert not await repo.set_progress(s, job_id=jid, progress=0.5, info=None)
    async with sessions() as s:
        row = await repo.get_job(s, jid)
        assert row is not None and (row.status, row.result, row.progress) == ("done", {"x": 2}, 1.0)


async def test_requeue_expired_gives_up_after_max_attempts_with_a_reason(sessions: Sessions) -> None:
    async with sessions.begin() as s:
        lost = await job(s, max_attempts=2)
    later = timedelta(seconds=120)
    for expected in ((1, 0), (0, 1)):
        await claim(sessions, lease_s=60)
        async with sessions.begin() as s:
            assert await repo.requeue_expired(s, now=utcnow() + later) == expected
    async with sessions.begin() as s:
        slow = await job(s, kind="invert", max_attempts=1, timeout_s=5.0)
        fine = await job(s, kind="invert", timeout_s=600.0)
    await claim(sessions, lease_s=3600)
    async with sessions.begin() as s:
        assert await repo.requeue_expired(s, now=utcnow() + timedelta(seconds=10)) == (0, 1)
    async with sessions() as s:
        rows = {j: await repo.get_job(s, j) for j in (lost, slow, fine)}
    assert (rows[lost].status, rows[lost].error_code) == ("failed", "engine_lost")  # type: ignore[union-attr]
    assert "stopped while working on this job 2 times" in rows[lost].error  # type: ignore[union-attr, operator]
    assert (rows[slow].status, rows[slow].error_code) == ("failed", "timeout")  # type: ignore[union-attr]
    assert "5 s" in rows[slow].error  # type: ignore[union-attr, operator]
    assert rows[fine].status == "running"  # type: ignore[union-attr]


async def test_release_jobs_requeues_without_counting_the_attempt(sessions: Sessions) -> None:
    async with sessions.begin() as s:
        mine, theirs = await job(s), await job(s, kind="invert")
    await claim(sessions, "w1")
    await claim(sessions, "w2")
    async with sessions.begin() as s:
        assert await repo.release_jobs(s, worker="w1") == 1
    async with sessions() as s:
        a, b = await repo.get_job(s, mine), await repo.get_job(s, theirs)
        assert a is not None and (a.status, a.attempts) == ("queued", 0)
        assert (a.lease_owner, a.lease_until, a.batch_id, a.started_at) == (None, None, None, None)
        assert b is not None and (b.status, b.lease_owner) == ("running", "w2")


async def test_a_restarted_worker_takes_back_its_jobs_without_waiting_for_the_lease(
    sessions: Sessions,
) -> None:
    async with sessions.begin() as s:
        mine, last_try, theirs = await job(s), await job(s, max_attempts=1), await job(s, kind="invert")
    await claim(sessions, "w1", lease_s=3600)
    await claim(sessions, "w2", lease_s=3600)
    async with sessions.begin() as s:
        assert await repo.recover_jobs(s, worker="w1") == (1, 1)
        assert await repo.recover_jobs(s, worker="w1") == (0, 0)
    async with sessions() as s:
        a, b, c = [await repo.get_job(s, j) for j in (mine, last_try, theirs)]
    assert a is not None and (a.status, a.attempts, a.lease_owner) == ("queued", 1, None)
    assert b is not None and (b.status, b.error_code) == ("failed", "engine_lost")
    assert c is not None and (c.status, c.lease_owner) == ("running", "w2")  # another worker's


async def test_a_job_that_finishes_between_two_reads_of_a_session_comes_back_finished(
    sessions: Sessions,
) -> None:
    async with sessions.begin() as s:
        jid = await job(s)
    await claim(sessions, "w1")
    async with sessions() as reader:  # the reply pump: progress first, then what is due
        running = await repo.jobs_in_progress(reader)  # kept, as the pump keeps them
        assert [j.id for j in running] == [jid]
        async with sessions.begin() as s:
            assert await repo.finish_job(s, job_id=jid, worker="w1", result={"panel_key": key("p")})
        (due,) = await repo.replies_due(reader)
        assert (due.status, due.result) == ("done", {"panel_key": key("p")})


async def test_replies_positions_and_counts(sessions: Sessions) -> None:
    async with sessions.begin() as s:
        u1, u2, c1 = await user(s, "1"), await user(s, "2"), await chat(s)
        ids = [await job(s, user_id=u, chat_id=c1 if u == u1 else None) for u in (u1, u1, u2, u2)]
        assert [await repo.queue_position(s, job_id=j) for j in ids] == [0, 1, 2, 3]
        assert (await repo.count_open_jobs(s), await repo.count_open_jobs(s, user_id=u1)) == (4, 2)
        assert await repo.count_open_jobs(s, chat_id=c1) == 2
        assert await repo.count_open_jobs(s, user_id=u2, chat_id=c1) == 0
    await claim(sessions, limit=2)
    async with sessions.begin() as s:
        assert [await repo.queue_position(s, job_id=j) for j in ids] == [0, 0, 0, 1]
        assert await repo.count_queued(s) == 2
        assert [j.id for j in await repo.jobs_in_progress(s)] == ids[:2]
        assert await repo.replies_due(s) == []
        await repo.fail_job(s, job_id=ids[1], worker="w1", error="no face found", code="no_face")
        await repo.finish_job(s, job_id=ids[0], worker="w1", result={})
        assert await repo.set_reply_ref(s, job_id=ids[0], ref={"message_id": 7})
        assert await repo.count_open_jobs(s, user_id=u1) == 0
        # one reply per lane (ids[0] and ids[1] share a chat): the oldest, done or failed
        assert [j.id for j in await repo.replies_due(s)] == ids[:1]
        assert await repo.mark_replied(s, job_id=ids[0])
        assert not await repo.mark_replied(s, job_id=ids[0])
        assert [j.id for j in await repo.replies_due(s)] == [ids[1]]
    async with sessions() as s:
        first = await repo.get_job(s, ids[0])
        assert first is not None and first.reply_to == {"chat": "c1", "progress_ref": {"message_id": 7}}
        assert first.replied_at is not None and first.replied_at.tzinfo is not None


# --- media store ---------------------------------------------------------------------------------


def test_media_put_read_dedup_and_shards(tmp_path: Path) -> None:
    media = MediaStore(tmp_path / "media")
    k = media.put(b"hello", suffix=".PNG")
    assert k == hashlib.sha256(b"hello").hexdigest() + ".png"
    assert media.path(k) == tmp_path / "media" / k[:2] / k
    assert media.read(k) == b"hello" and media.exists(k)
    assert media.put(b"hello", suffix=".png") == k
    src = tmp_path / "clip.mp4"
    src.write_bytes(b"\x00" * (3 << 20))
    k2 = media.put_file(src, suffix=".mp4")
    assert media.read(k2) == src.read_bytes()
    assert sorted(media.keys()) == sorted([k, k2])
    assert not [p for p in (tmp_path / "media").rglob("*") if p.name.startswith(".tmp")]
    media.delete(k)
    media.delete(k)  # missing is fine
    assert not media.exists(k) and list(media.keys()) == [k2]
    with pytest.raises(ValueError, match="suffix"):
        media.put(b"x", suffix=".sh")


@pytest.mark.parametrize("bad", [
    "../x", "abc", "/etc/passwd", "a" * 64 + ".sh", "A" * 64 + ".png", "a" * 63 + ".png", "a" * 65,
    "../" + "a" * 64, "a" * 64 + "/../../x.png", "a" * 64 + ".png\n", "", "a" * 64 + ".",
])
def test_media_keys_are_validated_before_any_path_is_built(tmp_path: Path, bad: str) -> None:
    media = MediaStore(tmp_path)
    for op in (media.path, media.read, media.exists, media.delete):
        with pytest.raises(ValueError, match="not a media key"):
            op(bad)


def test_sweep_deletes_only_old_unreferenced_files(tmp_path: Path) -> None:
    media = MediaStore(tmp_path)
    old_kept, old_gone, new = (media.put(b"kept", suffix=".png"), media.put(b"gone", suffix=".png"),
                               media.put(b"new", suffix=".png"))
    stale = time.time() - 7200
    for k in (old_kept, old_gone):
        os.utime(media.path(k), (stale, stale))
    leftover = tmp_path / ".tmp-crashed"
    leftover.write_bytes(b"half")
    os.utime(leftover, (stale, stale))
    assert media.sweep({old_kept}, older_than_s=3600) == [old_gone]
    assert sorted(media.keys()) == sorted([old_kept, new]) and not leftover.exists()
    os.utime(media.path(new), (stale, stale))
    media.put(b"new", suffix=".png")  # stored again: fresh, not swept
    assert media.sweep(set(), older_than_s=3600) == [old_kept]
