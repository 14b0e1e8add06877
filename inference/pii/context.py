"""Context-word checks the recognisers share: is a cue word close before (or around) a candidate?"""

from __future__ import annotations

import re

# How far a cue may sit from the value it qualifies ("Phone (mobile, evenings): 0171 ..." still counts).
CONTEXT_WINDOW = 48


def cue_before(text: str, start: int, cue: re.Pattern[str], window: int = CONTEXT_WINDOW) -> bool:
    """Whether ``cue`` matches in the ``window`` characters before ``start`` on the same or previous line."""
    return cue.search(text, max(0, start - window), start) is not None


def cue_near(text: str, start: int, end: int, cue: re.Pattern[str], window: int = CONTEXT_WINDOW) -> bool:
    """Whether ``cue`` matches within ``window`` characters either side of ``text[start:end]``."""
    return cue.search(text, max(0, start - window), min(len(text), end + window)) is not None


def lowered(text: str) -> str:
    """``text`` lower-cased with every offset kept (a few characters, such as "İ", lower-case to two).

    Recognisers search cue words in this copy with case-sensitive, literal-first patterns: Python's regex
    engine skips ahead fast to a literal, but tries an IGNORECASE or \\b-led alternation at every position.
    """
    lower = text.lower()
    if len(lower) == len(text):
        return lower
    return "".join(c.lower() if len(c.lower()) == 1 else c for c in text)


def is_word_at(text: str, start: int, end: int) -> bool:
    """Whether ``text[start:end]`` is not glued to letters or digits on either side."""
    return (start == 0 or not text[start - 1].isalnum()) and (
        end >= len(text) or not text[end].isalnum() or not text[end - 1].isalnum()
    )


def glued_before(text: str, start: int, extra: str = "") -> bool:
    """Whether ``text[start]`` continues a word (or one of ``extra``) rather than starting a token.

    Hot patterns check this in Python instead of opening with a lookbehind or ``\\b``: a pattern that opens
    with a character class lets Python's regex engine skip ahead, one that opens with an assertion does not.
    """
    if start == 0:
        return False
    before = text[start - 1]
    return before.isalnum() or before == "_" or before in extra
