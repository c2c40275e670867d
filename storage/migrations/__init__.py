"""Alembic migrations of the stylebot database (run through storage.db.upgrade)."""
