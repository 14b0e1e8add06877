"""Recogniser for dates of birth: a date counts only when a birth cue ties it to a person ("born on",
"DOB:", "date of birth", "geboren am", "né le", "fecha de nacimiento"); other dates are not PII."""

from __future__ import annotations

import re
from collections.abc import Iterator

from inference.pii.context import is_word_at, lowered
from inference.pii.findings import PiiFinding, PiiKind

# Lower-case literals, without \b: a pattern that opens with literals lets Python's regex engine skip ahead
# fast; word boundaries are checked afterwards in ``_is_word``.
_CUE = (
    r"born|b\.|dob|d\.o\.b|date of birth|birth ?date|birthday|geboren|geburtsdatum|geb\.|née?"
    r"|date de naissance|nacid[oa]|fecha de nacimiento|nat[oa] (?:il|a)|data di nascita|geboortedatum"
)
_MONTH = (
    r"(?:jan(?:uary|uar|vier|uari)?|feb(?:ruary|ruar|ruari)?|mar(?:ch|s|zo|ço)?|märz|maart|apr(?:il|ile)?|avril"
    r"|abril|may|mai|mayo|maggio|mei|june?|juni|juin|junio|giugno|july?|juli|juillet|julio|luglio"
    r"|aug(?:ust|usti)?|août|agosto|sep(?:t|tember|tembre|tiembre)?|settembre|oct(?:ober|obre)?|okt(?:ober)?"
    r"|octubre|ottobre|nov(?:ember|embre|iembre)?|dec(?:ember)?|dez(?:ember)?|décembre|diciembre|dicembre"
    r"|f[ée]vr(?:ier)?|febrero|febbraio|enero|gennaio|janvier)"
)
_YEAR = r"(?:19|20)\d{2}"
_DATE = (
    rf"\d{{1,2}}[./\-]\d{{1,2}}[./\-](?:{_YEAR}|\d{{2}})"
    rf"|{_YEAR}[./\-]\d{{1,2}}[./\-]\d{{1,2}}"
    rf"|\d{{1,2}}(?:st|nd|rd|th|er|º|\.)?[ \t]+(?:de[ \t]+|of[ \t]+)?{_MONTH}\.?,?[ \t]+(?:de[ \t]+)?{_YEAR}"
    rf"|{_MONTH}\.?[ \t]+\d{{1,2}}(?:st|nd|rd|th)?,?[ \t]+{_YEAR}"
)
# Cues are searched in the lower-cased text with a case-sensitive pattern: much faster in Python's regex
# engine than an IGNORECASE alternation tried at every position. Then, from each cue: up to 30 characters
# without digits or line breaks ("was born on the", "DOB: "), then the date.
_CUE_LOWER = re.compile(_CUE)
_AFTER_CUE = re.compile(rf"[^\n\d]{{0,30}}?(?P<date>{_DATE})(?!\d)", re.IGNORECASE)


def find_dates_of_birth(text: str) -> Iterator[PiiFinding]:
    lower = lowered(text)
    for cue in _CUE_LOWER.finditer(lower):
        if not is_word_at(lower, cue.start(), cue.end()):
            continue
        match = _AFTER_CUE.match(text, cue.end())
        if match is not None:
            yield PiiFinding.at(PiiKind.DATE_OF_BIRTH, text, match.start("date"), match.end("date"), 0.9)
