"""Database engines and schema upgrades.

SQLite (aiosqlite) is the default; any SQLAlchemy async URL works, PostgreSQL through asyncpg
(``postgresql+asyncpg://user:pass@host/db``) without code changes.

The schema is owned by alembic (``storage/migrations``). ``upgrade(url)`` runs ``upgrade head``
in code, from any working directory and from an installed package; the bot and the engine
worker both call it at start, so it is serialised: ``BEGIN IMMEDIATE`` on SQLite (the whole
upgrade is one write transaction; a second process waits, then finds the schema at head) and a
transaction-scoped advisory lock on PostgreSQL.

For a new revision (developers): ``command.revision(alembic_config(url), message=...,
autogenerate=True)`` against a database at head, then clean the generated file by hand.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Connection, event
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

__all__ = [
    "MIGRATIONS_DIR",
    "alembic_config",
    "current_revision",
    "make_db",
    "make_sessionmaker",
    "sqlite_url",
    "upgrade",
]

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"

_SQLITE_PRAGMAS = ("PRAGMA busy_timeout=5000", "PRAGMA foreign_keys=ON", "PRAGMA synchronous=NORMAL")
_WAL_TRIES, _WAL_PAUSE_S = 100, 0.05
_PG_MIGRATION_LOCK = 0x5759_4C45  # any constant shared by every process that migrates


def sqlite_url(path: Path) -> str:
    """The aiosqlite URL of a database file (made absolute, so the cwd does not matter)."""
    return f"sqlite+aiosqlite:///{Path(path).expanduser().resolve()}"


def _is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


def _sqlite_file(url: str) -> Path | None:
    database = make_url(url).database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database)


def _journal_mode(cursor: Any, statement: str) -> str:
    cursor.execute(statement)
    row = cursor.fetchone()
    return str(row[0]).lower() if row else ""


def _set_wal(cursor: Any) -> None:
    """WAL is stored in the file, so this only does work on a new database. There, switching
    can fail at once with "database is locked" (SQLite skips the busy handler to avoid a
    deadlock when several connections open the new file together, e.g. bot and engine on first
    start); retry for as long as the busy timeout. (A blocking sleep, on that path only.)"""
    if _journal_mode(cursor, "PRAGMA journal_mode") in ("wal", "memory"):
        return
    for attempt in range(_WAL_TRIES):
        try:
            _journal_mode(cursor, "PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:  # aiosqlite raises sqlite3's errors
            if "locked" not in str(exc) or attempt == _WAL_TRIES - 1:
                raise
            time.sleep(_WAL_PAUSE_S)


def _set_sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(_SQLITE_PRAGMAS[0])  # busy_timeout first: the others may have to wait
        _set_wal(cursor)
        for pragma in _SQLITE_PRAGMAS[1:]:
            cursor.execute(pragma)
    finally:
        cursor.close()


def make_db(url: str, **kwargs: Any) -> AsyncEngine:
    """An async engine. SQLite: WAL, foreign keys on, 5 s busy timeout; the file's folder is made."""
    engine = create_async_engine(url, **kwargs)
    if _is_sqlite(url):
        path = _sqlite_file(url)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        event.listen(engine.sync_engine, "connect", _set_sqlite_pragmas)
    return engine


def make_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False)


def alembic_config(url: str) -> Config:
    """An alembic Config built in code: no alembic.ini, script_location from the package path."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.attributes["url"] = url  # not the ini option: '%' in a password would be interpolated
    return cfg


def _upgrade_sync(connection: Connection, url: str) -> None:
    cfg = alembic_config(url)
    cfg.attributes["connection"] = connection
    command.upgrade(cfg, "head")


async def _lock_for_migration(connection: AsyncConnection) -> None:
    if connection.dialect.name == "sqlite":
        # A migration that rebuilds a table drops it: with foreign keys on, SQLite first deletes its
        # rows, cascading to every row that references them. Off for this connection (outside the
        # transaction, where the pragma works); checked before the commit.
        await connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
        await connection.exec_driver_sql("BEGIN IMMEDIATE")
    elif connection.dialect.name == "postgresql":
        await connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_PG_MIGRATION_LOCK})")


async def upgrade(url: str) -> None:
    """Bring the database at ``url`` to the newest revision (creates an empty SQLite file)."""
    engine = make_db(url)
    try:
        async with engine.connect() as connection:
            await _lock_for_migration(connection)
            await connection.run_sync(_upgrade_sync, url)
            if connection.dialect.name == "sqlite":
                broken = (await connection.exec_driver_sql("PRAGMA foreign_key_check")).all()
                if broken:
                    raise RuntimeError(f"a migration left rows whose references are gone: {broken[:5]}")
            await connection.commit()
    finally:
        await engine.dispose()


def _revision_sync(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


async def current_revision(url: str) -> str | None:
    """The alembic revision the database is at; None for an empty database."""
    engine = make_db(url)
    try:
        async with engine.connect() as connection:
            return await connection.run_sync(_revision_sync)
    finally:
        await engine.dispose()
