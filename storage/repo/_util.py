"""Helpers shared by the repository modules (private)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from sqlalchemy import inspect
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession

from storage.media import is_media_key
from storage.models import Base


async def insert_ignore(s: AsyncSession, model: type[Base], values: dict[str, Any],
                        conflict: Sequence[str]) -> None:
    """INSERT that does nothing when a row with the same ``conflict`` columns exists.

    ``ON CONFLICT DO NOTHING`` on SQLite and PostgreSQL, so two processes creating the same
    user (or membership, or share) at once both succeed. Other dialects: a plain INSERT.
    """
    dialect = s.get_bind().dialect.name
    if dialect == "sqlite":
        await s.execute(sqlite_insert(model).values(**values).on_conflict_do_nothing(index_elements=conflict))
    elif dialect == "postgresql":
        await s.execute(pg_insert(model).values(**values).on_conflict_do_nothing(index_elements=conflict))
    else:
        s.add(model(**values))
        await s.flush()


def plain_json(value: Any) -> Any:
    """A JSON-ready copy: numpy scalars/arrays to Python numbers/lists, tuples to lists."""
    if isinstance(value, dict):
        return {str(k): plain_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain_json(v) for v in value]
    if isinstance(value, np.ndarray):
        return plain_json(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    return value


def media_keys_in(value: Any) -> set[str]:
    """Media keys found in a JSON value under keys ending in ``_key`` (a string) or ``_keys``
    (a list of strings), at any depth. Strings that are not well-formed media keys are skipped."""
    found: set[str] = set()
    if isinstance(value, dict):
        for name, item in value.items():
            if isinstance(name, str) and name.endswith("_key") and is_media_key(item):
                found.add(item)
            elif isinstance(name, str) and name.endswith("_keys") and isinstance(item, list):
                found.update(k for k in item if is_media_key(k))
            else:
                found |= media_keys_in(item)
    elif isinstance(value, list):
        for item in value:
            found |= media_keys_in(item)
    return found


def loaded_value(obj: object, attribute: str) -> Any:
    """An attribute's loaded value without triggering a (blocking, async-unsafe) load."""
    return inspect(obj).dict.get(attribute)


def expunge_where(s: AsyncSession, classes: Iterable[type[Base]], attribute: str,
                  values: set[Any]) -> None:
    """Drop objects of ``classes`` whose ``attribute`` is in ``values`` from the identity map
    (after a bulk or cascaded delete removed their rows)."""
    kinds = tuple(classes)
    for obj in list(s.identity_map.values()):
        if isinstance(obj, kinds) and loaded_value(obj, attribute) in values:
            s.expunge(obj)
