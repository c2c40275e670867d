"""Shared pieces of the crash and restart drills (test_drills.py), and the two processes the drills
kill that are not product entry points of their own:

- ``python drills.py bot --config CFG --log FILE``: the bot process (``bot.app.run``, the real
  service and reply pump) with a stand-in chat platform that appends every message it sends to
  FILE as a JSON line;
- ``python drills.py writer --config CFG --seed N``: writes users, jobs, faces and media in a
  loop through the real service, repository functions and media store, as fast as it can.

``STYLEBOT_SOAK=1`` selects the long form of every drill (``scale``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import io
import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from bot.app import run as run_bot
from bot.commands import Forget, Origin, Reply, Selfie
from bot.service import Service
from settings import Config, load_config
from storage import repo
from storage.db import make_db, make_sessionmaker, upgrade
from storage.media import MediaStore
from storage.models import Face, Job
from storage.queue import LocalQueue

SOAK = os.environ.get("STYLEBOT_SOAK") == "1"
PLATFORM = "drill"
ENGINE_ID = "drill-engine"
WRITER_ID = "drill-writer"
_SCRIPT = Path(__file__).resolve()
_ROUND_TRIP_S = 0.3  # a chat platform's answer to "send this message"

CONFIG = """
[bot]
data_dir = "data"

[engine]
model = "demo"
device = "cpu"
batch_size = {batch_size}
batch_wait_ms = 100
invert_steps = {steps}
clip = "demo"
embedded = false

[web]
enabled = false

[telegram]
enabled = false

[discord]
enabled = false

[limits]
per_user_open_jobs = 100
per_chat_open_jobs = 10000
queue_cap = 10000
per_user_per_minute = 10000
"""

Sessions = async_sessionmaker[AsyncSession]


def scale(short: int, soak: int) -> int:
    """The size of a drill: its short form in `make test`, its long one under STYLEBOT_SOAK=1."""
    return soak if SOAK else short


def origin(user: str) -> Origin:
    return Origin(platform=PLATFORM, user_id=user, chat_id="group-1", chat_kind="group", username=user,
                  reply_to={"platform": PLATFORM, "chat": "group-1", "user": user})


def selfie(astronaut: Image.Image, n: int) -> bytes:
    """A different photo of the same face for every ``n``."""
    buf = io.BytesIO()
    astronaut.rotate(n % 13 - 6, translate=(n // 13, 0)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def is_result(reply: Reply) -> bool:
    """The message that ends a job: its pictures, or why it failed."""
    return reply.final and (bool(reply.media) or reply.text.startswith("Sorry"))


class Inbox:
    """Stands in for a chat platform: records what the bot sends."""

    def __init__(self) -> None:
        self.replies: list[Reply] = []

    async def deliver(self, reply: Reply) -> dict[str, int]:
        self.replies.append(reply)
        return {"message_id": len(self.replies)}

    @property
    def last(self) -> str:
        return self.replies[-1].text

    def results(self, user: str) -> list[Reply]:
        return [r for r in self.replies if is_result(r) and r.reply_to.get("user") == user]


@dataclass
class World:
    """One bot installation on disk (config, database, media dir) and a service over it."""

    home: Path
    config: Config
    config_path: Path
    sessions: Sessions
    media: MediaStore
    service: Service
    inbox: Inbox

    def env(self) -> dict[str, str]:
        env = {**os.environ, "STYLEBOT_HOME": str(self.home), "PYTHONWARNINGS": "ignore"}
        for token in ("TELEGRAM_BOT_TOKEN", "DISCORD_BOT_TOKEN", "STYLEBOT_WEB_TOKEN"):
            env.pop(token, None)
        return env

    async def start_engine(self) -> subprocess.Popen[bytes]:
        """The real `stylebot engine`, once it is serving (its log says so): a SIGTERM in its first
        moments, before the interpreter has set up its handlers, ends it with no clean stop.
        Its log is appended to ``engine.log`` beside the config."""
        log = self.config_path.parent / "engine.log"
        start = log.stat().st_size if log.exists() else 0
        with log.open("ab") as out:
            proc = subprocess.Popen([sys.executable, "-m", "cli", "engine", "--config",
                                     str(self.config_path), "--worker-id", ENGINE_ID],
                                    env=self.env(), stderr=out)

        async def serving() -> bool:
            with log.open("rb") as f:
                f.seek(start)
                text = f.read()
            assert proc.poll() is None, f"the engine exited ({proc.returncode}): {text[-2000:]!r}"
            return f"engine worker {ENGINE_ID} ready".encode() in text

        await until(serving, what="the engine serving")
        return proc

    async def start_bot(self, log: Path) -> subprocess.Popen[str]:
        """The bot process, once it is serving (its signal handlers are in place)."""
        return await self._ready([str(_SCRIPT), "bot", "--config", str(self.config_path), "--log", str(log)])

    async def start_writer(self, seed: int) -> subprocess.Popen[str]:
        """The storage writer, once it is writing."""
        return await self._ready([str(_SCRIPT), "writer", "--config", str(self.config_path),
                                  "--seed", str(seed)])

    async def _ready(self, args: list[str]) -> subprocess.Popen[str]:
        proc = subprocess.Popen([sys.executable, *args], env=self.env(), stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        if await asyncio.to_thread(proc.stdout.readline) != "ready\n":
            kill(proc)
            raise AssertionError(f"the {args[1]} process did not start (exit code {proc.returncode})")
        return proc

    async def jobs(self) -> list[Job]:
        async with self.sessions() as s:
            return list(await s.scalars(select(Job).order_by(Job.created_at, Job.id)))

    async def faces(self) -> list[Face]:
        async with self.sessions() as s:
            return list(await s.scalars(select(Face)))

    async def referenced(self) -> set[str]:
        async with self.sessions() as s:
            return await repo.referenced_media_keys(s)

    @contextlib.asynccontextmanager
    async def pumping(self) -> AsyncIterator[None]:
        """The service's reply pump, running in this process."""
        stop = asyncio.Event()
        pump = asyncio.create_task(self.service.run(stop))
        try:
            yield
        finally:
            stop.set()
            await pump


@contextlib.asynccontextmanager
async def world(tmp_path: Path, *, batch_size: int = 2, steps: int = 40,
                media: Callable[[Path], MediaStore] = MediaStore) -> AsyncIterator[World]:
    config_path = tmp_path / "config.toml"
    config_path.write_text(CONFIG.format(batch_size=batch_size, steps=steps))
    home = tmp_path / "home"
    config = load_config(config_path, env={"STYLEBOT_HOME": str(home)})
    await upgrade(config.storage_url)
    db = make_db(config.storage_url)
    sessions = make_sessionmaker(db)
    store = media(config.media_dir)
    inbox = Inbox()
    service = Service(sessions=sessions, queue=LocalQueue(sessions), media=store, config=config,
                      deliver=inbox.deliver)
    try:
        yield World(home, config, config_path, sessions, store, service, inbox)
    finally:
        await db.dispose()


async def until(check: Callable[[], Awaitable[bool]], *, what: str, timeout_s: float = 300) -> None:
    """Wait until ``check()`` holds (polling); fail naming ``what`` if it never does."""
    deadline = time.monotonic() + timeout_s
    while not await check():
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s:g} s"
        await asyncio.sleep(0.05)


def stop(proc: subprocess.Popen[Any]) -> int:
    """SIGTERM, then wait: the process's exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    return proc.returncode


def kill(proc: subprocess.Popen[Any]) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.communicate()


def intact(media: MediaStore, key: str) -> bool:
    """The file of ``key`` exists and holds the bytes its name is the hash of."""
    return media.exists(key) and hashlib.sha256(media.read(key)).hexdigest() == key[:64]


def temporaries(media: MediaStore) -> list[Path]:
    """Files of interrupted writes."""
    return list(media.root.glob(".tmp-*")) if media.root.is_dir() else []


async def integrity(sessions: Sessions) -> tuple[str, int]:
    """SQLite's verdict on the file (``"ok"``), and how many rows break a foreign key."""
    async with sessions() as s:
        verdict = (await s.execute(text("PRAGMA integrity_check"))).scalar_one()
        broken = len((await s.execute(text("PRAGMA foreign_key_check"))).all())
    return str(verdict), broken


def count(items: Sequence[Any]) -> dict[Any, int]:
    """How many of each, in order."""
    return dict(sorted(Counter(items).items()))


def figures(drill: str, **numbers: Any) -> None:
    print(f"\n{drill}: " + ", ".join(f"{name.replace('_', ' ')} {value}" for name, value in numbers.items()))


# --- the bot process ----------------------------------------------------------------------------


class ReplyLog:
    """The bot process's chat platform: every message sent, one JSON line on disk as soon as the
    platform has it (a reply logged is a reply the user got); then, as on a real platform, the
    answer takes a moment to come back."""

    platform = PLATFORM

    def __init__(self, path: Path) -> None:
        self.path, self.sent = path, 0

    async def run(self, service: Service, stop: asyncio.Event) -> None:
        print("ready", flush=True)
        await stop.wait()

    async def deliver(self, reply: Reply) -> dict[str, Any] | None:
        self.sent += 1
        line = {"pid": os.getpid(), "user": reply.reply_to.get("user"), "text": reply.text,
                "final": reply.final, "media": [str(m.path) for m in reply.media]}
        with open(self.path, "a") as f:
            f.write(json.dumps(line) + "\n")
            f.flush()
            os.fsync(f.fileno())
        await asyncio.sleep(_ROUND_TRIP_S)
        return {"message_id": f"{os.getpid()}-{self.sent}"}


def read_reply_log(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def logged_result(entry: dict[str, Any]) -> bool:
    return bool(entry["final"]) and (bool(entry["media"]) or str(entry["text"]).startswith("Sorry"))


# --- the storage writer -------------------------------------------------------------------------


def _noise(rng: random.Random, side: int = 48) -> bytes:
    pixels = np.frombuffer(rng.randbytes(side * side * 3), np.uint8).reshape(side, side, 3)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


async def _ignore(reply: Reply) -> None:
    return None


async def _engine_step(sessions: Sessions, media: MediaStore, rng: random.Random) -> None:
    """What the engine worker writes for a batch (engine.worker.Worker._persist, without the GPU):
    hold the job, store its files, then its face row and its done mark in one transaction."""
    async with sessions.begin() as s:
        claimed = await repo.claim_jobs(s, worker=WRITER_ID, kinds=["invert"], limit=3, lease_s=60)
    for job in claimed:
        async with sessions.begin() as s:
            held = await repo.hold_job(s, job_id=job.id, worker=WRITER_ID, lease_s=60)
            if held is None:
                continue
            if rng.random() < 0.2:
                await repo.fail_job(s, job_id=job.id, worker=WRITER_ID, error="no face", code="no_face")
                continue
            names = ("aligned_key", "reconstruction_key", "panel_key")
            result: dict[str, Any] = {name: media.put(rng.randbytes(rng.randrange(1, 400_000)), suffix=".png")
                                      for name in names}
            assert held.user_id is not None
            face = await repo.save_face(
                s, job_id=job.id, user_id=held.user_id, label=str(held.payload.get("label") or "default"),
                model_id="drill", latent=np.zeros((4, 8), np.float32), aligned_key=result["aligned_key"],
                photo_key=str(held.payload["photo_key"]), reconstruction_key=result["reconstruction_key"],
                alignment={}, quality={})
            if held.chat_id is not None:
                await repo.share_face(s, face_id=face.id, chat_id=held.chat_id)
            await repo.finish_job(s, job_id=job.id, worker=WRITER_ID, result={**result, "face_id": face.id})


async def _write_forever(config: Config, seed: int) -> None:
    rng = random.Random(seed)
    await upgrade(config.storage_url)
    db = make_db(config.storage_url)
    sessions = make_sessionmaker(db)
    media = MediaStore(config.media_dir)
    service = Service(sessions=sessions, queue=LocalQueue(sessions), media=media, config=config,
                      deliver=_ignore)
    shared_photo = _noise(random.Random(0))  # the same photo from several users: one file, shared
    async with sessions.begin() as s:
        await repo.recover_jobs(s, worker=WRITER_ID)  # what its previous life held, as a worker does
    print("ready", flush=True)
    while True:
        user = f"user{rng.randrange(12)}"
        action = rng.choices(("selfie", "engine", "reply", "forget"), weights=(4, 4, 2, 1))[0]
        if action == "selfie":
            photo = shared_photo if rng.random() < 0.2 else _noise(rng)
            await service.handle(Selfie(origin=origin(user), photo=photo,
                                        label=rng.choice(("default", "other"))))
        elif action == "engine":
            await _engine_step(sessions, media, rng)
        elif action == "reply":
            async with sessions.begin() as s:
                for job in (await repo.replies_due(s))[:5]:
                    await repo.mark_replied(s, job_id=job.id)
        else:
            await service.handle(Forget(origin=origin(user), confirmed=True))


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="drills.py")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("bot")
    p.add_argument("--config", required=True)
    p.add_argument("--log", required=True)
    p = sub.add_parser("writer")
    p.add_argument("--config", required=True)
    p.add_argument("--seed", type=int, required=True)
    args = parser.parse_args(argv)
    config = load_config(Path(args.config))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "bot":
        return asyncio.run(run_bot(config, adapters=[ReplyLog(Path(args.log))]))
    asyncio.run(_write_forever(config, args.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
