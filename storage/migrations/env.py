"""Alembic environment, async-aware.

``storage.db.upgrade`` hands in an open connection (``config.attributes["connection"]``, already
inside the migration lock); migrations run on it synchronously (we are inside
``AsyncConnection.run_sync``). Without one (alembic commands from code, e.g. ``revision
--autogenerate``), an engine is made from ``config.attributes["url"]`` or the ``sqlalchemy.url``
option and the migrations run through ``connection.run_sync`` under ``asyncio.run``.
"""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy import Connection

from storage.db import make_db
from storage.models import Base

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    url = config.attributes.get("url") or config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("no database URL: use storage.db.upgrade(url) or alembic_config(url)")
    return str(url)


def _run(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=target_metadata,
                      render_as_batch=connection.dialect.name == "sqlite")
    with context.begin_transaction():
        context.run_migrations()


async def _run_async() -> None:
    engine = make_db(_url())
    try:
        async with engine.connect() as connection:
            await connection.run_sync(_run)
            await connection.commit()
    finally:
        await engine.dispose()


def _main() -> None:
    if context.is_offline_mode():
        context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True)
        with context.begin_transaction():
            context.run_migrations()
        return
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
    else:
        asyncio.run(_run_async())


_main()
