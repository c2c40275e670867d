"""Weights without a direct download (the e4e encoder lives on Google Drive): `fetch` says where
to get the file and where to put it, then records and checks its hash."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from engine.errors import WeightsError, WeightsMissingError
from engine.weights import (
    MANIFEST,
    asset_path,
    fetch,
    list_assets,
    locate,
    recorded_hashes_path,
    sha256_file,
    verify,
)

E4E = MANIFEST["e4e-ffhq"]


def test_missing_file_says_where_to_get_it_and_where_to_put_it(tmp_path: Path) -> None:
    dest = asset_path(E4E, home=tmp_path)
    for call in (lambda: fetch(E4E, home=tmp_path), lambda: locate(E4E, home=tmp_path)):
        with pytest.raises(WeightsMissingError) as exc:
            call()
        message = exc.value.message
        assert E4E.page is not None and E4E.page in message and str(dest) in message
        assert "stylebot weights fetch e4e-ffhq" in message and "\n" not in message
    assert not dest.parent.exists() or not any(dest.parent.iterdir())  # no litter


def test_placed_file_is_recorded_then_checked(tmp_path: Path) -> None:
    dest = asset_path(E4E, home=tmp_path)
    dest.parent.mkdir(parents=True)
    dest.write_bytes(os.urandom(5000))
    assert fetch(E4E, home=tmp_path) == dest
    recorded = json.loads(recorded_hashes_path(tmp_path).read_text())["e4e-ffhq"]
    assert recorded["sha256"] == sha256_file(dest) and recorded["size_bytes"] == 5000
    assert verify(E4E, home=tmp_path).ok and locate(E4E, home=tmp_path) == dest
    row = next(r for r in list_assets(home=tmp_path) if r.name == "e4e-ffhq")
    assert row.present and row.kind == "encoder"

    dest.write_bytes(os.urandom(5000))  # another file in its place
    assert not verify(E4E, home=tmp_path).ok
    with pytest.raises(WeightsError, match="--force") as exc:
        fetch(E4E, home=tmp_path)
    assert E4E.page is not None and E4E.page in exc.value.message
    fetch(E4E, home=tmp_path, force=True)  # the person says this file is the right one
    assert verify(E4E, home=tmp_path).ok
