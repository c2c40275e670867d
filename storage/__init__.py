"""Persistence: SQLAlchemy models and repository functions, alembic migrations, the media store.

Import the submodules (storage.db, storage.models, storage.repo, storage.media); this package
imports nothing and never torch, engine/ or bot/.
"""
