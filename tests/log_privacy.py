"""The proof that logs hold no secrets and no face data.

The e2e tests capture everything the bot logs (every logger, at DEBUG, in the test process) and
everything the engine and ``stylebot run`` processes write to stdout and stderr, and pass it to
:func:`assert_no_private_data` at the end of their flow. What counts as private, concretely:

- **Secrets**: the bot tokens and the web chat's access token (and anything that grants the same
  access, such as the web chat's cookie value). A secret leaks when any 16 consecutive characters
  of it (all of it, if shorter) appear in the log, as is or percent-encoded (a token in a URL).
- **Face data**: the photos users send, the images and videos the bot makes from them (aligned
  face, reconstruction, edits, morphs) and the W+ latents (their float32 bytes). Each blob passed
  in ``face_data`` is sampled: 24-byte chunks at its start, a third and two thirds in. A chunk
  leaks when it appears in the log as base64 (standard or URL-safe alphabet, any of the three
  byte alignments), as hex (either case), inside a Python ``bytes`` repr (``\\xff\\xd8...``) or
  as the raw bytes (logs read with :func:`read_log`, which maps every byte to one character).
  Chunks with fewer than 8 distinct byte values (zero padding) are not face data and are skipped.
  A logged slice that misses all three samples is left to the shape rules below.
- **Anything that looks like a blob or a latent**, whatever it came from:
  a base64 run of 200 or more characters; a hex run of more than 64 characters (exactly 64 is a
  SHA-256 digest: media keys are the SHA-256 of the content and appear, as identifiers, in the
  SQL parameters aiosqlite logs at DEBUG; job ids are 32 hex); 32 or more hex bytes separated by
  spaces or colons (a hex dump); 16 or more ``\\xNN`` escapes close together (binary data in a
  ``bytes`` repr); 16 or more decimal numbers with a fractional part or an exponent separated only
  by commas, semicolons, whitespace, brackets or ``...`` (a latent or tensor printout).

A finding is reported with its line number and a masked excerpt: the failure message never
repeats the secret or the data it found.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import re
import urllib.parse
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Finding", "LogCapture", "LogScan", "assert_no_private_data", "capturing_logs",
           "find_private_data", "read_log"]

SECRET_WINDOW = 16  # this many consecutive characters of a secret count as a leak
CHUNK = 24  # bytes of face data per sample
MIN_DISTINCT = 8  # a chunk with fewer distinct byte values (padding, zeros) is not sampled
FLOAT_RUN = 16

_BASE64_RUN = re.compile(r"[A-Za-z0-9+/]{200,}")  # also URL-safe runs: the text is normalised first
_HEX_RUN = re.compile(r"(?<![0-9a-fA-F])[0-9a-fA-F]{65,}(?![0-9a-fA-F])")
_HEX_DUMP = re.compile(r"(?<![0-9a-fA-F])(?:[0-9a-fA-F]{2}[ :]){31,}[0-9a-fA-F]{2}(?![0-9a-fA-F])")
_ESCAPES = re.compile(r"(?:\\x[0-9a-fA-F]{2}(?:[^\s\\]|\\[nrt\\'\"]){0,4}){16,}")
_FLOAT = r"[-+]?(?:\d+\.\d*(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?|\d+[eE][-+]?\d+)"
_SEP = r"(?:[\s,;\[\]()]|\.\.\.)+"
_FLOATS = re.compile(rf"(?<![\w.]){_FLOAT}(?:{_SEP}{_FLOAT}){{{FLOAT_RUN - 1},}}")
_URLSAFE_TO_STD = str.maketrans("-_", "+/")
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")  # keeps offsets


@dataclass(frozen=True)
class Finding:
    kind: str  # what leaked: "secret #1", "face data #3 (hex)", "a run of 17 floats", ...
    line: int  # 1-based line of the log where it starts
    excerpt: str  # the line around it, the finding itself masked


@dataclass(frozen=True)
class LogScan:
    lines: int
    chars: int

    def __str__(self) -> str:
        return f"{self.lines} lines, {self.chars} characters"


def read_log(path: Path) -> str:
    """A process's captured output as text, one character per byte (latin-1), so that raw bytes
    written to it can be found too; what the processes log themselves is ASCII."""
    return path.read_bytes().decode("latin-1")


_FORMATTER = logging.Formatter("%(name)s %(levelname)s: %(message)s")


class LogCapture(logging.Handler):
    """Every record that reaches the root logger, formatted when it is emitted (as a log file would
    have it, traceback included)."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.setFormatter(_FORMATTER)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))

    def text(self) -> str:
        return "\n".join(self.lines)


@contextlib.contextmanager
def capturing_logs() -> Iterator[LogCapture]:
    """Log everything at DEBUG (the root logger's level; a library that sets its own level, as
    SQLAlchemy does, keeps it) into a :class:`LogCapture` until the block ends."""
    root = logging.getLogger()
    capture, level = LogCapture(), root.level
    root.addHandler(capture)
    root.setLevel(logging.DEBUG)
    try:
        yield capture
    finally:
        root.removeHandler(capture)
        root.setLevel(level)


def _secret_needles(secret: str) -> dict[str, tuple[str, int]]:
    """Every window of the secret, as is and percent-encoded: window -> (the form, where it starts)."""
    if len(secret) < 8:
        raise ValueError("a secret shorter than 8 characters cannot be told apart from ordinary text")
    needles: dict[str, tuple[str, int]] = {}
    for form in (secret, urllib.parse.quote(secret, safe="")):
        width = min(len(form), SECRET_WINDOW)
        for i in range(len(form) - width + 1):
            needles.setdefault(form[i:i + width], (form, i))
    return needles


def _extent(text: str, at: int, width: int, form: str, i: int) -> tuple[int, int]:
    """The span of ``text`` around the window found at ``at`` that still matches ``form`` (masked
    whole in the report)."""
    start, end = at, at + width
    while start > 0 and i > 0 and text[start - 1] == form[i - 1]:
        start, i = start - 1, i - 1
    j = i + (end - start)
    while end < len(text) and j < len(form) and text[end] == form[j]:
        end, j = end + 1, j + 1
    return start, end


def _chunks(blob: bytes) -> list[bytes]:
    """The sampled chunks of ``blob``: start, a third and two thirds in (each with the next 2
    bytes, so that base64 can be tried at all three byte alignments)."""
    if len(blob) < CHUNK + 2:
        return []
    starts = sorted({0, (len(blob) - CHUNK - 2) // 3, 2 * (len(blob) - CHUNK - 2) // 3})
    return [blob[o:o + CHUNK + 2] for o in starts]


def _repr_inner(chunk: bytes) -> str | None:
    """``chunk`` as it appears inside any ``bytes`` repr that contains it (None where the quote
    character the repr picks would change it)."""
    if b"'" in chunk or b'"' in chunk:
        return None
    return repr(chunk)[2:-1]


def _face_needles(blob: bytes) -> list[tuple[str, str]]:
    """(form, text) pairs; "base64" needles are matched against the log with URL-safe characters
    turned into standard ones, "hex" needles against the lower-cased log."""
    needles: list[tuple[str, str]] = []
    for wide in _chunks(blob):
        chunk = wide[:CHUNK]
        if len(set(chunk)) < MIN_DISTINCT:
            continue
        for shift in range(3):  # base64 of a slice that starts 0, 1 or 2 bytes before this chunk
            part = wide[shift:shift + CHUNK - 3]  # 21 bytes: 28 characters, no padding
            needles.append(("base64", base64.b64encode(part).decode()))
        needles.append(("hex", chunk.hex()))
        needles.append(("raw bytes", chunk.decode("latin-1")))
        if (inner := _repr_inner(chunk)) is not None:
            needles.append(("bytes repr", inner))
    return needles


def _at(text: str, start: int, end: int) -> tuple[int, str]:
    line = text.count("\n", 0, start) + 1
    first = text.rfind("\n", 0, start) + 1
    last = text.find("\n", end)
    last = len(text) if last < 0 else last
    before = text[max(first, start - 60):start]
    after = text[end:min(last, end + 40)]
    return line, f"...{before}<{end - start} characters masked>{after}..."


def find_private_data(log_text: str, *, secrets: Iterable[str] = (),
                      face_data: Iterable[bytes] = ()) -> list[Finding]:
    """Every place ``log_text`` shows a secret, a sample of ``face_data`` or something shaped like a
    blob or a latent (see the module docstring for the exact rules)."""
    findings: list[Finding] = []
    as_std_base64 = log_text.translate(_URLSAFE_TO_STD)
    lower = log_text.translate(_ASCII_LOWER)
    haystacks = {"base64": as_std_base64, "hex": lower}

    def report(kind: str, start: int, end: int) -> None:
        line, excerpt = _at(log_text, start, end)
        findings.append(Finding(kind, line, excerpt))

    for n, secret in enumerate(secrets, 1):
        for needle, (form, i) in _secret_needles(secret).items():
            if (at := log_text.find(needle)) >= 0:
                report(f"secret #{n}", *_extent(log_text, at, len(needle), form, i))
                break
    for n, blob in enumerate(face_data, 1):
        for form, needle in _face_needles(blob):
            if (i := haystacks.get(form, log_text).find(needle)) >= 0:
                report(f"face data #{n} ({form})", i, i + len(needle))
                break
    for m in _BASE64_RUN.finditer(as_std_base64):
        report(f"a base64-like run of {len(m.group())} characters", m.start(), m.end())
    for m in _HEX_RUN.finditer(log_text):
        report(f"a hex run of {len(m.group())} characters", m.start(), m.end())
    for m in _HEX_DUMP.finditer(log_text):
        report("a hex dump", m.start(), m.end())
    for m in _ESCAPES.finditer(log_text):
        report(f"binary data in a bytes repr ({m.group().count(chr(92) + 'x')} escapes)",
               m.start(), m.end())
    for m in _FLOATS.finditer(log_text):
        count = len(re.findall(_FLOAT, m.group()))
        report(f"a run of {count} floats (a latent printout?)", m.start(), m.end())
    return sorted(findings, key=lambda f: f.line)


def assert_no_private_data(log_text: str, *, secrets: Iterable[str] = (),
                           face_data: Iterable[bytes] = ()) -> LogScan:
    """Fail with every finding of :func:`find_private_data`; else say how much was scanned."""
    findings = find_private_data(log_text, secrets=secrets, face_data=face_data)
    shown = "\n".join(f"  line {f.line}: {f.kind}: {f.excerpt}" for f in findings[:20])
    more = f"\n  ... and {len(findings) - 20} more" if len(findings) > 20 else ""
    assert not findings, f"private data in the logs:\n{shown}{more}"
    return LogScan(lines=log_text.count("\n") + 1 if log_text else 0, chars=len(log_text))
