"""The Telegram test world: a local fake Bot API server, the real python-telegram-bot adapter, the real
service and a real engine process (``python -m cli engine``) on the demo model, all on one SQLite file
(or on the database and queue backend that ``config_text`` names: PostgreSQL and Redis).

Test modules wrap :func:`running_world` in a module-scoped fixture (one engine process per module).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import skimage.data
from PIL import Image
from sqlalchemy.ext.asyncio import AsyncEngine

from bot.adapters.telegram import TelegramAdapter
from bot.service import Service
from settings import Config, load_config
from storage.db import make_db, make_sessionmaker, upgrade
from storage.media import MediaStore
from storage.queue import open_queue

from .fake_telegram import Call, FakeChat, FakeTelegram, FakeUser

__all__ = ["CONFIG", "TOKEN", "World", "astronaut", "dm", "jpeg", "replying_to", "running_world"]

TOKEN = "123456789:AAE-fake_SECRET_token-for-tests"

CONFIG = """
[telegram]
base_url = "{base_url}"
base_file_url = "{base_file_url}"
max_photo_mb = 1

[engine]
model = "demo"
device = "cpu"
batch_size = 4
batch_wait_ms = 50
invert_steps = 20
edit_steps = 5
clip = "demo"
direction_samples = 1

[limits]
per_user_per_minute = 30
per_user_open_jobs = 3
"""


@dataclass
class World:
    tg: FakeTelegram
    config: Config
    service: Service
    db: AsyncEngine
    engine: subprocess.Popen[bytes]  # the engine process
    engine_log: Path  # its stdout and stderr
    home: Path  # STYLEBOT_HOME: weights, direction tables


def dm(user: FakeUser) -> FakeChat:
    return FakeChat(id=user.id, type="private")


def jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def astronaut(rotate: int = 0) -> bytes:
    """A real face photo (scikit-image's astronaut) as a JPEG; ``rotate`` degrees make other bytes."""
    return jpeg(Image.fromarray(skimage.data.astronaut()).rotate(rotate))


def replying_to(message: dict[str, Any]) -> Callable[[Call], bool]:
    def check(call: Call) -> bool:
        ref = call.params.get("reply_parameters")
        return isinstance(ref, dict) and ref.get("message_id") == message["message_id"]
    return check


@contextlib.asynccontextmanager
async def running_world(tmp: Path, *, config_text: str = CONFIG) -> AsyncIterator[World]:
    """Start everything under ``tmp`` (``config_text``: :data:`CONFIG` or a variant of it); on exit
    stop it all and check the bot's tasks ended cleanly."""
    tg = FakeTelegram(TOKEN)
    await tg.start()
    path = tmp / "config.toml"
    path.write_text(config_text.format(base_url=tg.base_url, base_file_url=tg.base_file_url))
    home = tmp / "home"
    config = load_config(path, env={"STYLEBOT_HOME": str(home), "TELEGRAM_BOT_TOKEN": TOKEN})
    await upgrade(config.storage_url)
    db = make_db(config.storage_url)
    sessions = make_sessionmaker(db)
    adapter = TelegramAdapter(config, poll_timeout=1)
    queues = contextlib.AsyncExitStack()
    queue = await queues.enter_async_context(open_queue(config.queue, sessions=sessions))
    service = Service(sessions=sessions, queue=queue, media=MediaStore(config.media_dir), config=config,
                      deliver=adapter.deliver)
    # One torch thread: the bot (this process) needs the other core, and OpenMP threads that share
    # a busy CPU spin-wait for each other (a 20-step inversion then takes a minute, not a second).
    env = {**os.environ, "STYLEBOT_HOME": str(home), "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    log_path = tmp / "engine.log"
    with log_path.open("wb") as log:
        engine = subprocess.Popen([sys.executable, "-m", "cli", "engine", "--config", str(path),
                                   "--worker-id", "tg-e2e"], env=env, stdout=log, stderr=subprocess.STDOUT)
    stop = asyncio.Event()
    tasks = [asyncio.create_task(service.run(stop)),
             asyncio.create_task(adapter.run(service, stop))]
    try:
        await tg.wait_for("setMyCommands", timeout=20)
        yield World(tg=tg, config=config, service=service, db=db, engine=engine, engine_log=log_path,
                    home=home)
    finally:
        stop.set()
        try:
            await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30)
        finally:  # even when the test was cut off: no engine process outlives its world
            engine.send_signal(signal.SIGTERM)
            try:
                engine.wait(timeout=60)
            except subprocess.TimeoutExpired:
                engine.kill()
            await queues.aclose()
            await db.dispose()
            await tg.stop()
    for task in tasks:
        assert task.exception() is None
