"""Crash and restart drills with real processes on the demo model: the engine killed mid-job again
and again, the bot restarted with jobs in flight, a storage writer killed mid-write, a full media
disk, and /forget racing the user's running job.

Each drill prints its figures. `make test` runs the short forms; STYLEBOT_SOAK=1 the long ones
(`make soak`)."""

from __future__ import annotations

import asyncio
import errno
import os
import random
import threading
import time
from collections.abc import Callable, Collection
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO

import pytest
from PIL import Image
from sqlalchemy import select

from bot.commands import Forget, Selfie
from bot.replies import FORGOTTEN, STORAGE_FULL
from engine.runner import Engine, JobOutcome
from engine.worker import Worker, WorkerSettings
from storage import repo
from storage.media import MediaStore
from storage.models import Job, User, utcnow
from storage.queue import LocalQueue

from .drills import (
    ENGINE_ID,
    SOAK,
    WRITER_ID,
    World,
    count,
    figures,
    intact,
    integrity,
    is_result,
    kill,
    logged_result,
    origin,
    read_reply_log,
    scale,
    selfie,
    stop,
    temporaries,
    until,
    world,
)

pytestmark = pytest.mark.timeout(3600 if SOAK else 600)

MAX_ATTEMPTS = 3  # [queue] max_attempts, the default


async def _submit(w: World, astronaut: Image.Image, users: list[str]) -> None:
    for i, user in enumerate(users):
        await w.service.handle(Selfie(origin=origin(user), photo=selfie(astronaut, i)))


async def _running(w: World) -> list[Job]:
    return [j for j in await w.jobs() if j.status == "running"]


async def _all_replied(w: World) -> bool:
    return all(j.replied_at is not None for j in await w.jobs())


async def _finished(w: World, n: int) -> bool:
    return sum(j.status in ("done", "failed") for j in await w.jobs()) >= n


async def _working_or_done(w: World, *, but_not: Collection[str | None] = ()) -> bool:
    """The engine is running a batch (not one of ``but_not``, whose engine was killed), or there is
    nothing left to do."""
    jobs = await w.jobs()
    return (any(j.status == "running" and j.batch_id not in but_not for j in jobs)
            or all(j.replied_at is not None for j in jobs))


async def _check_media(w: World) -> int:
    """Every file a row names is there, whole. Returns how many files no row names (left by a
    crash between writing files and committing their rows), after sweeping them."""
    referenced = await w.referenced()
    assert all(intact(w.media, key) for key in referenced)
    assert w.media.sweep(referenced) == []  # the grace period keeps files this young
    swept = w.media.sweep(referenced, older_than_s=0)
    assert set(w.media.keys()) == referenced and temporaries(w.media) == []
    return len(swept)


# --- 1. the engine killed mid-job, again and again ------------------------------------------------


async def test_engine_killed_mid_job_again_and_again(tmp_path: Path, astronaut: Image.Image) -> None:
    kills, n_jobs = scale(3, 20), scale(6, 24)
    rng = random.Random(1)
    users = [f"user{i}" for i in range(n_jobs)]
    started = time.monotonic()
    async with world(tmp_path, batch_size=2, steps=40) as w:
        await _submit(w, astronaut, users)
        hit: list[int] = []  # how many jobs each kill caught running
        killed_batches: set[str | None] = set()
        async with w.pumping():
            for _ in range(kills):
                engine = await w.start_engine()
                try:
                    await until(partial(_working_or_done, w, but_not=killed_batches),
                                what="the engine took a job")
                    await asyncio.sleep(rng.uniform(0, 6))  # in a batch (~3 s), in the next, or between
                finally:
                    kill(engine)
                caught = await _running(w)
                hit.append(len(caught))
                killed_batches |= {j.batch_id for j in caught}
            engine = await w.start_engine()
            try:
                await until(partial(_all_replied, w), what="every job finished and replied to")
            finally:
                assert stop(engine) == 0
        jobs, faces = await w.jobs(), await w.faces()
        orphans = await _check_media(w)
        verdict = await integrity(w.sessions)
    done = [j for j in jobs if j.status == "done"]
    failed = [j for j in jobs if j.status == "failed"]
    assert len(done) + len(failed) == n_jobs  # nothing stuck queued or running
    faces_per_job = count([f.job_id for f in faces])
    assert all(faces_per_job.get(j.id) == 1 for j in done) and len(faces) == len(done)  # exactly once
    assert all(j.attempts <= MAX_ATTEMPTS for j in done)
    assert all(j.error_code == "engine_lost" and j.attempts == MAX_ATTEMPTS for j in failed)
    for job in jobs:  # one reply per job, the right one
        (reply,) = w.inbox.results(job.reply_to["user"])
        if job.status == "done":
            assert reply.media and all(m.path.exists() for m in reply.media)
        else:
            assert "engine stopped while working on this job 3 times" in reply.text
    assert verdict == ("ok", 0)
    figures("drill 1 (engine kill -9 mid-job)", kills=kills, jobs_caught_per_kill=hit, jobs=n_jobs,
            done=len(done), failed_after_max_attempts=len(failed),
            attempts=count([j.attempts for j in jobs]), orphan_files_swept=orphans,
            seconds=round(time.monotonic() - started))


# --- 2. the bot restarted with jobs in flight -----------------------------------------------------


async def test_bot_restarted_with_jobs_in_flight(tmp_path: Path, astronaut: Image.Image) -> None:
    restarts, n_jobs = scale(2, 10), scale(6, 24)
    rng = random.Random(2)
    users = [f"user{i}" for i in range(n_jobs)]
    log = tmp_path / "replies.jsonl"
    started = time.monotonic()
    async with world(tmp_path, batch_size=2, steps=40) as w:
        await _submit(w, astronaut, users)  # the commands came in; the bot process replies
        engine, bot = await w.start_engine(), await w.start_bot(log)
        killed: set[int] = set()  # bot processes stopped with kill -9
        in_flight: list[int] = []  # open jobs at each restart
        try:
            for i in range(restarts):  # spread over the run: after every n_jobs / (restarts + 1) results
                await until(partial(_finished, w, n_jobs * (i + 1) // (restarts + 1)), what="results")
                await asyncio.sleep(rng.uniform(0, 1))
                in_flight.append(sum(j.status in ("queued", "running") for j in await w.jobs()))
                if i % 2:
                    kill(bot)
                    killed.add(bot.pid)
                else:
                    assert stop(bot) == 0
                await asyncio.sleep(rng.uniform(0, 2))  # replies fall due while no bot runs
                bot = await w.start_bot(log)
            await until(partial(_all_replied, w), what="every job replied to")
        finally:
            exit_codes = stop(bot), stop(engine)
        assert exit_codes == (0, 0)
        jobs = await w.jobs()
    results = [e for e in read_reply_log(log) if logged_result(e)]
    resent = 0
    for job in jobs:
        mine = [e for e in results if e["user"] == job.reply_to["user"]]
        assert mine and (mine[0]["media"] if job.status == "done" else mine[0]["text"].startswith("Sorry"))
        if len(mine) == 2:  # sent, then the bot was killed before it could note that it was sent
            first = mine[0]
            assert first["pid"] in killed and [e for e in results if e["pid"] == first["pid"]][-1] is first
            resent += 1
        else:
            assert len(mine) == 1
    assert len(jobs) == n_jobs and all(j.status == "done" for j in jobs)
    figures("drill 2 (bot restarts)", restarts=restarts, of_them_kill_9=len(killed),
            open_jobs_at_each_restart=in_flight, jobs=n_jobs, replies=len(results),
            resent_after_kill_9=resent, seconds=round(time.monotonic() - started))


# --- 3. a storage writer killed mid-write ---------------------------------------------------------


async def test_storage_writer_killed_mid_write(tmp_path: Path) -> None:
    kills = scale(10, 50)
    rng = random.Random(3)
    started = time.monotonic()
    async with world(tmp_path) as w:
        for n in range(kills):
            writer = await w.start_writer(seed=n)
            await asyncio.sleep(rng.uniform(0.05, 1.0))
            kill(writer)
        verdict = await integrity(w.sessions)
        left_running = sum(j.status == "running" for j in await w.jobs())
        async with w.sessions.begin() as s:
            await repo.recover_jobs(s, worker=WRITER_ID)  # what the writer held when it was killed
        jobs, faces = await w.jobs(), await w.faces()
        async with w.sessions() as s:
            users = len(list(await s.scalars(select(User))))
        temps = len(temporaries(w.media))
        orphans = await _check_media(w)
    assert verdict == ("ok", 0)
    assert not any(j.status == "running" for j in jobs)
    by_id = {j.id: j for j in jobs}
    for face in faces:  # no face without its finished job, and the other way round
        job = by_id[str(face.job_id)]
        assert job.status == "done" and job.result is not None and job.result["face_id"] == face.id
        assert job.user_id == face.user_id
    face_ids = {f.id for f in faces}
    assert all(j.result is not None and j.result["face_id"] in face_ids for j in jobs if j.status == "done")
    assert all(j.result is None for j in jobs if j.status != "done")
    figures("drill 3 (writer kill -9)", kills=kills, users=users, jobs=count([j.status for j in jobs]),
            faces=len(faces), media_files=len(list(w.media.keys())), interrupted_writes=temps,
            orphan_files_swept=orphans, left_running=left_running,
            seconds=round(time.monotonic() - started))


# --- 4. the media disk is full --------------------------------------------------------------------


class FullDisk(MediaStore):
    """A media store on a disk that fills up: once ``room`` more files are stored, writing another
    fails half-way with ENOSPC (``room`` None: space for everything)."""

    room: int | None = None

    def _write(self, key: str, write: Callable[[BinaryIO], object]) -> None:
        if self.room is not None:
            if self.room <= 0:
                write = _fill_up
            self.room -= 1
        super()._write(key, write)


def _fill_up(f: BinaryIO) -> None:
    f.write(b"\0" * 4096)
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.fixture(scope="module")
def demo_engine() -> Engine:
    return Engine(model="demo", device="cpu", invert_steps=10, clip="demo")


async def test_media_disk_full(tmp_path: Path, astronaut: Image.Image, demo_engine: Engine) -> None:
    async with world(tmp_path, batch_size=1, media=FullDisk) as w:
        disk = w.media
        assert isinstance(disk, FullDisk)
        disk.room = 0  # the selfie itself does not fit
        await w.service.handle(Selfie(origin=origin("ann"), photo=selfie(astronaut, 0)))
        assert w.inbox.replies[-1].text == STORAGE_FULL
        assert await w.jobs() == [] and list(disk.keys()) == [] and temporaries(disk) == []

        disk.room = 2  # the photo and one result fit, the second result does not
        await w.service.handle(Selfie(origin=origin("ann"), photo=selfie(astronaut, 0)))
        stop_worker = asyncio.Event()
        worker = Worker(demo_engine, sessions=w.sessions, queue=LocalQueue(w.sessions), media=disk,
                        settings=WorkerSettings(worker_id=ENGINE_ID, batch_wait_ms=0))
        serving = asyncio.create_task(worker.run(stop_worker))
        try:
            async with w.pumping():
                await until(partial(_all_replied, w), what="ann's reply")
                (reply,) = w.inbox.results("ann")
                assert "could not be saved (the server is out of storage space)" in reply.text
                assert await w.faces() == []
                assert set(disk.keys()) == await w.referenced()  # just the photo: no half results
                assert len(list(disk.keys())) == 1 and temporaries(disk) == []

                disk.room = None  # space freed: the same engine serves the next selfie
                await w.service.handle(Selfie(origin=origin("bob"), photo=selfie(astronaut, 1)))
                await until(partial(_all_replied, w), what="bob's reply")
        finally:
            stop_worker.set()
            await serving
        (reply,) = w.inbox.results("bob")
        assert reply.media and all(m.path.exists() for m in reply.media)
        jobs = await w.jobs()
        assert [(j.status, j.error_code) for j in jobs] == [("failed", "storage_error"), ("done", None)]
        assert all(intact(disk, key) for key in await w.referenced())
    figures("drill 4 (disk full)", refused_selfies=1, failed_jobs=1, orphan_files=0)


# --- 5. /forget while the user's job runs ---------------------------------------------------------


async def test_forget_while_the_users_job_runs(tmp_path: Path, astronaut: Image.Image) -> None:
    rounds = scale(1, 6)
    started = time.monotonic()
    forgotten: list[str] = []
    moments: list[str] = []
    async with world(tmp_path, batch_size=2, steps=40) as w:
        engine = await w.start_engine()
        try:
            async with w.pumping():
                for r in range(rounds):
                    ann, bob, cyd = f"ann{r}", f"bob{r}", f"cyd{r}"
                    await _submit(w, astronaut, [ann, bob, cyd])
                    ann_job = (await w.jobs())[-3].id
                    at_once = r % 3 == 2  # soak: now and then before the engine has started it
                    if not at_once:
                        await until(partial(_progressed, w, ann_job), what=f"{ann}'s job running")
                    moments.append("just sent" if at_once else "running")
                    await w.service.handle(Forget(origin=origin(ann), confirmed=True))
                    forgotten.append(ann)
                    assert w.inbox.replies[-1].text == FORGOTTEN
                    await until(partial(_all_replied, w), what="the others' replies")
            assert engine.poll() is None  # it kept serving
        finally:
            assert stop(engine) == 0
        jobs = await w.jobs()
        async with w.sessions() as s:
            names = {u.platform_user_id for u in await s.scalars(select(User))}
        on_disk, referenced = set(w.media.keys()), await w.referenced()
    assert not names & set(forgotten)
    assert not any(j.reply_to.get("user") in forgotten for j in jobs)
    assert on_disk == referenced and temporaries(w.media) == []  # nothing of theirs left on disk
    for user in forgotten:
        assert w.inbox.results(user) == []  # the result was dropped, not sent
    others = [r.reply_to["user"] for r in w.inbox.replies if is_result(r)]
    assert sorted(others) == sorted(f"{p}{r}" for r in range(rounds) for p in ("bob", "cyd"))
    assert all(j.status == "done" for j in jobs)
    figures("drill 5 (/forget during the job)", rounds=rounds, forgotten_while=count(moments),
            others_served=len(others), files_on_disk=len(on_disk), seconds=round(time.monotonic() - started))


async def _progressed(w: World, job_id: str) -> bool:
    async with w.sessions() as s:
        job = await repo.get_job(s, job_id)
    assert job is not None and job.status in ("queued", "running")
    return job.status == "running" and job.progress > 0


@pytest.mark.parametrize("meanwhile", ["forget", "takeover"])
async def test_a_result_that_is_no_longer_wanted_leaves_no_files(
    tmp_path: Path, astronaut: Image.Image, demo_engine: Engine, monkeypatch: pytest.MonkeyPatch,
    meanwhile: str,
) -> None:
    """The engine finishes a job after its owner erased everything (/forget), or after its lease
    ran out and another worker took the job over: none of its files may stay on disk."""
    gate = threading.Event()  # holds the finished batch until the job is gone
    run_batch = demo_engine.run_batch

    def held(*args: Any, **kwargs: Any) -> list[JobOutcome]:
        outcomes = run_batch(*args, **kwargs)
        gate.wait()
        return outcomes

    monkeypatch.setattr(demo_engine, "run_batch", held)
    async with world(tmp_path, batch_size=1) as w:
        await w.service.handle(Selfie(origin=origin("ann"), photo=selfie(astronaut, 0)))
        stop_worker = asyncio.Event()
        worker = Worker(demo_engine, sessions=w.sessions, queue=LocalQueue(w.sessions), media=w.media,
                        settings=WorkerSettings(worker_id=ENGINE_ID, batch_wait_ms=0))
        serving = asyncio.create_task(worker.run(stop_worker))
        try:
            await until(partial(_working_or_done, w), what="the engine took the job")
            if meanwhile == "forget":
                await w.service.handle(Forget(origin=origin("ann"), confirmed=True))
            else:
                async with w.sessions.begin() as s:
                    await repo.requeue_expired(s, now=utcnow() + timedelta(hours=1))
                    taken = await repo.claim_jobs(s, worker="another", kinds=None, limit=1, lease_s=60)
                assert len(taken) == 1
        finally:
            gate.set()
            stop_worker.set()
            await serving  # it stops after persisting the batch it ran
        jobs, faces = await w.jobs(), await w.faces()
        on_disk, referenced = set(w.media.keys()), await w.referenced()
    assert faces == [] and on_disk == referenced
    if meanwhile == "forget":
        assert jobs == [] and on_disk == set()
    else:  # the other worker's to finish; the photo stays for it
        assert [(j.status, j.lease_owner) for j in jobs] == [("running", "another")] and len(on_disk) == 1
