"""Recognisers for numbers that carry their own proof: card numbers (Luhn), IBANs (mod 97, via schwifty),
national identity numbers (python-stdnum's validators) and passport numbers (pattern plus a cue word).

A checksum is what keeps an order number from reading as a card: a candidate is reported only when its
check digits agree, or, where a number format has no check digit (or too weak a one), when a cue word such
as "SSN", "BSN" or "passport" stands right before it.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator
from functools import lru_cache
from typing import NamedTuple, Protocol

from schwifty import IBAN, registry
from schwifty.exceptions import SchwiftyException
from stdnum.br import cpf as br_cpf
from stdnum.cn import ric as cn_ric
from stdnum.de import idnr as de_idnr
from stdnum.es import dni as es_dni
from stdnum.es import nie as es_nie
from stdnum.exceptions import ValidationError
from stdnum.fr import nir as fr_nir
from stdnum.it import codicefiscale as it_codicefiscale
from stdnum.kr import rrn as kr_rrn
from stdnum.nl import bsn as nl_bsn
from stdnum.pl import pesel as pl_pesel
from stdnum.pt import nif as pt_nif
from stdnum.us import ssn as us_ssn

from inference.pii.context import CONTEXT_WINDOW, cue_before, glued_before, is_word_at, lowered
from inference.pii.findings import PiiFinding, PiiKind
from inference.pii.reserved import EXAMPLE_IBANS, TEST_CARD_NUMBERS

# Separators people put between digit groups, a line break included (numbers wrapped over two lines).
_SEP = r"(?:[ \t]{1,3}|[ \t]?[\-.][ \t]?|[ \t]?\r?\n[ \t]?)?"
# Possessive and without a trailing lookahead: a run is matched once, whole, in linear time; a run glued to
# a letter on either side is skipped in Python. (A backtracking form took 50 s on 20,000 digits and an "x".)
_DIGIT_RUN = re.compile(rf"\d(?:{_SEP}\d)*+")


_CARD_SCORE = 0.95
_IBAN_SCORE = 0.95
_ID_SCORE = 0.9
_CUED_ID_SCORE = 0.85
# A number after the cue that names its own scheme ("身份证", "BSN", "PESEL"), which that scheme validates, is
# that id even where its digits also pass Luhn (an 18-digit Chinese id starting with 3 reads as a card number):
# above the card's score, so the id wins the span. After a generic cue ("ID number") the card still wins.
_NAMED_ID_SCORE = 0.96
_NIR_SCORE = 0.96
_PASSPORT_SCORE = 0.85


def luhn_valid(digits: str) -> bool:
    total = 0
    for index, char in enumerate(reversed(digits)):
        value = ord(char) - 48
        if index % 2:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return total % 10 == 0


def _plausible_card_prefix(digits: str) -> bool:
    # Issuer ranges in use (Visa 4, Mastercard 51-55 and 2221-2720, Amex 34/37, Diners 30/36/38,
    # Discover/UnionPay 6, JCB 35): a Luhn-valid number outside them is far likelier an order id.
    first = digits[0]
    if first in "3456":
        return True
    return first == "2" and len(digits) == 16 and 2221 <= int(digits[:4]) <= 2720


def find_credit_cards(text: str) -> Iterator[PiiFinding]:
    for run in _DIGIT_RUN.finditer(text):
        if glued_before(text, run.start(), "-.") or (run.end() < len(text) and text[run.end()].isalnum()):
            continue
        positions = [run.start() + i for i, c in enumerate(run.group()) if c.isdigit()]
        if len(positions) < 13:
            continue
        digits = "".join(text[p] for p in positions)
        # Try the whole run first, then windows that begin and end on group boundaries, so that a card
        # followed by its CVV ("4111 1111 1111 1111 123") or preceded by another number is still found.
        boundaries = [0] + [i for i in range(1, len(positions)) if positions[i] != positions[i - 1] + 1]
        ends = [*boundaries[1:], len(positions)]
        # Most cards have 16 digits (Amex 15): prefer those windows, so a CVV or an order number written
        # next to the card ("4539 1488 0343 6467 123") is not swallowed into a Luhn-valid 19-digit reading.
        ends_at = set(ends)
        windows = [(0, len(positions))]
        windows += [(a, b) for a in boundaries for b in range(a + 13, a + 20) if b in ends_at]
        windows.sort(key=lambda w: {16: 0, 15: 1}.get(w[1] - w[0], 2))
        found = next((w for w in windows if _is_card(digits[w[0] : w[1]])), None)
        if found is None:
            continue
        a, b = found
        number = digits[a:b]
        start, end = positions[a], positions[b - 1] + 1
        if number in TEST_CARD_NUMBERS:
            continue  # a published test card: accepted by test systems only, never issued to anyone
        yield PiiFinding.at(PiiKind.CREDIT_CARD, text, start, end, _CARD_SCORE)


def _is_card(number: str) -> bool:
    return 13 <= len(number) <= 19 and _plausible_card_prefix(number) and luhn_valid(number)


_IBAN_CANDIDATE = re.compile(r"[A-Za-z]{2}\d{2}(?:[ \t]?\r?\n?[ \t]?[A-Za-z0-9]){10,32}")


@lru_cache(maxsize=128)
def _iban_length(country: str) -> int | None:
    try:
        return int(registry.get_iban_spec(country).iban_length)
    except SchwiftyException:  # not a country that has IBANs
        return None


def find_ibans(text: str) -> Iterator[PiiFinding]:
    for match in _IBAN_CANDIDATE.finditer(text):
        if glued_before(text, match.start()):
            continue
        length = _iban_length(match.group()[:2].upper())
        if length is None:
            continue
        # The candidate may run on into the next word ("... 0130 00 BIC ..."): keep exactly as many
        # characters as this country's IBANs have, then let schwifty check format and check digits.
        positions = [match.start() + i for i, c in enumerate(match.group()) if c.isalnum()][:length]
        if len(positions) < length:
            continue
        compact = "".join(text[p] for p in positions).upper()
        end = positions[-1] + 1
        if end < len(text) and text[end].isalnum():
            continue
        if compact in EXAMPLE_IBANS:
            continue  # the standard's printed example, in every IBAN tutorial
        try:
            IBAN(compact)
        except SchwiftyException:
            continue
        yield PiiFinding.at(PiiKind.IBAN, text, match.start(), end, _IBAN_SCORE)


# National identity numbers ------------------------------------------------------------------------------
# Two routes. Distinctive formats with a real check (the dashed SSN, ES DNI/NIE letter, IT codice fiscale,
# FR NIR's mod-97 key) and the UK NINO's letter layout stand on their own, in their usual groupings. After a
# cue word ("SSN", "BSN", "Steuer-ID", "身份证", ...) any grouping counts: dots, slashes, spaces, dashes, a
# number split over lines or one character per box; the characters are read past the separators and the
# compact value must pass the scheme's validator. A cue is required where the format is just digits with a
# weak check (NL BSN, DE IdNr: 1 in 10 or 11 random numbers pass), none at all (DE ID card, SSN: ranges
# only) or where nine bare digits could be anything.
class _Validator(Protocol):
    def is_valid(self, number: str) -> bool: ...


class _NinoValidator:
    """UK National Insurance number: no check digit, so the letter layout and the prefixes never issued."""

    _LAYOUT = re.compile(r"[A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z]\d{6}[A-D]")

    def is_valid(self, number: str) -> bool:
        return self._LAYOUT.fullmatch(number) is not None and number[:2] not in _NINO_UNUSED_PREFIXES


class _RicValidator:
    """Chinese resident identity number: python-stdnum's check digit and birth date, without its list of
    birth-place codes (which lags behind the codes in use, so real numbers would fail it)."""

    def is_valid(self, number: str) -> bool:
        if len(number) != 18 or not number[:17].isdigit():
            return False
        try:
            cn_ric.get_birth_date(number)
        except ValidationError:
            return False
        return cn_ric.calc_check_digit(number) == number[-1]


class _PtNifValidator:
    """Portuguese tax number (NIF): python-stdnum's mod-11 check digit, for a person's number only. The first
    digits say who holds it: 1, 2 and 3 a resident person, 45 a non-resident one; 5-9 a company, a public body,
    an estate, a fund or a condominium, which is no one's personal data."""

    def is_valid(self, number: str) -> bool:
        return number.startswith(("1", "2", "3", "45")) and pt_nif.is_valid(number)


class _Scheme(NamedTuple):
    lengths: tuple[int, ...]  # characters of the compact number
    digits_only: bool  # whether a candidate must start with a digit (letters may still follow: "2A", "X")
    validator: _Validator


_NINO_UNUSED_PREFIXES = frozenset({"BG", "GB", "KN", "NK", "NT", "TN", "ZZ"})
_SCHEMES: dict[str, _Scheme] = {
    "ssn": _Scheme((9,), True, us_ssn),
    "bsn": _Scheme((9, 8), True, nl_bsn),
    "idnr": _Scheme((11,), True, de_idnr),
    "nir": _Scheme((15,), True, fr_nir),
    "dni": _Scheme((9,), True, es_dni),
    "nie": _Scheme((9,), False, es_nie),
    "cf": _Scheme((16,), False, it_codicefiscale),
    "nino": _Scheme((9,), False, _NinoValidator()),
    "ric": _Scheme((18,), True, _RicValidator()),
    "rrn": _Scheme((13,), True, kr_rrn),
    "cpf": _Scheme((11,), True, br_cpf),
    "pesel": _Scheme((11,), True, pl_pesel),
    "ptnif": _Scheme((9,), True, _PtNifValidator()),
}
# Schemes with a real check digit: a generic cue ("ID number", "identity number") tries all of them.
_CHECKED = ("nir", "dni", "nie", "cf", "ric", "rrn", "cpf", "pesel", "idnr", "bsn")
_ID_CUES: dict[tuple[str, ...], tuple[str, ...]] = {  # cue words (lower case) -> schemes to try after them
    ("ssn", "social security", "ss#", "soc. sec", "soc sec"): ("ssn",),
    ("bsn", "burgerservicenummer", "sofi", "citizen service number"): ("bsn",),
    ("steuer-id", "steuer id", "steuerid", "steueridentifikationsnummer", "identifikationsnummer", "idnr",
     "tax id", "steuernummer"): ("idnr",),
    ("sécurité sociale", "securite sociale", "sécu", "n° ss", "nir", "insee"): ("nir",),
    ("dni", "documento nacional", "nie", "número de identidad", "numero de identidad"): ("dni", "nie"),
    # "NIF" is Spain's tax number (a person's is the DNI or NIE) and Portugal's (nine digits): the check decides.
    ("nif",): ("dni", "nie", "ptnif"),
    ("contribuinte", "identificação fiscal", "identificacao fiscal"): ("ptnif",),
    ("codice fiscale", "cod. fisc", "cod fisc", "cf"): ("cf",),
    ("national insurance", "nino", "ni number", "ni no", "ni-nr"): ("nino",),
    ("身份证", "身份證", "公民身份号码", "resident identity"): ("ric",),
    ("주민등록번호", "주민번호", "resident registration"): ("rrn",),
    ("cpf",): ("cpf",),
    ("pesel",): ("pesel",),
    ("id number", "id no", "id-nr", "identity number", "identification number", "national id", "personal id",
     "id card", "identity card", "ausweisnummer", "personalausweis", "carte d'identité", "carta d'identità",
     "número de documento", "numéro d'identité", "идентификац", "паспорт"): _CHECKED,
}  # fmt: skip
_CUE_SCHEMES = {cue: schemes for cues, schemes in _ID_CUES.items() for cue in cues}
# Cues in scripts beyond Latin-1 get a pattern of their own, run only on such text: one such character among
# an alternation's first characters stops the regex engine from skipping ahead (a third slower on English).
_ID_CUE = re.compile("|".join(re.escape(c) for c in sorted(_CUE_SCHEMES, key=len, reverse=True) if c[0] <= "ÿ"))
_ID_CUE_OTHER_SCRIPTS = re.compile(
    "|".join(re.escape(c) for c in sorted(_CUE_SCHEMES, key=len, reverse=True) if c[0] > "ÿ")
)
# The German identity card number has no check digit that stdnum knows; its letter set is distinctive.
_AUSWEIS_CUES = frozenset({"personalausweis", "ausweisnummer", "id card", "identity card"})
_AUSWEIS_CUE = re.compile(r"ausweis-nr|ausweisnr")
_AUSWEIS_NUMBER = re.compile(r"\b[CFGHJKLMNPRTVWXYZ][CFGHJKLMNPRTVWXYZ0-9]{8}\d?\b")
# What may stand between two characters of a number after its cue: up to three of space, tab, dot, dash,
# slash, bar, middle dot, the closing and opening of boxes ("[1][2]"), or one line break.
_ID_SEPARATORS = frozenset(" \t.-/|·–—][")
_MAX_SEPARATOR_RUN = 3

# Two scans, one led by a digit and one by a capital, each opening with a character class so the regex
# engine can skip ahead; which alternative matched is read from ``lastgroup``. Group separators: a space, a
# dot or a dash (the NIR and DNI are often dotted: "1.85.05.78.006.084.36", "12.345.678-Z").
_DIGIT_LED_IDS = re.compile(
    r"(?P<ssn>\d{3}([\- ])\d{2}\2\d{4}\b(?!-|\.\d))"
    r"|(?P<nir>[12][ .\-]?\d{2}[ .\-]?(?:0[1-9]|1[0-2]|[2-9]\d)[ .\-]?(?:\d{2}|2[AB])[ .\-]?\d{3}[ .\-]?\d{3}"
    r"[ .\-]?\d{2}\b(?![.\-]\d))"
    r"|(?P<dni>\d{2}[.]?\d{3}[.]?\d{3} ?-?[A-Z]\b)"
)
_LETTER_LED_IDS = re.compile(
    r"(?P<nino>[A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z][ \-.]?\d{2}[ \-.]?\d{2}[ \-.]?\d{2}[ \-.]?[A-D]\b)"
    r"|(?P<nie>[XYZ][ \-.]?\d{7}[ \-.]?[A-Z]\b)"
    r"|(?P<cf>[A-Z]{3} ?[A-Z]{3} ?[\dLMNPQRSTUV]{2}[ABCDEHLMPRST][\dLMNPQRSTUV]{2} ?[A-Z][\dLMNPQRSTUV]{3} ?[A-Z]\b)"
)
_UNCUED_VALIDATORS = {"ssn": us_ssn, "nir": fr_nir, "dni": es_dni, "nie": es_nie, "cf": it_codicefiscale}
_NINO_CUE = re.compile(r"(?i)\b(?:ni(?:no)?|national insurance(?: number| no\.?)?)\b")


def _compact(value: str) -> str:
    return re.sub(r"[\s.\-]", "", value)


def find_national_ids(text: str) -> Iterator[PiiFinding]:
    for match in (*_DIGIT_LED_IDS.finditer(text), *_LETTER_LED_IDS.finditer(text)):
        kind = match.lastgroup
        if glued_before(text, match.start(), "-."):
            continue
        if kind == "nino" and match.group()[:2] not in _NINO_UNUSED_PREFIXES:
            # The NINO layout (two letters, six digits, a letter A-D) is distinctive; a cue only raises the score.
            score = _CUED_ID_SCORE if cue_before(text, match.start(), _NINO_CUE) else 0.75
            yield PiiFinding.at(PiiKind.NATIONAL_ID, text, match.start(), match.end(), score)
        elif kind in _UNCUED_VALIDATORS and _UNCUED_VALIDATORS[kind].is_valid(_compact(match.group())):
            # A NIR's mod-97 key and date layout outrank a card's Luhn digit (1 in 10) on the same digits.
            score = _NIR_SCORE if kind == "nir" else _ID_SCORE
            yield PiiFinding.at(PiiKind.NATIONAL_ID, text, match.start(), match.end(), score)
    lower = lowered(text)
    cues = _ID_CUE.finditer(lower)
    if not text.isascii():
        cues = itertools.chain(cues, _ID_CUE_OTHER_SCRIPTS.finditer(lower))
    for cue in cues:
        if cue.group()[0].isascii() and not is_word_at(lower, cue.start(), cue.end()):
            continue  # "nie" inside "niece", "cf" inside "cfg"; CJK and Hangul cues need no boundary
        yield from _cued_ids(text, cue.end(), _CUE_SCHEMES[cue.group()])
        if cue.group() in _AUSWEIS_CUES:
            yield from _ausweis_after(text, cue.end())
    for cue in _AUSWEIS_CUE.finditer(lower):
        yield from _ausweis_after(text, cue.end())


# How far after its cue an id may start. Wider than the other cues' window: people put a clause between the
# cue and the number ("my SSN, the form split it into three boxes: 471 32 6736"; "Steuer-ID (steht oben
# rechts auf dem Bescheid) lautet 12 345 678 901"). The validators keep this precise (a check digit, or the
# SSN's ranges and exact length); a blank line ends the window: the next paragraph is about something else.
ID_CUE_WINDOW = 120


def _cued_ids(text: str, after: int, schemes: tuple[str, ...]) -> Iterator[PiiFinding]:
    """The first number within ID_CUE_WINDOW after a cue that one of ``schemes`` validates."""
    stop = min(len(text), after + ID_CUE_WINDOW)
    paragraph_end = text.find("\n\n", after, stop)
    if paragraph_end != -1:
        stop = paragraph_end
    for start in range(after, stop):
        if not text[start].isalnum() or (start and text[start - 1].isalnum()):
            continue  # candidates start at a token
        for name in schemes:
            scheme = _SCHEMES[name]
            if scheme.digits_only and not text[start].isdigit():
                continue
            for length in scheme.lengths:
                read = _read_compact(text, start, length)
                if read is not None and scheme.validator.is_valid(read[0]):
                    named = schemes is not _CHECKED
                    yield PiiFinding.at(
                        PiiKind.NATIONAL_ID, text, start, read[1], _NAMED_ID_SCORE if named else _CUED_ID_SCORE
                    )
                    return


def _read_compact(text: str, start: int, length: int) -> tuple[str, int] | None:
    """``length`` letters and digits from ``start``, read past separators (see _ID_SEPARATORS), upper-cased,
    and the offset after the last one; None when something else interrupts or the number runs on."""
    chars: list[str] = []
    position = start
    end = start
    while len(chars) < length:
        separators = newlines = 0
        while position < len(text) and not text[position].isalnum():
            char = text[position]
            if char == "\n":
                newlines += 1
            elif char not in _ID_SEPARATORS and char != "\r":
                return None
            separators += 1
            if newlines > 1 or separators > _MAX_SEPARATOR_RUN + 2 * newlines:
                return None
            position += 1
        if position >= len(text):
            return None
        chars.append(text[position].upper())
        position += 1
        end = position
    if end < len(text) and text[end].isalnum():
        return None  # glued to more characters: a longer number, not this one
    return "".join(chars), end


def _ausweis_after(text: str, after: int) -> Iterator[PiiFinding]:
    number = _AUSWEIS_NUMBER.search(text, after, min(len(text), after + CONTEXT_WINDOW))
    if number is not None and any(c.isdigit() for c in number.group()):
        yield PiiFinding.at(PiiKind.NATIONAL_ID, text, number.start(), number.end(), _CUED_ID_SCORE)


# Passports: no checksum in the printed number, so only a number right after a cue word counts. ----------
_PASSPORT_CUE = re.compile(r"passport|reisepass|passnummer|pass-?nr|passeport|pasaporte|passaporto|paspoort")
_PASSPORT_NUMBER = re.compile(
    r"[^\n\d]{0,40}?"
    r"\b(?P<number>[A-Z]{1,3}\d{6,8}|\d{2}[A-Z]{2}\d{5}|\d{8,9}|[CFGHJKLMNPRTVWXYZ][CFGHJKLMNPRTVWXYZ0-9]{8})\b"
)


# A passport's machine-readable zone (ICAO 9303, TD3): two lines of 44 characters from [A-Z0-9<]. Found by
# its shape alone, check digits or not (a prompt may quote a mis-read one): nothing else looks like it.
# Line 1 holds the name (P, a type letter, the issuing state, SURNAME<<GIVEN<NAMES), line 2 the number,
# nationality, date of birth, sex and expiry.
_MRZ_LINE1 = re.compile(
    r"(?<![A-Z0-9<])P[A-Z<][A-Z<]{3}(?P<name>[A-Z]+(?:<[A-Z]+)*<<[A-Z]+(?:<[A-Z]+)*)<*(?![A-Z0-9<])"
)
_MRZ_LINE2 = re.compile(
    r"(?<![A-Z0-9<])(?P<number>[A-Z0-9<]{9})[0-9<][A-Z<]{3}\d{6}[0-9<][MFX<]\d{6}[0-9<][A-Z0-9<]{14}[0-9<]{2}(?![A-Z0-9<])"
)


def find_passport_mrz(text: str) -> Iterator[PiiFinding]:
    if "<" not in text:
        return
    for line in _MRZ_LINE1.finditer(text):
        if len(line.group()) >= 30:  # a full TD3 name line, not a stray "P<" in code
            yield PiiFinding.at(PiiKind.PERSON, text, line.start("name"), line.end("name"), _PASSPORT_SCORE)
    for line in _MRZ_LINE2.finditer(text):
        yield PiiFinding.at(PiiKind.PASSPORT, text, line.start(), line.end(), _PASSPORT_SCORE)


def find_passports(text: str) -> Iterator[PiiFinding]:
    yield from find_passport_mrz(text)
    for cue in _PASSPORT_CUE.finditer(lowered(text)):
        if cue.start() and text[cue.start() - 1].isalpha():
            continue
        match = _PASSPORT_NUMBER.match(text, cue.end())
        if match is not None and any(c.isdigit() for c in match.group("number")):
            yield PiiFinding.at(PiiKind.PASSPORT, text, match.start("number"), match.end("number"), _PASSPORT_SCORE)
