"""What a user asked for, the same on every platform: frozen dataclasses the adapters build.

Adapters only translate platform updates into these and :class:`Reply` objects back into
platform messages; the meaning lives in :mod:`bot.service`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from storage.specs import MORPH_FRAMES

__all__ = [
    "Button",
    "Command",
    "Edit",
    "Forget",
    "Help",
    "Lineup",
    "Media",
    "Mix",
    "Morph",
    "Origin",
    "Press",
    "Reply",
    "Selfie",
    "SetPrivacy",
    "ShowFaces",
    "Target",
]


@dataclass(frozen=True)
class Origin:
    """Who sent a command, from which chat, and where replies go (opaque to the service)."""

    platform: str
    user_id: str
    chat_id: str
    chat_kind: Literal["private", "group"] = "private"
    username: str | None = None
    display_name: str | None = None
    chat_title: str | None = None
    reply_to: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)


@dataclass(frozen=True)
class Target:
    """A person named in a command: "me", an @username, or a platform user id (a reply)."""

    me: bool = False
    username: str | None = None
    user_id: str | None = None

    def describe(self) -> str:
        return "you" if self.me else f"@{self.username}" if self.username else "that person"


@dataclass(frozen=True)
class Selfie:
    origin: Origin
    photo: bytes = field(repr=False)
    label: str = "default"


@dataclass(frozen=True)
class Morph:
    origin: Origin
    a: Target
    b: Target
    frames: int = MORPH_FRAMES
    fmt: Literal["mp4", "gif"] = "mp4"
    layers: Literal["all", "coarse", "middle", "fine"] = "all"
    more: tuple[Target, ...] = ()  # a group tour: after b, these, then back to a


@dataclass(frozen=True)
class Lineup:
    """Everyone in the chat who shared a face (and allows it), with one text edit, in a grid."""

    origin: Origin
    text: str
    strength: float | None = None


@dataclass(frozen=True)
class Edit:
    origin: Origin
    text: str
    strength: float | None = None
    method: Literal["global", "optimize"] = "global"
    label: str | None = None


@dataclass(frozen=True)
class Mix:
    origin: Origin
    a: Target
    b: Target
    layers: Literal["coarse", "middle", "fine"] = "coarse"


@dataclass(frozen=True)
class ShowFaces:
    origin: Origin


@dataclass(frozen=True)
class Forget:
    origin: Origin
    confirmed: bool = False


@dataclass(frozen=True)
class SetPrivacy:
    origin: Origin
    policy: Literal["everyone", "chat", "ask", "nobody"] | None = None  # None: show the current one


@dataclass(frozen=True)
class Help:
    origin: Origin


@dataclass(frozen=True)
class Press:
    """A button under a result was pressed; ``data`` is what the button carried (bot.buttons)."""

    origin: Origin
    data: str


Command = Selfie | Morph | Edit | Mix | Lineup | ShowFaces | Forget | SetPrivacy | Help | Press


@dataclass(frozen=True)
class Media:
    path: Path
    kind: Literal["photo", "animation", "video", "document"]
    caption: str | None = None


@dataclass(frozen=True)
class Button:
    """A button under a message: its label, and what a press sends back (ids only)."""

    label: str
    data: str


@dataclass(frozen=True)
class Reply:
    """A message for an adapter to send (or, with ``edit_of``, to edit in place).

    ``edit_of``: the progress message to update, as the adapter gave it; when it cannot be edited
    any more the reply goes out as a new message, unless ``edit_only`` (then nothing is sent).
    ``private``: only the person who asked should see it (ephemeral where the platform has that).
    ``buttons``: rows of buttons under the message."""

    reply_to: dict[str, Any]
    text: str
    media: tuple[Media, ...] = ()
    edit_of: dict[str, Any] | None = None
    final: bool = True
    edit_only: bool = False
    private: bool = False
    buttons: tuple[tuple[Button, ...], ...] = ()
