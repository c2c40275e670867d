"""Typed job payloads, one per kind: the service writes them, the worker and the replies read them.

A job row keeps its payload as JSON (:meth:`JobSpec.payload`); :func:`spec_of` reads it back.
Keys no spec names are ignored, so rows written by earlier versions still read.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

__all__ = [
    "JOB_KINDS",
    "MORPH_FPS",
    "MORPH_MAX_PEOPLE",
    "MORPH_FRAMES",
    "EditSpec",
    "InvertSpec",
    "JobSpec",
    "LineupSpec",
    "MixSpec",
    "MorphSpec",
    "spec_of",
]

MORPH_FRAMES = 32  # a morph's frames when none are asked for (chat and CLI alike)
MORPH_FPS = 24.0  # and its frame rate
MORPH_MAX_PEOPLE = 8  # faces one morph tours through (a group demo)
LayerGroup = Literal["all", "coarse", "middle", "fine"]


@dataclass(frozen=True, kw_only=True)
class _Spec:
    kind: ClassVar[str]

    def payload(self) -> dict[str, Any]:
        """The JSON the job row stores (unset optional values left out)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclass(frozen=True, kw_only=True)
class InvertSpec(_Spec):
    """A selfie to align and invert into a saved face."""

    kind: ClassVar[str] = "invert"
    photo_key: str
    label: str = "default"


@dataclass(frozen=True, kw_only=True)
class EditSpec(_Spec):
    """A text edit of a saved face; ``strength`` None: the method's default."""

    kind: ClassVar[str] = "edit"
    face_id: int
    text: str
    method: Literal["global", "optimize"] = "global"
    strength: float | None = None


@dataclass(frozen=True, kw_only=True)
class MorphSpec(_Spec):
    """An animation from face ``a_id`` to face ``b_id``."""

    kind: ClassVar[str] = "morph"
    a_id: int
    b_id: int
    layers: LayerGroup = "all"
    frames: int = MORPH_FRAMES
    format: Literal["mp4", "gif"] = "mp4"
    pingpong: bool = True
    names: list[str] | None = None  # the people, as captions name them
    more_ids: list[int] | None = None  # a tour: after b these faces, then back to a (no pingpong)


@dataclass(frozen=True, kw_only=True)
class MixSpec(_Spec):
    """Face ``a_id`` with face ``b_id``'s styles in one layer group."""

    kind: ClassVar[str] = "mix"
    a_id: int
    b_id: int
    layers: Literal["coarse", "middle", "fine"] = "coarse"
    names: list[str] | None = None  # the two people, as captions name them


@dataclass(frozen=True, kw_only=True)
class LineupSpec(_Spec):
    """The same text edit of several people's faces, in one grid (a group demo)."""

    kind: ClassVar[str] = "lineup"
    face_ids: list[int]
    text: str
    names: list[str] | None = None  # the people, in the grid's order
    strength: float | None = None


JobSpec = InvertSpec | EditSpec | MorphSpec | MixSpec | LineupSpec
_BY_KIND: dict[str, type[JobSpec]] = {cls.kind: cls for cls in (InvertSpec, EditSpec, MorphSpec, MixSpec,
                                                                 LineupSpec)}
JOB_KINDS = tuple(_BY_KIND)


def spec_of(kind: str, payload: dict[str, Any]) -> JobSpec:
    """A job row's payload as its kind's spec."""
    cls = _BY_KIND[kind]
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in payload.items() if k in names})
