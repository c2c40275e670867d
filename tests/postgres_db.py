"""A throwaway PostgreSQL database for tests, on the server of the ``postgres_url`` fixture
(postgresql+asyncpg://...; any database on it: each test creates and drops its own)."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator

from sqlalchemy import make_url

from storage.db import make_db

__all__ = ["BACKENDS", "fresh_postgres_database"]

BACKENDS = ["sqlite", "postgresql"]


@contextlib.asynccontextmanager
async def fresh_postgres_database(server_url: str) -> AsyncIterator[str]:
    """The URL of a new, empty database on the server at ``server_url``; dropped afterwards."""
    name = f"stylebot_test_{uuid.uuid4().hex[:12]}"
    admin = make_db(server_url, isolation_level="AUTOCOMMIT")
    try:
        async with admin.connect() as conn:
            await conn.exec_driver_sql(f"CREATE DATABASE {name}")
        try:
            yield make_url(server_url).set(database=name).render_as_string(hide_password=False)
        finally:
            async with admin.connect() as conn:
                await conn.exec_driver_sql(f"DROP DATABASE {name} WITH (FORCE)")
    finally:
        await admin.dispose()
