"""Shared test fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("STYLEBOT_FIXTURES", REPO.parent / "shared" / "fixtures"))


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """../shared/fixtures beside the clone (CI lays it there); skip where it is absent."""
    if not (FIXTURES / "README.md").exists():
        pytest.skip(f"parity fixtures not found at {FIXTURES} (set STYLEBOT_FIXTURES)")
    return FIXTURES


@pytest.fixture(autouse=True)
def _isolated_home(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No test reads or writes the user's real weights cache."""
    monkeypatch.setenv("STYLEBOT_HOME", str(tmp_path_factory.mktemp("home")))
