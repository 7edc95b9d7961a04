"""Text that is safe to store, log and show: no control characters, no bidi overrides.

A tip's text comes from an LLM or quotes a user's task.  Control characters break logs and
prompts (and Postgres refuses NUL outright); bidirectional overrides make a tip render
differently from what it says; lone surrogates cannot be encoded as UTF-8 at all.  Text
from clients is refused with a message (:func:`unsafe_character`); text from a model is
cleaned (:func:`clean_text`), and the store cleans again before anything is written.
"""

from __future__ import annotations

import hashlib
import re

KEPT_CONTROLS = "\t\n"
BIDI_CONTROLS = "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
_REMOVED = {
    code: None
    for code in (*range(0x00, 0x20), 0x7F, *range(0x80, 0xA0), *map(ord, BIDI_CONTROLS))
    if chr(code) not in KEPT_CONTROLS
}
_SURROGATE = re.compile("[\ud800-\udfff]")
_UNSAFE = re.compile(
    "[\x00-\x08\x0b-\x1f\x7f-\x9f" + BIDI_CONTROLS + "\ud800-\udfff]",
)


def clean_text(value: str) -> str:
    """``value`` without C0/C1 controls (tab and newline kept) or bidi controls, and with
    every lone surrogate replaced by U+FFFD."""
    return _SURROGATE.sub("\ufffd", value.translate(_REMOVED))


def unsafe_character(value: str) -> str | None:
    """The first character :func:`clean_text` would change, as ``U+XXXX``; None if clean."""
    found = _UNSAFE.search(value)
    return None if found is None else f"U+{ord(found.group()):04X}"


def text_hash(text: str) -> str:
    """SHA-256 of the text with its whitespace collapsed: the key of a tip's embedding."""
    return hashlib.sha256(" ".join(text.split()).encode()).hexdigest()
