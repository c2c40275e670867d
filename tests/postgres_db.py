"""A throwaway PostgreSQL database for tests, where STYLEBOT_TEST_POSTGRES_URL names a server
(postgresql+asyncpg://...; any database on it: each test creates and drops its own)."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import AsyncIterator

from sqlalchemy import make_url

from storage.db import make_engine

__all__ = ["BACKENDS", "POSTGRES_URL", "fresh_postgres_database"]

POSTGRES_URL = os.environ.get("STYLEBOT_TEST_POSTGRES_URL", "")
BACKENDS = ["sqlite", "postgresql"] if POSTGRES_URL else ["sqlite"]


@contextlib.asynccontextmanager
async def fresh_postgres_database() -> AsyncIterator[str]:
    """The URL of a new, empty database on the server; dropped afterwards."""
    name = f"stylebot_test_{uuid.uuid4().hex[:12]}"
    admin = make_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    try:
        async with admin.connect() as conn:
            await conn.exec_driver_sql(f"CREATE DATABASE {name}")
        yield make_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False)
        async with admin.connect() as conn:
            await conn.exec_driver_sql(f"DROP DATABASE {name} WITH (FORCE)")
    finally:
        await admin.dispose()
