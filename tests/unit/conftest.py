"""Fixtures of the storage tests: a migrated database on each backend."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from postgres_db import BACKENDS, fresh_postgres_database
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from storage.db import make_db, make_sessionmaker, sqlite_url, upgrade


@pytest.fixture(params=BACKENDS)
async def url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A migrated database: a SQLite file, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        db_url = sqlite_url(tmp_path / "db" / "stylebot.sqlite3")
        await upgrade(db_url)
        yield db_url
        return
    async with fresh_postgres_database(request.getfixturevalue("postgres_url")) as db_url:
        await upgrade(db_url)
        yield db_url


@pytest.fixture
async def engine(url: str) -> AsyncIterator[AsyncEngine]:
    db = make_db(url)
    yield db
    await db.dispose()


@pytest.fixture
def sessions(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return make_sessionmaker(engine)
