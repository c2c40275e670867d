"""The throwaway servers of tests/conftest.py answer: Redis through redis.asyncio, PostgreSQL through
the app's own engine."""

from __future__ import annotations

import redis.asyncio as aioredis
from sqlalchemy import text

from storage.db import make_db


async def test_redis_server_answers_ping_and_keeps_values(redis_url: str) -> None:
    client = aioredis.from_url(redis_url)
    try:
        assert await client.ping()
        await client.set("stylebot-test", "v1")
        assert await client.get("stylebot-test") == b"v1"
    finally:
        await client.aclose()


async def test_postgres_server_answers_a_query(postgres_url: str) -> None:
    engine = make_db(postgres_url)
    try:
        async with engine.connect() as conn:
            assert (await conn.execute(text("SELECT 1"))).scalar_one() == 1
            assert conn.dialect.name == "postgresql"
    finally:
        await engine.dispose()
