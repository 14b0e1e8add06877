"""Undo common obfuscations in a copy of the text, keeping a map from every copied character back to the original.

People (and prompts pasted from chats) write ``john dot doe at example dot com``, ``jean point dupont arobase
orange point fr``, ``john [at] example [dot] com``, ``81[.]206[.]130[.]46``, ``five five five, one two three four`` or ``zéro six,
cinquante et un, quatre-vingt-quinze, douze``; the recognisers only know the plain forms. The detector scans
the normalised copy as well as the original and maps what it finds back through ``Normalised.original_span``,
so a finding always points at the obfuscated characters the user actually wrote. Digits split by spaces,
dashes or line breaks need no normalisation: the digit recognisers accept those separators themselves.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

from inference.pii.context import lowered
from inference.pii.number_words import (
    PLUS_WORDS,
    REPEAT_WORDS,
    TENS_THEN_UNIT_JOINERS,
    UNIT_THEN_TENS_JOINERS,
    number_words,
)

# E-mail addresses ---------------------------------------------------------------------------------------
# Words for "@" and "." in en/es/pt/fr/de/it/nl. The English "at" (and the German, which is the same word)
# is everywhere in prose ("look at example dot com"), so written plainly between spaces it only counts before
# a domain that ends in a well-known top-level domain; the other words are distinctive.
_AT_WORDS = r"at|@|arroba|arobase|arrobase|arobas|klammeraffe|chiocciola|chiocciolina|apenstaartje|apestaartje"
_DISTINCTIVE_AT = r"arroba|arobase|arrobase|arobas|klammeraffe|chiocciola|chiocciolina|apenstaartje|apestaartje|@"
_DOT_WORDS = r"dot|punto|ponto|point|punkt|punt"
_OPEN, _CLOSE = r"[\[\(\{<]", r"[\]\)\}>]"
_BRACKETED_AT = rf"[ \t]{{0,3}}{_OPEN}[ \t]?(?:{_AT_WORDS})[ \t]?{_CLOSE}[ \t]{{0,3}}"
_SPACED_AT = rf"[ \t]{{1,3}}(?:{_DISTINCTIVE_AT})[ \t]{{1,3}}"
_DOT_TOKEN = rf"[ \t]{{0,3}}{_OPEN}[ \t]?(?:{_DOT_WORDS}|\.)[ \t]?{_CLOSE}[ \t]{{0,3}}|[ \t]{{1,3}}(?:{_DOT_WORDS}|\.)[ \t]{{1,3}}|\."
# Bounded pieces (an address part of at most 64 characters, at most 8 dots a side) keep every pattern's
# worst case linear in the text.
_ATOM = r"[a-z0-9_%+\-]{1,64}+"
_COMMON_TLD = (
    r"(?:com|org|net|edu|gov|io|ai|dev|co|uk|de|fr|es|it|nl|eu|ch|at|be|pt|br|mx|ar|pl|se|dk|no|fi|ie|lu|cz"
    r"|info|biz|me|us|ca|au)"
)
_DOMAIN = rf"{_ATOM}(?:(?:{_DOT_TOKEN}){_ATOM}){{0,8}}(?:{_DOT_TOKEN})"
# An at-token and the domain after it; the local part before it is read backwards (``_local_part_start``).
# Opening with a character class lets the regex engine skip ahead to spaces and brackets.
_AT_AND_DOMAIN = re.compile(
    rf"(?P<at>{_BRACKETED_AT}|{_SPACED_AT})(?P<domain>{_DOMAIN}[a-z]{{2,24}})(?![a-z0-9])"
    rf"|(?P<plain_at>[ \t]{{1,3}}at[ \t]{{1,3}})(?P<plain_domain>{_DOMAIN}{_COMMON_TLD})(?![a-z0-9])"
)
_DOT_BEFORE = re.compile(rf"(?:{_DOT_TOKEN})\Z")
_EMAIL_TOKEN = re.compile(rf"(?P<at>{_BRACKETED_AT}|[ \t]{{1,3}}(?:{_AT_WORDS})[ \t]{{1,3}})|(?P<dot>{_DOT_TOKEN})")
_ATOM_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_%+-")
_MAX_ATOM, _MAX_DOTS = 64, 8


def _local_part_start(lower: str, at: int) -> int | None:
    """Where the local part that ends at ``at`` begins: atoms joined by dot-words, read leftwards."""
    start = None
    position = at
    for _ in range(_MAX_DOTS + 1):
        atom = position
        while atom > 0 and position - atom < _MAX_ATOM and lower[atom - 1] in _ATOM_CHARS:
            atom -= 1
        if atom == position or (atom > 0 and lower[atom - 1].isalnum()):
            break  # no atom here, or one longer than an address part: stop at what was read
        start = atom
        dot = _DOT_BEFORE.search(lower, max(0, atom - 20), atom)
        if dot is None:
            break
        position = dot.start()
    return start


# Cheap tests that rule out a spelled address for almost every prompt, so that ``_AT_AND_DOMAIN`` (which is
# tried at every space) runs only when it can match: substring searches for the words that only occur in a
# spelled address or a dot-word, and for the plain English "at", a literal-led pattern of the domain after it.
_EMAIL_HINTS = (
    "dot", "punt", "punk", "pont", "point", "arob", "arrob", "klammeraffe", "chiocciol", "apenstaart", "apestaart",
    "(at)", "[at]", "{at}", "<at>", "( at )", "[ at ]", " @ ", "[@]", "(@)", "[.]", "(.)", "{.}",
)  # fmt: skip
_PLAIN_AT_HINT = re.compile(rf" at [a-z0-9_%+\-]{{1,64}}(?:\.[a-z0-9\-]{{1,64}}){{0,8}}\.{_COMMON_TLD}(?![a-z0-9@])")


def _email_spans(lower: str) -> Iterator[tuple[int, int]]:
    if not any(hint in lower for hint in _EMAIL_HINTS) and _PLAIN_AT_HINT.search(lower) is None:
        return
    for match in _AT_AND_DOMAIN.finditer(lower):
        start = _local_part_start(lower, match.start())
        if start is not None:
            yield start, match.end()


# Defanged addresses ------------------------------------------------------------------------------------
# Security write-ups "defang" indicators so that nothing is clickable: "81[.]206[.]130[.]46", "81(.)206(.)130(.)46",
# "mail.example[.]org", "evil[dot]com". A bracketed dot glued between two letters or digits is a dot.
_DEFANGED_DOT = re.compile(r"[\[({](?:\.|dot)[\])}]")
_DEFANGED_HINTS = ("[.]", "(.)", "{.}", "[dot]", "(dot)", "{dot}")


def _defanged_dots(lower: str) -> Iterator[tuple[int, int]]:
    if not any(hint in lower for hint in _DEFANGED_HINTS):
        return
    for match in _DEFANGED_DOT.finditer(lower):
        start, end = match.span()
        if start and end < len(lower) and lower[start - 1].isalnum() and lower[end].isalnum():
            yield start, end


# Numbers written in words -------------------------------------------------------------------------------
# A run of number words (and digits) reads as digits when it holds at least one number word and makes at
# least _MIN_DIGITS digits: shorter runs are ordinary prose ("one or two", "vingt-cinq euros") and no PII
# number is shorter. The recognisers then decide whether the digits are a phone, a card or an id.
_MIN_DIGITS = 6
_TOKEN = re.compile(r"[^\W\d_]+|\d+")
# What may stand between two numbers of a run: spaces, one punctuation mark, one line break.
_GAP = re.compile(r"[ \t]*+(?:[,;./\-–][ \t]*+)?(?:\r?\n[ \t]*+)?")
_HARD_GAP = frozenset(",;/-–\n")
# Cheap test on the words of a text, so that runs are looked for only when two number words occur at all.
_WORD_SPLIT = str.maketrans({c: " " for c in ",;.:!?()[]{}<>\"'/-–\n\t"})


@dataclass(frozen=True, slots=True)
class _Piece:
    """One number of a run: its digits and the span it was written in."""

    digits: str
    start: int
    end: int
    spelled: bool


def _runs(text: str, lower: str) -> Iterator[list[tuple[str, int, int]]]:
    """Runs of tokens (word or digits, start, end) that may be one number, split where a gap is too wide."""
    lexicon = number_words().values
    run: list[tuple[str, int, int]] = []
    for token in _TOKEN.finditer(lower):
        word = token.group()
        usable = (
            word.isdigit()
            or word in lexicon
            or word in REPEAT_WORDS
            or ((word in PLUS_WORDS) and not run)
            or (bool(run) and (word in TENS_THEN_UNIT_JOINERS or word in UNIT_THEN_TENS_JOINERS))
        )
        if run and (not usable or _GAP.match(lower, run[-1][2]).end() != token.start()):  # type: ignore[union-attr]
            yield run
            run = []
            usable = usable and (word.isdigit() or word in lexicon or word in REPEAT_WORDS or word in PLUS_WORDS)
        if usable:
            run.append((word, token.start(), token.end()))
    if run:
        yield run


def _pieces(run: list[tuple[str, int, int]]) -> list[_Piece]:
    """The numbers a run spells: neighbours that make one number are combined ("quatre-vingt-quinze")."""
    words = number_words()
    pieces: list[_Piece] = []
    value: int | None = None  # the spelled number being built, with its first and last word
    first = last = 0
    last_word = ""
    index = 0
    while index < len(run):
        word, start, end = run[index]
        if word in words.values:
            joiner = None
            if value is not None:
                combined = words.combine(value, last_word, word, joiner)
                if combined is not None:
                    value, last, last_word = combined, end, word
                    index += 1
                    continue
                pieces.append(_Piece(str(value), first, last, True))
            value, first, last, last_word = words.values[word], start, end, word
        elif (
            value is not None
            and index + 1 < len(run)
            and run[index + 1][0] in words.values
            and (word in TENS_THEN_UNIT_JOINERS or word in UNIT_THEN_TENS_JOINERS)
        ):
            following, _, following_end = run[index + 1]
            combined = words.combine(value, last_word, following, word)
            if combined is None:
                break  # a joiner that joins nothing ends the run ("zwei und drei")
            value, last, last_word = combined, following_end, following
            index += 1
        else:
            if value is not None:
                pieces.append(_Piece(str(value), first, last, True))
                value = None
            if word.isdigit():
                pieces.append(_Piece(word, start, end, False))
            elif word in REPEAT_WORDS and index + 1 < len(run) and run[index + 1][0] in words.values:
                following, _, following_end = run[index + 1]
                digit = words.values[following]
                if digit > 9:
                    break
                pieces.append(_Piece(str(digit) * REPEAT_WORDS[word], start, following_end, True))
                index += 1
            elif word in PLUS_WORDS and not pieces:
                pieces.append(_Piece("+", start, end, True))
            else:
                break
        index += 1
    if value is not None:
        pieces.append(_Piece(str(value), first, last, True))
    return pieces


def _number_replacements(text: str, lower: str) -> Iterator[tuple[int, int, list[_Piece]]]:
    for run in _runs(text, lower):
        pieces = _pieces(run)
        while pieces and pieces[-1].digits == "+":
            pieces.pop()
        spelled = [p for p in pieces if p.spelled and p.digits != "+"]
        if spelled and sum(len(p.digits) for p in pieces if p.digits != "+") >= _MIN_DIGITS:
            yield pieces[0].start, pieces[-1].end, pieces


def _has_number_words(lower: str) -> bool:
    lexicon = number_words().values
    return sum(map(lexicon.__contains__, lower.translate(_WORD_SPLIT).split())) >= 2


# The copy and its offset map ----------------------------------------------------------------------------
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


def _write_number(original: str, pieces: list[_Piece], out: _Builder) -> None:
    # Each spelled number becomes its digits, digits stay; between two numbers a comma, dash or line break
    # becomes one space so that "five five five, one two three four" keeps its grouping ("555 1234") for the
    # phone recogniser, a space between two digit groups stays, and a space next to a spelled number goes.
    for index, piece in enumerate(pieces):
        if index:
            gap_start = pieces[index - 1].end
            gap = original[gap_start : piece.start]
            if any(c in _HARD_GAP for c in gap):
                out.replace(" ", gap_start, piece.start)
            elif not piece.spelled and not pieces[index - 1].spelled:
                out.keep(original, gap_start, piece.start)
            elif gap:
                out.replace("", gap_start, piece.start)
        if piece.spelled:
            out.replace(piece.digits, piece.start, piece.end)
        else:
            out.keep(original, piece.start, piece.end)


def _write_email(original: str, lower: str, start: int, end: int, out: _Builder) -> None:
    position = start
    for token in _EMAIL_TOKEN.finditer(lower, start, end):
        out.keep(original, position, token.start())
        out.replace("@" if token.group("at") else ".", token.start(), token.end())
        position = token.end()
    out.keep(original, position, end)


def normalise(text: str) -> Normalised:
    """Return ``text`` with numbers written in words, spelled-out e-mail addresses and defanged dots written
    plainly."""
    lower = lowered(text)
    edits: list[tuple[int, int, list[_Piece] | str | None]] = [(s, e, None) for s, e in _email_spans(lower)]
    edits.extend((s, e, ".") for s, e in _defanged_dots(lower))
    if _has_number_words(lower):
        edits.extend(_number_replacements(text, lower))
    if not edits:
        return Normalised(text, text, (), ())  # the common case: nothing to undo, no maps to build
    edits.sort(key=lambda edit: (edit[0], -edit[1]))
    out = _Builder()
    position = 0
    for start, end, pieces in edits:
        if start < position:
            continue  # overlaps an earlier edit (an address that contains a number word)
        out.keep(text, position, start)
        if pieces is None:
            _write_email(text, lower, start, end, out)
        elif isinstance(pieces, str):
            out.replace(pieces, start, end)  # a defanged dot
        else:
            _write_number(text, pieces, out)
        position = end
    out.keep(text, position, len(text))
    return Normalised(text, "".join(out.pieces), tuple(out.starts), tuple(out.ends))
