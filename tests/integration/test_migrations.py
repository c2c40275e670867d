"""Alembic migrations against real SQLite files and PostgreSQL databases: the schema the app runs on is
the migrated one."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from postgres_db import BACKENDS, fresh_postgres_database
from sqlalchemy import Connection, inspect, text

from storage.db import alembic_config, current_revision, make_db, sqlite_url, upgrade
from storage.models import Base

TABLES = {"users", "chats", "chat_members", "faces", "face_shares", "jobs"}


@pytest.fixture(params=BACKENDS)
async def fresh_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """An empty database: a SQLite path in a folder that does not exist yet, or a new PostgreSQL one."""
    if request.param == "sqlite":
        yield sqlite_url(tmp_path / "new" / "folder" / "stylebot.sqlite3")
        return
    async with fresh_postgres_database(request.getfixturevalue("postgres_url")) as db_url:
        yield db_url


def _head(url: str) -> str | None:
    return ScriptDirectory.from_config(alembic_config(url)).get_current_head()


async def _tables(url: str) -> set[str]:
    engine = make_db(url)
    try:
        async with engine.connect() as conn:
            return set(await conn.run_sync(lambda c: inspect(c).get_table_names()))
    finally:
        await engine.dispose()


async def test_upgrade_builds_an_empty_database_to_head_and_is_idempotent(
    fresh_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = fresh_url
    monkeypatch.chdir(tmp_path)  # nothing depends on the working directory
    assert await current_revision(url) is None
    await upgrade(url)
    head = _head(url)
    assert head == "0003"
    assert await current_revision(url) == head
    assert await _tables(url) >= TABLES
    await upgrade(url)  # again: a no-op, not an error
    assert await current_revision(url) == head


async def test_bot_and_worker_upgrading_at_once_both_succeed(fresh_url: str) -> None:
    url = fresh_url
    await asyncio.gather(upgrade(url), upgrade(url), upgrade(url))
    assert await current_revision(url) == _head(url)


def _to_0001(connection: Connection, url: str) -> None:
    cfg = alembic_config(url)
    cfg.attributes["connection"] = connection
    command.upgrade(cfg, "0001")


async def test_jobs_replied_to_before_delivery_state_existed_count_as_delivered(fresh_url: str) -> None:
    url = fresh_url
    engine = make_db(url)
    try:
        async with engine.connect() as conn:
            await conn.run_sync(_to_0001, url)
            for job_id, replied in (("old", "'2026-11-26 10:00:00+00:00'"), ("pending", "NULL")):
                await conn.execute(text(
                    "INSERT INTO jobs (id, kind, model, payload, status, attempts, max_attempts, "
                    "timeout_s, progress, reply_to, created_at, replied_at) VALUES (:id, 'mix', 'm', "
                    f"'{{}}', 'done', 1, 3, 60, 1, '{{}}', '2026-11-26 09:00:00+00:00', {replied})"),
                    {"id": job_id})
            await conn.commit()
        await upgrade(url)
        async with engine.connect() as conn:
            rows = (await conn.execute(text(
                "SELECT id, reply_outcome, reply_attempts, reply_step FROM jobs ORDER BY id"))).all()
    finally:
        await engine.dispose()
    assert [tuple(r) for r in rows] == [("old", "delivered", 0, None), ("pending", None, 0, None)]


def _to_0002(connection: Connection, url: str) -> None:
    cfg = alembic_config(url)
    cfg.attributes["connection"] = connection
    command.upgrade(cfg, "0002")


async def test_consent_revision_keeps_every_row_and_the_cascades(fresh_url: str) -> None:
    """0003 rebuilds users and jobs on SQLite: nothing referencing them may be lost on the way
    (with foreign keys on, dropping a table deletes its rows and cascades), and the cascades work
    after it; the new values are allowed, others still refused."""
    url = fresh_url
    at = "'2026-12-01 10:00:00+00:00'"
    rows = [
        f"INSERT INTO users (id, platform, platform_user_id, privacy, created_at) VALUES "
        f"(1, 't', 'ann', 'chat', {at}), (2, 't', 'bob', 'nobody', {at})",
        "INSERT INTO chats (id, platform, platform_chat_id, kind, created_at) VALUES "
        f"(1, 't', 'g', 'group', {at})",
        f"INSERT INTO chat_members (chat_id, user_id, seen_at) VALUES (1, 1, {at}), (1, 2, {at})",
        "INSERT INTO faces (id, user_id, label, model_id, latent, num_ws, w_dim, aligned_key, photo_key, "
        f"reconstruction_key, alignment, quality, created_at) VALUES (1, 1, 'default', 'm', X'00000000', "
        f"1, 1, 'a', 'p', 'r', '{{}}', '{{}}', {at})",
        f"INSERT INTO face_shares (face_id, chat_id, created_at) VALUES (1, 1, {at})",
        "INSERT INTO jobs (id, kind, model, payload, status, attempts, max_attempts, timeout_s, progress, "
        f"reply_to, user_id, chat_id, created_at) VALUES ('j1', 'mix', 'm', '{{}}', 'done', 1, 3, 60, 1, "
        f"'{{}}', 1, 1, {at})",
    ]
    engine = make_db(url)
    try:
        async with engine.connect() as conn:
            await conn.run_sync(_to_0002, url)
            for sql in rows:
                await conn.execute(text(sql.replace("X'00000000'", "'\\x00000000'")
                                        if conn.dialect.name == "postgresql" else sql))
            await conn.commit()
        await upgrade(url)
        counts = {}
        async with engine.connect() as conn:
            for table in ("users", "chats", "chat_members", "faces", "face_shares", "jobs"):
                counts[table] = (await conn.execute(text(f"SELECT count(*) FROM {table}"))).scalar_one()
            await conn.execute(text("UPDATE users SET privacy = 'ask' WHERE id = 2"))
            await conn.execute(text("UPDATE jobs SET status = 'held' WHERE id = 'j1'"))
            await conn.commit()
            with pytest.raises(Exception, match="(?i)check"):
                await conn.execute(text("UPDATE users SET privacy = 'bogus' WHERE id = 1"))
            await conn.rollback()
            await conn.execute(text("DELETE FROM users WHERE id = 1"))
            await conn.commit()
            left = {t: (await conn.execute(text(f"SELECT count(*) FROM {t}"))).scalar_one()
                    for t in ("faces", "face_shares", "jobs", "chat_members")}
    finally:
        await engine.dispose()
    assert counts == {"users": 2, "chats": 1, "chat_members": 2, "faces": 1, "face_shares": 1, "jobs": 1}
    assert left == {"faces": 0, "face_shares": 0, "jobs": 0, "chat_members": 1}  # ann's went with her


def _diff(connection: Connection) -> list[object]:
    return list(compare_metadata(MigrationContext.configure(connection), Base.metadata))


async def test_models_match_the_migrated_schema(fresh_url: str) -> None:
    url = fresh_url
    await upgrade(url)
    engine = make_db(url)
    try:
        async with engine.connect() as conn:
            assert await conn.run_sync(_diff) == []
    finally:
        await engine.dispose()


async def test_every_connection_has_wal_foreign_keys_and_busy_timeout(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path / "stylebot.sqlite3")
    await upgrade(url)
    engine = make_db(url)
    try:
        async with engine.connect() as conn:
            pragma = {name: (await conn.exec_driver_sql(f"PRAGMA {name}")).scalar()
                      for name in ("journal_mode", "foreign_keys", "busy_timeout", "synchronous")}
    finally:
        await engine.dispose()
    assert pragma == {"journal_mode": "wal", "foreign_keys": 1, "busy_timeout": 5000, "synchronous": 1}


def test_storage_imports_neither_torch_nor_engine_nor_bot() -> None:
    code = ("import sys, storage.db, storage.models, storage.repo, storage.media; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'engine', 'bot')); "
            "assert not bad, bad")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
