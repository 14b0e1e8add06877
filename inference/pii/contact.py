"""Recognisers for ways to reach or locate someone: e-mail addresses, phone numbers (libphonenumber via
``phonenumbers``) and IP addresses (validated by ``ipaddress``)."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterator, Sequence

import phonenumbers

from inference.pii.context import cue_before, glued_before
from inference.pii.findings import PiiFinding, PiiKind

# Example domains are still reported: a prompt that pastes "jane@example.com" usually stands in for a real
# address the user replaced by hand, and one simple rule is easier to trust than a list of exceptions.
_EMAIL = re.compile(
    r"[A-Za-z0-9](?:[A-Za-z0-9._%+\-]{0,63})@"
    r"[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?)*"
    r"\.[A-Za-z]{2,24}(?![\w\-@]|\.\w)"
)


def find_emails(text: str) -> Iterator[PiiFinding]:
    if "@" not in text:
        return
    for match in _EMAIL.finditer(text):
        if glued_before(text, match.start(), ".%+-"):
            continue
        # "git@github.com:org/repo.git" is an SSH remote, not a mailbox.
        if match.group().startswith("git@") and text.startswith(":", match.end()):
            continue
        yield PiiFinding.at(PiiKind.EMAIL, text, match.start(), match.end(), 0.95)


# Phone numbers in two steps: a cheap pattern that opens with a character class finds digit stretches,
# then the precise one runs inside each stretch only.
_PHONE_STRETCH = re.compile(r"[+(\d][\d()+.\-/ \t\r\nextEXT]{6,}")
_PHONE = re.compile(
    r"(?<![\w+.\-/:])"
    r"(?P<intl>(?:\+|00)\d{1,3}[ .\-]?)?"
    r"(?:\(0\)[ .\-]?)?"
    r"(?P<area>\(\d{1,5}\)[ .\-]?)?"
    r"\d{1,12}(?:(?:[ .\-/]|[ ]?\r?\n[ ]?){1,2}\d{1,12}){0,6}"
    r"(?:[ ]?(?:x|ext\.?)[ ]?\d{1,6})?"
    r"(?![\w\-]|[.:]\d)"
)
_PHONE_CUE = re.compile(
    r"(?i)(?:phone|tel\b|tel\.|telephone|mobile|cell|call|ring|text me|whats ?app|fax|sms|number|contact|reach"
    r"|telefon|handy|mobil|rufnummer|téléphone|portable|numéro|joindre|teléfono|móvil|llam|número"
    r"|telefono|cellulare|numero|telefoonnummer|mobiel|bel\b)"
)
# Written the North American way, "(555) 123-4567", "555-123-4567", "555.123.4567": a phone even when
# libphonenumber finds the area code unassigned (fictional 555 numbers are how people anonymise badly).
_NANP_SHAPE = re.compile(r"(?:\+?1[ .\-]?)?(?:\(\d{3}\)[ ]?|\d{3}[.\-])\d{3}[.\-]\d{4}")
_DATE_SHAPE = re.compile(r"\d{4}[.\-/]\d{1,2}[.\-/]\d{1,2}|\d{1,2}[.\-/]\d{1,2}[.\-/]\d{2,4}")
_IPV4_SHAPE = re.compile(r"\d{1,3}(?:\.\d{1,3}){3}")
_EXTENSION = re.compile(r"[ ]?(?:x|ext\.?)[ ]?\d{1,6}$")
# Regions an unprefixed number is tried in: with a trunk "0" it is European, without one North American,
# Spanish or Italian (whose numbers carry no trunk prefix). Fewer regions, fewer parses (the costly step).
_TRUNK_REGIONS = ("GB", "DE", "FR", "IT", "NL")
_NO_TRUNK_REGIONS = ("US", "ES", "IT")


def _phone_score(candidate: str, cued: bool) -> float | None:
    body = _EXTENSION.sub("", candidate)
    digits = sum(c.isdigit() for c in body)
    if not 7 <= digits <= 15 or _DATE_SHAPE.fullmatch(body) or _IPV4_SHAPE.fullmatch(body):
        return None
    if body.startswith(("+", "00")):
        try:
            number = phonenumbers.parse("+" + body[2:] if body.startswith("00") else body, None)
        except phonenumbers.NumberParseException:
            return None
        if phonenumbers.is_valid_number(number):
            return 0.95
        return 0.8 if phonenumbers.is_possible_number(number) else None
    possible = False
    for region in _TRUNK_REGIONS if body.startswith("0") else _NO_TRUNK_REGIONS:
        try:
            number = phonenumbers.parse(body, region)
        except phonenumbers.NumberParseException:
            continue
        if phonenumbers.is_valid_number(number):
            if cued or not body.isdigit():
                return 0.85
            # A bare run of digits with no cue is as often an order or account number; only a national
            # trunk prefix ("07911123456", "0301234567") makes it phone-like enough to report.
            return 0.55 if body.startswith("0") else None
        possible = possible or phonenumbers.is_possible_number(number)
    if _NANP_SHAPE.fullmatch(body):
        return 0.8
    return 0.7 if possible and cued else None


def find_phones(text: str, taken: Sequence[PiiFinding] = ()) -> Iterator[PiiFinding]:
    """Phone numbers, skipping digits that ``taken`` findings (a card, an IBAN, an id) already explain:
    validating a candidate with libphonenumber is this package's most expensive step."""
    for stretch in _PHONE_STRETCH.finditer(text):
        if sum(c.isdigit() for c in stretch.group()) >= 7:
            yield from _phones_in(text, stretch.start(), stretch.end(), taken)


def _phones_in(text: str, start: int, end: int, taken: Sequence[PiiFinding]) -> Iterator[PiiFinding]:
    for match in _PHONE.finditer(text, start, end):
        if any(t.start < match.end() and match.start() < t.end for t in taken):
            continue
        candidate = match.group().rstrip()
        score = _phone_score(candidate, cue_before(text, match.start(), _PHONE_CUE))
        if score is not None:
            yield PiiFinding.at(PiiKind.PHONE, text, match.start(), match.start() + len(candidate), score)


_IPV4 = re.compile(r"\d{1,3}(?:\.\d{1,3}){3}(?![\w]|\.\d)")
_IPV6 = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{1,4}|\d{1,3}(?:\.\d{1,3}){3})?(?![\w:])")


def _reportable(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    # Loopback and the unspecified address identify no one ("bind to 0.0.0.0", "curl localhost/127.0.0.1").
    # Private ranges are kept: they map a tenant's network, which is not for the cloud tier either.
    return not (address.is_loopback or address.is_unspecified)


def find_ip_addresses(text: str) -> Iterator[PiiFinding]:
    for match in _IPV4.finditer(text):
        if glued_before(text, match.start(), "."):
            continue
        try:
            address4 = ipaddress.IPv4Address(match.group())
        except ValueError:
            continue
        if _reportable(address4) and str(address4) != "255.255.255.255":
            yield PiiFinding.at(PiiKind.IP_ADDRESS, text, match.start(), match.end(), 0.9)
    if "::" not in text and text.count(":") < 7:
        return  # no IPv6 address can be here; skip the scan
    for match in _IPV6.finditer(text):
        value = match.group()
        if sum(c not in ":." for c in value) < 4:
            continue
        try:
            address6 = ipaddress.IPv6Address(value)
        except ValueError:
            continue
        if _reportable(address6):
            yield PiiFinding.at(PiiKind.IP_ADDRESS, text, match.start(), match.end(), 0.9)
