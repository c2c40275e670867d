"""Alembic revisions, oldest first (0001_initial, 0002_..., each revising the one before)."""
