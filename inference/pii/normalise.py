"""Undo common obfuscations in a copy of the text, keeping a map from every copied character back to the original.

People (and prompts pasted from chats) write ``john dot doe at example dot com``, ``john [at] example [dot] com``
or ``five five five, one two three four``; the recognisers only know the plain forms. The detector scans the
normalised copy as well as the original and maps what it finds back through ``Normalised.original_span``, so a
finding always points at the obfuscated characters the user actually wrote. Digits split by spaces, dashes or
line breaks need no normalisation: the digit recognisers accept those separators themselves.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_DIGIT_WORDS = {
    "zero": "0",
    "oh": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
}
_DIGIT_WORD = r"(?:zero|oh|one|two|three|four|five|six|seven|eight|nine)"
# Four or more digit words in a row: fewer is ordinary prose ("one or two"), and no PII number is shorter.
# (Whitespace runs are possessive, "*+": with plain "*" a long run of spaces could be split between the
# three optional parts in quadratically many ways before the pattern gave up.)
_SPELLED_DIGITS = rf"\b{_DIGIT_WORD}(?:[ \t]*+[,\-]?[ \t]*+\n?[ \t]*+{_DIGIT_WORD}\b){{3,}}\b"

_BRACKET_AT = r"[ \t]*[\[\(\{<][ \t]*at[ \t]*[\]\)\}>][ \t]*"
_BRACKET_DOT = r"[ \t]*[\[\(\{<][ \t]*dot[ \t]*[\]\)\}>][ \t]*"
_WORD_AT = r"[ \t]+at[ \t]+"
_WORD_DOT = r"[ \t]+dot[ \t]+"
_DOT = rf"(?:{_BRACKET_DOT}|{_WORD_DOT}|\.)"
# Bounded pieces (an address part of at most 64 characters, at most 8 dots a side) keep the pattern's
# worst case linear in the text: a long "a.a.a.a..." or "a dot a dot ..." can't make it backtrack for long.
_ATOM = r"[A-Za-z0-9_%+\-]{1,64}+"
# A spelled "at" between plain words is everywhere in English ("look at example dot com"), so the
# unbracketed form only counts before a domain that ends in a well-known top-level domain.
_COMMON_TLD = r"(?:com|org|net|edu|gov|io|ai|dev|co|uk|de|fr|es|it|nl|eu|ch|at|be|info|biz|me|us|ca|au)"
_SPELLED_EMAIL = (
    rf"\b{_ATOM}(?:{_DOT}{_ATOM}){{0,8}}"
    rf"(?:{_BRACKET_AT}{_ATOM}(?:{_DOT}{_ATOM}){{0,8}}{_DOT}[A-Za-z]{{2,24}}"
    rf"|{_WORD_AT}{_ATOM}(?:{_DOT}{_ATOM}){{0,8}}{_DOT}{_COMMON_TLD})\b"
)
_OBFUSCATION = re.compile(rf"(?P<digits>{_SPELLED_DIGITS})|(?P<email>{_SPELLED_EMAIL})", re.IGNORECASE)
_EMAIL_TOKEN = re.compile(rf"(?P<at>{_BRACKET_AT}|{_WORD_AT})|(?P<dot>{_BRACKET_DOT}|{_WORD_DOT})", re.IGNORECASE)
_DIGIT_TOKEN = re.compile(rf"{_DIGIT_WORD}|[^a-z]+", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class Normalised:
    """A normalised copy of ``original``; ``starts[i]:ends[i]`` is where copied character ``i`` came from.

    When nothing was normalised the maps are left empty (the identity), which is the common, cheap case.
    """

    original: str
    text: str
    starts: tuple[int, ...]
    ends: tuple[int, ...]

    @property
    def changed(self) -> bool:
        return self.text != self.original

    def original_span(self, start: int, end: int) -> tuple[int, int]:
        """The span of the original text that the copy's ``text[start:end]`` (non-empty) was made from."""
        assert 0 <= start < end <= len(self.text), (start, end, len(self.text))
        if not self.starts:
            return start, end
        return self.starts[start], self.ends[end - 1]


class _Builder:
    """Accumulates the copy piece by piece, each piece tied to the original span it replaces."""

    def __init__(self) -> None:
        self.pieces: list[str] = []
        self.starts: list[int] = []
        self.ends: list[int] = []

    def keep(self, original: str, start: int, end: int) -> None:
        self.pieces.append(original[start:end])
        self.starts.extend(range(start, end))
        self.ends.extend(range(start + 1, end + 1))

    def replace(self, replacement: str, start: int, end: int) -> None:
        self.pieces.append(replacement)
        self.starts.extend([start] * len(replacement))
        self.ends.extend([end] * len(replacement))


def _spell_out_digits(original: str, start: int, end: int, out: _Builder) -> None:
    # Each digit word becomes its digit; a comma, dash or line break between words becomes one space so
    # that "five five five, one two three four" keeps its grouping ("555 1234") for the phone recogniser.
    for token in _DIGIT_TOKEN.finditer(original, start, end):
        word = token.group().lower()
        if word in _DIGIT_WORDS:
            out.replace(_DIGIT_WORDS[word], token.start(), token.end())
        elif any(c in word for c in ",-\n"):
            out.replace(" ", token.start(), token.end())
        else:
            out.replace("", token.start(), token.end())


def _unspell_email(original: str, start: int, end: int, out: _Builder) -> None:
    position = start
    for token in _EMAIL_TOKEN.finditer(original, start, end):
        out.keep(original, position, token.start())
        out.replace("@" if token.group("at") else ".", token.start(), token.end())
        position = token.end()
    out.keep(original, position, end)


# Cheap tests that rule out any obfuscation for almost every prompt, so the full pattern (which tries an
# e-mail shape at every word) runs only when it can match. Both run on the lower-cased text.
_EMAIL_HINT = re.compile(
    rf"dot|[\[\(\{{<][ \t]*at[ \t]*[\]\)\}}>]| at [a-z0-9_%+\-]+(?:\.[a-z0-9\-]+)*\.{_COMMON_TLD}\b(?!@)"
)
_DIGITS_HINT = re.compile(
    rf"{_DIGIT_WORD}[ \t]*[,\-]?[ \t]*\n?[ \t]*{_DIGIT_WORD}[ \t]*[,\-]?[ \t]*\n?[ \t]*{_DIGIT_WORD}"
)


def normalise(text: str) -> Normalised:
    """Return ``text`` with spelled-out digits and spelled-out e-mail addresses written plainly."""
    lower = text.lower()
    if _EMAIL_HINT.search(lower) is None and _DIGITS_HINT.search(lower) is None:
        return Normalised(text, text, (), ())
    matches = list(_OBFUSCATION.finditer(text))
    if not matches:
        return Normalised(text, text, (), ())  # the common case: nothing to undo, no maps to build
    out = _Builder()
    position = 0
    for match in matches:
        out.keep(text, position, match.start())
        if match.group("digits"):
            _spell_out_digits(text, match.start(), match.end(), out)
        else:
            _unspell_email(text, match.start(), match.end(), out)
        position = match.end()
    out.keep(text, position, len(text))
    return Normalised(text, "".join(out.pieces), tuple(out.starts), tuple(out.ends))
