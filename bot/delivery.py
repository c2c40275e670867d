"""How a platform answered a message the bot tried to send, in words every adapter shares.

Adapters translate their platform's errors into these two (and nothing else escapes ``deliver``
for a platform reason); the reply pump decides what to do with them:

- :class:`Undeliverable`: the platform will never take it (the user blocked the bot, deleted
  their account, the bot left the group, the chat is gone). Never tried again.
- :class:`TryLater`: not now (rate limited, server error, network trouble). Tried again in the
  same chat after a wait (at least ``retry_after`` when the platform named one), a few times.
"""

from __future__ import annotations

from dataclasses import dataclass

from settings import DeliveryConfig

__all__ = ["DeliveryFailed", "RetryPolicy", "TryLater", "Undeliverable"]


class DeliveryFailed(Exception):
    """A platform did not take a message; ``reason`` is one line (no token, no user data)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Undeliverable(DeliveryFailed):
    """The platform will never take messages for this chat (or this message)."""


class TryLater(DeliveryFailed):
    """The platform could not take it now; ``retry_after``: the seconds it asked us to wait."""

    def __init__(self, reason: str, *, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


@dataclass(frozen=True)
class RetryPolicy:
    """Waits between tries: doubling from ``first_s`` up to ``max_s``, never shorter than a
    platform's ``retry_after``; ``attempts`` tries in all."""

    attempts: int
    first_s: float
    max_s: float

    @classmethod
    def from_config(cls, cfg: DeliveryConfig) -> RetryPolicy:
        return cls(attempts=cfg.attempts, first_s=float(cfg.first_retry_s), max_s=float(cfg.max_retry_s))

    def wait_s(self, failures: int, retry_after: float | None = None) -> float:
        """Seconds to wait after the ``failures``-th failed try (1 = the first)."""
        backoff = min(self.max_s, self.first_s * 2 ** max(failures - 1, 0))
        return max(backoff, retry_after or 0.0)

    def gives_up_after(self, failures: int) -> bool:
        return failures >= self.attempts
