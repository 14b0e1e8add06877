"""Recogniser for dates of birth: a date counts only when a birth cue ties it to a person ("born on",
"DOB:", "date of birth", "geboren am", "né le", "fecha de nacimiento"); other dates are not PII."""

from __future__ import annotations

import re
from collections.abc import Iterator

from inference.pii.context import is_word_at, lowered
from inference.pii.findings import PiiFinding, PiiKind

# Lower-case literals, without \b: a pattern that opens with literals lets Python's regex engine skip ahead
# fast; word boundaries are checked afterwards in ``is_word_at`` (for cues in scripts that put spaces
# between words).
_CUE = (
    r"born|b\.|dob|d\.o\.b|date of birth|birth ?date|birthday|geboren|geburtsdatum|geburtstag|geb\.|née?"
    r"|date de naissance|nacid[oa]|nací|fecha de nacimiento|nat[oa] (?:il|a)|data di nascita|geboortedatum"
    r"|data de nascimento|nascid[oa]|födelsedatum|fødselsdato|urodzon[ya]|data urodzenia|doğum tarihi"
    r"|syntymäaika|дата рождения|родил(?:ся|ась)|д\.р\.|生年月日|出生日期|出生年月日|出生|生日|誕生日|생년월일|생일"
)
# Cues that follow the date: "Ich bin am 3. Mai 1985 geboren", "1985年3月12日生まれ".
_SUFFIX_CUE = re.compile(r"geboren|生まれ|出生|年生|에 태어났|태어났|родил(?:ся|ась)")
_SUFFIX_GAP = 16  # characters, none a digit or a line break, between the date and such a cue
_MONTH = (
    r"(?:jan(?:uary|uar|vier|uari)?|feb(?:ruary|ruar|ruari)?|mar(?:ch|s|zo|ço)?|märz|maart|apr(?:il|ile)?|avril"
    r"|abril|may|mai|mayo|maggio|mei|june?|juni|juin|junio|giugno|july?|juli|juillet|julio|luglio"
    r"|aug(?:ust|usti)?|août|agosto|sep(?:t|tember|tembre|tiembre)?|settembre|setembro|oct(?:ober|obre)?"
    r"|okt(?:ober)?|octubre|ottobre|outubro|nov(?:ember|embre|iembre|embro)?|dec(?:ember)?|dez(?:ember|embro)?"
    r"|décembre|diciembre|dicembre|f[ée]vr(?:ier)?|febrero|febbraio|fevereiro|enero|gennaio|janvier|janeiro"
    r"|maio|junho|julho|января|февраля|марта|апреля|мая|июня|июля|августа|сентября|октября|ноября|декабря)"
)
_YEAR = r"(?:19|20)\d{2}"
_SHORT_YEAR = r"(?:'?\d{2}(?!\d))"
_SEP = r"[ \t]?[./\-][ \t]?"
_DATE = (
    rf"\d{{1,2}}{_SEP}\d{{1,2}}{_SEP}(?:{_YEAR}|\d{{2}})"
    rf"|{_YEAR}{_SEP}\d{{1,2}}{_SEP}\d{{1,2}}"
    rf"|{_YEAR}[ \t]?[年년][ \t]?\d{{1,2}}[ \t]?[月월][ \t]?\d{{1,2}}[ \t]?[日일]?"
    r"|(?:昭和|平成|令和|大正)[ \t]?(?:\d{1,2}|元)年\d{1,2}月\d{1,2}日"
    rf"|\d{{1,2}}(?:st|nd|rd|th|er|º|\.)?(?:[ \t]+(?:de[ \t]+|of[ \t]+)?|[\-/])?{_MONTH}\.?,?"
    rf"(?:[ \t]+(?:del?[ \t]+)?|[\-/])(?:{_YEAR}|{_SHORT_YEAR})"
    rf"|{_MONTH}\.?(?:[ \t]+|[\-/])\d{{1,2}}(?:st|nd|rd|th)?,?(?:[ \t]+|[\-/])(?:{_YEAR}|{_SHORT_YEAR})"
    rf"|{_YEAR}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])(?!\d)"
    rf"|(?:0[1-9]|[12]\d|3[01])(?:0[1-9]|1[0-2])(?:19|20)\d{{2}}(?!\d)"
)
# Cues are searched in the lower-cased text with a case-sensitive pattern: much faster in Python's regex
# engine than an IGNORECASE alternation tried at every position. Then, from each cue: up to 30 characters
# without digits ("was born on the", "DOB: "), and at most one line break (a form's value on the next line),
# then the date.
_CUE_LOWER = re.compile(_CUE)
_AFTER_CUE = re.compile(rf"[^\n\d]{{0,30}}?(?:\n[^\n\d]{{0,10}}?)?(?P<date>{_DATE})(?!\d)", re.IGNORECASE)
_DATE_BEFORE_CUE = re.compile(rf"(?P<date>{_DATE})(?!\d)[^\n\d]{{0,{_SUFFIX_GAP}}}$", re.IGNORECASE)


def find_dates_of_birth(text: str) -> Iterator[PiiFinding]:
    lower = lowered(text)
    for cue in _CUE_LOWER.finditer(lower):
        if cue.group()[0].isascii() and not is_word_at(lower, cue.start(), cue.end()):
            continue  # CJK and Hangul cues sit between other characters of their script
        match = _AFTER_CUE.match(text, cue.end())
        if match is not None:
            yield PiiFinding.at(PiiKind.DATE_OF_BIRTH, text, match.start("date"), match.end("date"), 0.9)
    for cue in _SUFFIX_CUE.finditer(lower):
        # The window before the cue, then the last date in it that only blanks and words separate from it.
        window_start = max(0, cue.start() - 40)
        for start in range(window_start, cue.start()):
            if text[start].isdigit() and (start == 0 or not text[start - 1].isdigit()) or text[start] in "昭平令大":
                match = _DATE_BEFORE_CUE.match(text, start, cue.start())
                if match is not None:
                    yield PiiFinding.at(PiiKind.DATE_OF_BIRTH, text, match.start("date"), match.end("date"), 0.9)
                    break
