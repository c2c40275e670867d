"""The Discord test world: a local fake Discord (REST, CDN, gateway), the real discord.py adapter, the
real service and, unless asked not to, a real engine process (``python -m cli engine``) on the demo
model, all on one SQLite file.

Test modules wrap :func:`running_world` in a module-scoped fixture (one engine process per module).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import warnings
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from log_privacy import LogCapture
from service_on_disk import migrated

from bot.service import Service
from settings import load_config
from storage.media import MediaStore
from storage.queue import LocalQueue

from .fake_discord import FakeDiscord

with warnings.catch_warnings():  # discord.py imports audioop (voice), deprecated since Python 3.11
    warnings.filterwarnings("ignore", "'audioop' is deprecated", DeprecationWarning)
    from bot.adapters.discord import DiscordAdapter

__all__ = ["ANN", "BOB", "CONFIG", "CYD", "DEE", "EVE", "TOKEN", "World", "running_world"]

TOKEN = "MTIzNDU2.fake-discord-bot-token.SECRET"
ANN, BOB, CYD, DEE, EVE = (f"80000000000000000{i}" for i in range(1, 6))

CONFIG = """
[bot]
log_level = "DEBUG"

[engine]
model = "demo"
device = "cpu"
batch_size = 4
batch_wait_ms = 200
invert_steps = 20
edit_steps = 5
clip = "demo"
direction_samples = 1

[discord]
api_base = "{api}"
gateway_url = "{gateway}"
max_upload_mb = 8

[web]
enabled = false
"""


@dataclass
class World:
    fake: FakeDiscord
    adapter: DiscordAdapter
    service: Service
    logs: LogCapture  # everything this process logged, every logger at DEBUG
    engine_log: Path  # the engine process's stdout and stderr (it logs at DEBUG: [bot] log_level)
    home: Path  # STYLEBOT_HOME: weights, direction tables


@contextlib.asynccontextmanager
async def running_world(tmp: Path, logs: LogCapture, *, config_text: str = CONFIG, engine: bool = True,
                        fake: FakeDiscord | None = None) -> AsyncIterator[World]:
    """Start everything under ``tmp``; ``fake``: a fake Discord already running (it is not stopped)."""
    own_fake = fake is None
    if fake is None:
        fake = FakeDiscord(TOKEN)
        await fake.start()
    for uid, name in ((ANN, "ann"), (BOB, "bob"), (CYD, "cyd")):
        fake.add_user(uid, name)
    path = tmp / "config.toml"
    path.write_text(config_text.format(api=fake.api_base, gateway=fake.gateway_url))
    home = tmp / "home"
    config = load_config(path, env={"STYLEBOT_HOME": str(home), "DISCORD_BOT_TOKEN": TOKEN})
    storage = contextlib.AsyncExitStack()
    sessions = await storage.enter_async_context(migrated(config))
    adapter = DiscordAdapter(config)
    service = Service(sessions=sessions, queue=LocalQueue(sessions), media=MediaStore(config.media_dir),
                      config=config, deliver=adapter.deliver)
    engine_log = tmp / "engine.log"
    process = None
    if engine:
        with engine_log.open("wb") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "cli", "engine", "--config", str(path), "--worker-id", "discord-e2e"],
                env={**os.environ, "STYLEBOT_HOME": str(home), "PYTHONWARNINGS": "ignore"},
                stdout=out, stderr=subprocess.STDOUT)
    stop = asyncio.Event()
    tasks = [asyncio.create_task(adapter.run(service, stop)), asyncio.create_task(service.run(stop))]
    try:
        ready = asyncio.create_task(adapter.ready.wait())
        await asyncio.wait({ready, tasks[0]}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
        ready.cancel()
        if tasks[0].done():
            tasks[0].result()  # the adapter stopped: show why
        assert adapter.ready.is_set(), "the bot did not connect to the fake gateway"
        yield World(fake, adapter, service, logs, engine_log, home)
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        if process is not None:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=60)
        await storage.aclose()
        if own_fake:
            await fake.stop()
