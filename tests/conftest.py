"""Shared test fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import skimage.data
from PIL import Image

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
