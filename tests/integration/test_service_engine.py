"""The service and a real engine process on the demo model: durable jobs, micro-batching, and a
kill -9 of the engine mid-job that loses nothing and duplicates nothing."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from PIL import Image
from sqlalchemy import func, select

from bot.commands import Edit, Morph, Origin, Reply, Selfie, Target
from bot.service import Service
from settings import Config, load_config
from storage import repo
from storage.db import make_db, make_sessionmaker, upgrade
from storage.media import MediaStore
from storage.models import Face, Job
from storage.queue import LocalQueue

CONFIG = """
[engine]
model = "demo"
device = "cpu"
batch_size = 4
batch_wait_ms = 200
invert_steps = {steps}
edit_steps = 5
clip = "demo"

[limits]
per_user_open_jobs = 3
"""


class Inbox:
    """Stands in for a chat platform: records what the bot sends."""

    def __init__(self) -> None:
        self.replies: list[Reply] = []
        self.sent = 0

    async def deliver(self, reply: Reply) -> dict[str, int]:
        self.replies.append(reply)
        self.sent += 1
        return {"message_id": self.sent}

    def finals(self) -> list[Reply]:
        return [r for r in self.replies if r.media or r.text.startswith("Sorry")]


def _config(tmp_path: Path, steps: int) -> tuple[Config, Path]:
    path = tmp_path / "config.toml"
    path.write_text(CONFIG.format(steps=steps))
    return load_config(path, env={"STYLEBOT_HOME": str(tmp_path / "home")}), path


def _engine(config_path: Path, home: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "STYLEBOT_HOME": str(home), "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen([sys.executable, "-m", "cli", "engine", "--config", str(config_path),
                             "--worker-id", "test-worker"], env=env)


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[tuple[Config, Path, Service, Inbox]]:
    config, path = _config(tmp_path, steps=150)
    await upgrade(config.storage_url)
    db = make_db(config.storage_url)
    inbox = Inbox()
    sessions = make_sessionmaker(db)
    service = Service(sessions=sessions, queue=LocalQueue(sessions), media=MediaStore(config.media_dir),
                      config=config, deliver=inbox.deliver)
    yield config, path, service, inbox
    await db.dispose()


def _selfie_bytes(astronaut: Image.Image, shift: int) -> bytes:
    buf = io.BytesIO()
    astronaut.rotate(shift).save(buf, format="JPEG", quality=90)  # different photos, same face
    return buf.getvalue()


def _origin(user: str) -> Origin:
    return Origin(platform="test", user_id=user, chat_id="group-1", chat_kind="group",
                  username=user, reply_to={"chat": "group-1", "user": user})


async def _wait_for(service: Service, inbox: Inbox, n: int, *, timeout: float) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while len(inbox.finals()) < n:
        await service.pump_once()
        assert asyncio.get_running_loop().time() < deadline, "replies did not arrive in time"
        await asyncio.sleep(0.2)


async def test_kill_engine_mid_job_every_job_completes_once(
    world: tuple[Config, Path, Service, Inbox], astronaut: Image.Image, tmp_path: Path
) -> None:
    config, path, service, inbox = world
    for i, user in enumerate(["ann", "bob", "cyd"]):
        await service.handle(Selfie(origin=_origin(user), photo=_selfie_bytes(astronaut, i)))
    assert len(inbox.replies) == 3 and "queue" in inbox.replies[0].text
    sessions = service.sessions
    engine = _engine(path, tmp_path / "home")
    try:
        # Wait until the engine is well into the batch, then kill it hard.
        for _ in range(600):
            async with sessions() as s:
                running = (await s.execute(select(Job).where(Job.status == "running"))).scalars().all()
            if len(running) == 3 and all(j.progress > 0.05 for j in running):
                break
            await asyncio.sleep(0.1)
        else:
            pytest.fail("the engine never started the batch")
        assert len({j.batch_id for j in running}) == 1  # three users, one GPU pass
        engine.send_signal(signal.SIGKILL)
        engine.wait()
        engine = _engine(path, tmp_path / "home")  # restart: the jobs are taken up again
        await _wait_for(service, inbox, 3, timeout=240)
    finally:
        engine.send_signal(signal.SIGTERM)
        engine.wait(timeout=60)
    async with sessions() as s:
        jobs = (await s.execute(select(Job))).scalars().all()
        faces = (await s.execute(select(func.count()).select_from(Face))).scalar_one()
    assert [j.status for j in jobs] == ["done"] * 3
    assert all(j.attempts == 2 and j.replied_at is not None for j in jobs)
    assert faces == 3  # exactly once: one face per job
    finals = inbox.finals()
    assert len(finals) == 3 and all(m.path.exists() for r in finals for m in r.media)
    assert all("not a face model" in r.text for r in finals)


async def test_morph_edit_and_refusals(
    world: tuple[Config, Path, Service, Inbox], astronaut: Image.Image, tmp_path: Path
) -> None:
    config, path, service, inbox = world
    path.write_text(CONFIG.format(steps=20))
    await service.handle(Selfie(origin=_origin("ann"), photo=_selfie_bytes(astronaut, 0)))
    await service.handle(Selfie(origin=_origin("bob"), photo=_selfie_bytes(astronaut, 5)))
    await service.handle(Selfie(origin=_origin("cyd"), photo=b"this is not a photo"))
    assert "doesn't look like a photo" in inbox.replies[-1].text
    gradient = io.BytesIO()
    Image.linear_gradient("L").convert("RGB").save(gradient, format="PNG")  # an image, no face
    await service.handle(Selfie(origin=_origin("dee"), photo=gradient.getvalue()))
    engine = _engine(path, tmp_path / "home")
    try:
        await _wait_for(service, inbox, 3, timeout=180)
        no_face = [r for r in inbox.finals() if r.text.startswith("Sorry")]
        assert len(no_face) == 1 and "face" in no_face[0].text.lower()
        assert len([r for r in inbox.finals() if r.media]) == 2  # its batch mates were fine
        async with service.sessions.begin() as s:
            bob = await repo.find_user_by_username(s, platform="test", username="bob")
            assert bob is not None
            await repo.set_privacy(s, user_id=bob.id, policy="nobody")
        before = len(inbox.replies)
        await service.handle(Morph(origin=_origin("ann"), a=Target(me=True),
                                   b=Target(username="bob"), frames=4))
        assert "hasn't allowed" in inbox.replies[-1].text and len(inbox.replies) == before + 1
        async with service.sessions.begin() as s:
            await repo.set_privacy(s, user_id=bob.id, policy="chat")
        await service.handle(Morph(origin=_origin("ann"), a=Target(me=True),
                                   b=Target(username="bob"), frames=4))
        await service.handle(Edit(origin=_origin("bob"), text="smiling face", method="optimize"))
        await _wait_for(service, inbox, 5, timeout=240)
    finally:
        engine.send_signal(signal.SIGTERM)
        engine.wait(timeout=60)
    kinds = {m.kind for r in inbox.finals() for m in r.media}
    assert "video" in kinds and "photo" in kinds


async def test_while_the_direction_table_builds_nobody_waits_for_it(
    world: tuple[Config, Path, Service, Inbox], astronaut: Image.Image, tmp_path: Path
) -> None:
    """A fresh install: the engine builds the fast-edit table between jobs. The first /edit is
    answered by the optimisation method at once, saying so, and a selfie sent meanwhile waits
    for one chunk of the build at most."""
    config, path, service, inbox = world
    path.write_text(CONFIG.format(steps=20))
    log = tmp_path / "engine.log"
    home = tmp_path / "home"
    env = {**os.environ, "STYLEBOT_HOME": str(home), "PYTHONWARNINGS": "ignore"}
    with log.open("wb") as out:
        engine = subprocess.Popen([sys.executable, "-m", "cli", "engine", "--config", str(path),
                                   "--worker-id", "test-worker"], env=env, stderr=out)
    try:
        await service.handle(Selfie(origin=_origin("ann"), photo=_selfie_bytes(astronaut, 0)))
        await _wait_for(service, inbox, 1, timeout=180)
        for _ in range(300):  # the engine is idle now: it starts on the table
            if "building the direction table" in log.read_text():
                break
            await asyncio.sleep(0.2)
        loop = asyncio.get_running_loop()
        sent = loop.time()
        await service.handle(Edit(origin=_origin("ann"), text="smiling face"))
        await _wait_for(service, inbox, 2, timeout=90)
        assert loop.time() - sent < 90
        edit = inbox.finals()[-1]
        assert "Fast edits are still being prepared" in edit.text and "% done" in edit.text
        await asyncio.sleep(2)  # the engine is back to building
        await service.handle(Selfie(origin=_origin("bob"), photo=_selfie_bytes(astronaut, 5)))
        await _wait_for(service, inbox, 3, timeout=180)
    finally:
        engine.send_signal(signal.SIGTERM)
        engine.wait(timeout=60)
    async with service.sessions() as s:
        jobs = (await s.execute(select(Job).order_by(Job.created_at))).scalars().all()
    assert [j.kind for j in jobs] == ["invert", "edit", "invert"]
    assert all(j.status == "done" for j in jobs)
    assert jobs[1].result is not None and jobs[1].result["method"] == "optimize"
    for job in jobs[1:]:  # claimed within one chunk of the build (plus the batch wait and a poll)
        assert job.started_at is not None
        assert (job.started_at - job.created_at).total_seconds() < 5
    assert not list(home.glob("directions/*.safetensors"))  # the table was still being built
    assert list(home.glob("directions/*.partial/*.npy"))  # ... and its chunks are saved
