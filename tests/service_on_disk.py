"""A service over real storage on disk: the database migrated to head, the media dir, the local queue."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from bot.reply_pump import Deliver
from bot.service import Service
from settings import Config, load_config
from storage.db import make_db, make_sessionmaker, upgrade
from storage.media import MediaStore
from storage.queue import LocalQueue

__all__ = ["migrated", "service_on_disk"]


@contextlib.asynccontextmanager
async def migrated(config: Config) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    """Sessions on ``config``'s database, brought to head first; its engine disposed of after."""
    await upgrade(config.storage_url)
    db = make_db(config.storage_url)
    try:
        yield make_sessionmaker(db)
    finally:
        await db.dispose()


@contextlib.asynccontextmanager
async def service_on_disk(tmp: Path, config_text: str, deliver: Deliver) -> AsyncIterator[Service]:
    """A service configured by ``config_text`` with everything under ``tmp``, sending through
    ``deliver``."""
    path = tmp / "config.toml"
    path.write_text(config_text)
    config = load_config(path, env={"STYLEBOT_HOME": str(tmp / "home")})
    async with migrated(config) as sessions:
        yield Service(sessions=sessions, queue=LocalQueue(sessions), media=MediaStore(config.media_dir),
                      config=config, deliver=deliver)
