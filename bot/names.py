"""Names people give themselves in the web chat, and when one looks like another.

Whoever types a name is that person there, so a name that *looks* like someone else's ("аlice"
with a Cyrillic "а", "ａｌｉｃｅ" in full width, "alicé") would let one person pass for another.
:func:`skeleton` maps a name to what it looks like: NFKC (full width and other compatibility
forms become plain letters), case folded, accents dropped, and letters of other scripts that look
like Latin ones (UTS #39's most common confusables) replaced by them. Two names with one skeleton
are one name to the eye.
"""

from __future__ import annotations

import unicodedata

__all__ = ["skeleton"]

# Lowercase letters that look like Latin ones (Cyrillic, Greek, Armenian, IPA), and digits that
# stand for letters in names.
_LOOKALIKES = str.maketrans({
    "а": "a", "в": "b", "е": "e", "ё": "e", "һ": "h", "і": "i", "ї": "i", "ј": "j", "к": "k",
    "ӏ": "l", "м": "m", "н": "h", "о": "o", "р": "p", "ԛ": "q", "с": "c", "ѕ": "s", "т": "t",
    "у": "y", "ү": "y", "х": "x", "ԁ": "d", "ԝ": "w", "ѡ": "w", "ɡ": "g", "ɑ": "a", "ı": "i",
    "ȷ": "j", "ɩ": "i", "α": "a", "β": "b", "ε": "e", "η": "n", "ι": "i", "κ": "k", "ν": "v",
    "ο": "o", "ρ": "p", "τ": "t", "υ": "u", "χ": "x", "ω": "w", "ϲ": "c", "ϳ": "j", "ս": "u",
    "օ": "o", "ո": "n", "հ": "h", "ց": "g", "0": "o", "1": "l",
})


def skeleton(name: str) -> str:
    """What ``name`` looks like, for telling look-alike names apart."""
    folded = unicodedata.normalize("NFKC", name).casefold()
    bare = "".join(c for c in unicodedata.normalize("NFD", folded) if not unicodedata.combining(c))
    return unicodedata.normalize("NFC", bare).translate(_LOOKALIKES)
