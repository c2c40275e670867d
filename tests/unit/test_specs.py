"""storage.specs: a job's payload is written and read back as its kind's typed spec."""

from __future__ import annotations

import json

import pytest

from storage.specs import JOB_KINDS, EditSpec, InvertSpec, JobSpec, MixSpec, MorphSpec, spec_of


@pytest.mark.parametrize("spec", [
    InvertSpec(photo_key="ab/cd.jpg", label="work"),
    EditSpec(face_id=3, text="smiling face", method="optimize", strength=2.5),
    MorphSpec(a_id=1, b_id=2, layers="coarse", frames=12, format="gif"),
    MixSpec(a_id=1, b_id=2, layers="fine"),
])
def test_a_spec_survives_the_json_column(spec: JobSpec) -> None:
    payload = json.loads(json.dumps(spec.payload()))
    assert spec_of(spec.kind, payload) == spec


def test_an_unset_strength_is_left_out_and_means_the_default() -> None:
    payload = EditSpec(face_id=3, text="beard").payload()
    assert payload == {"face_id": 3, "text": "beard", "method": "global"}
    assert spec_of("edit", payload).strength is None


def test_keys_of_earlier_versions_are_ignored() -> None:
    spec = spec_of("morph", {"a_id": 1, "b_id": 2, "layers": "all", "frames": 8, "format": "mp4",
                             "pingpong": True, "fps": 24})
    assert spec == MorphSpec(a_id=1, b_id=2, frames=8)


def test_every_kind_the_worker_takes_has_a_spec() -> None:
    assert JOB_KINDS == ("invert", "edit", "morph", "mix", "lineup")
