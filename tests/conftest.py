"""Shared test fixtures."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import skimage.data
from PIL import Image
from servers import MissingServer, Server, start_postgres, start_redis

from engine.align import FaceDetector

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("STYLEBOT_FIXTURES", REPO.parent / "shared" / "fixtures"))


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """../shared/fixtures beside the clone (CI lays it there); skip where it is absent."""
    if not (FIXTURES / "README.md").exists():
        pytest.skip(f"parity fixtures not found at {FIXTURES} (set STYLEBOT_FIXTURES)")
    return FIXTURES


@pytest.fixture(scope="session")
def detector() -> FaceDetector:
    """One MTCNN detector for the whole run (its weights ship in facenet-pytorch)."""
    return FaceDetector()


@pytest.fixture(scope="session")
def astronaut() -> Image.Image:
    """A real face photo that ships with scikit-image."""
    return Image.fromarray(skimage.data.astronaut())


@pytest.fixture(autouse=True)
def _isolated_home(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No test reads or writes the user's real weights cache."""
    monkeypatch.setenv("STYLEBOT_HOME", str(tmp_path_factory.mktemp("home")))


def _server_url(env_var: str, start: Callable[[], Server]) -> Iterator[str]:
    """The server named by ``env_var``, else a throwaway one started now and stopped afterwards."""
    if url := os.environ.get(env_var, "").strip():
        yield url
        return
    try:
        server = start()
    except MissingServer as exc:  # a failure, not a skip: these runs must not vanish silently
        pytest.fail(f"{exc} (or set {env_var} to a server of your own)", pytrace=False)
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A PostgreSQL server's postgresql+asyncpg:// URL (database "postgres", a superuser); started
    at the first test that asks, stopped at the end of the run. STYLEBOT_TEST_POSTGRES_URL: use that one."""
    yield from _server_url("STYLEBOT_TEST_POSTGRES_URL", start_postgres)


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A Redis server's redis:// URL (database 0, nothing persisted); started at the first test that
    asks, stopped at the end of the run. STYLEBOT_TEST_REDIS_URL: use that one."""
    yield from _server_url("STYLEBOT_TEST_REDIS_URL", start_redis)
