"""Recognisers for ways to reach or locate someone: e-mail addresses, phone numbers (libphonenumber via
``phonenumbers``) and IP addresses (validated by ``ipaddress``)."""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import phonenumbers
from phonenumbers import PhoneMetadata
from phonenumbers.phonenumberutil import COUNTRY_CODE_TO_REGION_CODE

from inference.pii.context import cue_before, glued_before
from inference.pii.findings import PiiFinding, PiiKind
from inference.pii.reserved import is_public_address, is_reserved_email_domain, is_unissuable_ssn

# Han, kana and Hangul: scripts that put no space around an address or a number ("メールはyumi@gmail.comです").
_CJK = r"\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff"
# A letter, digit or underscore of any other script: touching one, a value is part of a longer token.
_GLUE = rf"[^\W{_CJK}]"
_EMAIL = re.compile(
    r"[A-Za-z0-9](?:[A-Za-z0-9._%+\-]{0,63})@"
    r"[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?)*"
    rf"\.[A-Za-z]{{2,24}}(?!{_GLUE}|[\-@]|\.{_GLUE})"
)


_CJK_CHAR = re.compile(f"[{_CJK}]")


def _is_cjk(char: str) -> bool:
    return _CJK_CHAR.match(char) is not None


def find_emails(text: str) -> Iterator[PiiFinding]:
    if "@" not in text:
        return
    for match in _EMAIL.finditer(text):
        if glued_before(text, match.start(), ".%+-") and not _is_cjk(text[match.start() - 1]):
            continue
        # "git@github.com:org/repo.git" is an SSH remote, not a mailbox.
        if match.group().startswith("git@") and text.startswith(":", match.end()):
            continue
        if is_reserved_email_domain(match.group().rsplit("@", 1)[1]):
            continue  # "user@example.com", "ci@build.test": a documentation or test address reaches no one
        yield PiiFinding.at(PiiKind.EMAIL, text, match.start(), match.end(), 0.95)


# Phone numbers in two steps: a cheap pattern that opens with a character class finds digit stretches,
# then the precise one runs inside each stretch only. A number may touch CJK or Hangul characters (those
# scripts put no space around it: "電話番号は080-1234-5678です"); touching a Latin, Cyrillic or Greek letter or
# digit (``_GLUE``), it is part of a code.
_PHONE_STRETCH = re.compile(r"[+(\d][\d()+.\-/ \t\r\nextEXT]{6,}")
_PHONE = re.compile(
    rf"(?<![+.\-/:])(?<!{_GLUE})"
    r"(?P<intl>(?:\+|00)\d{1,3}[ .\-]?)?"
    r"(?:\(0\)[ .\-]?)?"
    r"(?:\d{1,2}[ ]?(?=\())?"  # a trunk or carrier digit before an area code in brackets: "8 (916) 123-45-67"
    r"(?P<area>\((?:\d{1,2}[ \-])?\d{1,5}\)[ .\-]?)?"
    r"\d{1,12}(?:(?:[ .\-/]|[ ]?\r?\n[ ]?){1,2}\d{1,12}){0,6}"
    r"(?:[ ]?(?:x|ext\.?)[ ]?\d{1,6})?"
    rf"(?!{_GLUE}|-|[.:]\d)"
)
_PHONE_CUE = re.compile(
    r"(?i)(?:phone|tel\b|tel\.|telephone|mobile|cell|call|ring|text me|whats ?app|fax|sms|number|contact|reach"
    r"|telefon|handy|mobil|rufnummer|ruf mich|téléphone|portable|numéro|joindre|appelle|teléfono|móvil|llam"
    r"|lláma|número|telefono|cellulare|chiama|numero|telefoonnummer|mobiel|bel\b|celular|telefone|me liga"
    r"|телефон|тел\.|моб"
    r"|電話|携帯|ケータイ|电话|手机|手機|号码|전화|휴대폰|핸드폰|연락처)"
)
# The telephony words among those: next to one of them a number valid in any region counts ("number",
# "contact" or "call" alone qualify order numbers and API calls as often as phones).
_STRONG_PHONE_CUE = re.compile(
    r"(?i)(?:phone|tel\b|tel\.|tel:|mobile|cell\b|cellphone|call me|ring me|text me|whats ?app|fax|sms"
    r"|telefon|handy|mobil\b|mobilnummer|rufnummer|ruf mich an|téléphone|portable|appelle-moi|teléfono|móvil"
    r"|llámame|telefono|cellulare|chiamami|telefoonnummer|mobiel|bel me|celular|telefone|telemóvel|me liga"
    r"|телефон|тел\.|моб\."
    r"|電話|携帯|ケータイ|电话|手机|手機|전화|휴대폰|핸드폰|연락처)"
)
# Written the North American way, "(555) 123-4567", "555-123-4567", "555.123.4567": a phone even when
# libphonenumber finds the area code unassigned (fictional 555 numbers are how people anonymise badly).
_NANP_SHAPE = re.compile(r"(?:\+?1[ .\-]?)?(?:\(\d{3}\)[ ]?|\d{3}[.\-])\d{3}[.\-]\d{4}")
_DATE_SHAPE = re.compile(r"\d{4}[.\-/]\d{1,2}[.\-/]\d{1,2}|\d{1,2}[.\-/]\d{1,2}[.\-/]\d{2,4}")
_SSN_LAYOUT = re.compile(r"\d{3}-\d{2}-\d{4}")
_IPV4_SHAPE = re.compile(r"\d{1,3}(?:\.\d{1,3}){3}")
_EXTENSION = re.compile(r"[ ]?(?:x|ext\.?)[ ]?\d{1,6}$")
# Regions an unprefixed number is tried in first: with a trunk "0" it is European, without one North
# American, Spanish or Italian (whose numbers carry no trunk prefix). Fewer regions, fewer parses (the
# costly step); every other region is tried only for a number next to a telephony cue or written with a
# trunk "0" and separators (see ``_valid_anywhere``).
_TRUNK_REGIONS = ("GB", "DE", "FR", "IT", "NL")
_NO_TRUNK_REGIONS = ("US", "ES", "IT")


class _CallingCode(NamedTuple):
    code: int
    national_prefix: str
    lengths: frozenset[int]  # possible lengths of a national significant number


@functools.cache
def _calling_codes() -> tuple[_CallingCode, ...]:
    """Every country calling code with its trunk prefix and number lengths, from phonenumbers' metadata.
    Built on first use; loading a region's metadata costs about a millisecond the first time."""
    codes = []
    for code, regions in sorted(COUNTRY_CODE_TO_REGION_CODE.items()):
        lengths: set[int] = set()
        prefix = ""
        for region in regions:
            metadata = PhoneMetadata.metadata_for_region_or_calling_code(code, region)
            if metadata is None:
                continue
            prefix = prefix or (metadata.national_prefix or "")
            if metadata.general_desc is not None:
                lengths.update(metadata.general_desc.possible_length or ())
        if lengths:
            codes.append(_CallingCode(code, prefix, frozenset(lengths)))
    return tuple(codes)


@functools.lru_cache(maxsize=4096)
def _valid_anywhere(digits: str, trunk_only: bool = False) -> bool:
    """Whether ``digits``, a number written the national way, is a valid number of some region: its trunk
    prefix (if the region has one and the number starts with it) dropped, the rest checked against the
    region's number plan. ``trunk_only``: only regions whose national numbers are dialled with a trunk prefix
    that this number starts with (an unprefixed "0..." number)."""
    for code in _calling_codes():
        has_trunk = bool(code.national_prefix) and digits.startswith(code.national_prefix)
        if trunk_only and not has_trunk:
            continue
        national = digits[len(code.national_prefix) :] if has_trunk else digits
        if len(national) not in code.lengths or not national:
            continue
        number = phonenumbers.PhoneNumber(country_code=code.code, national_number=int(national))
        zeros = len(national) - len(national.lstrip("0"))
        if zeros:
            number.italian_leading_zero = True
            number.number_of_leading_zeros = zeros
        if phonenumbers.is_valid_number(number):
            return True
    return False


def _phone_score(candidate: str, cued: bool, strong_cue: bool = False) -> float | None:
    body = _EXTENSION.sub("", candidate)
    digits = "".join(c for c in body if c.isdigit())
    if not 7 <= len(digits) <= 15 or _DATE_SHAPE.fullmatch(body) or _IPV4_SHAPE.fullmatch(body):
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
    if strong_cue and len(digits) >= 8 and _valid_anywhere(digits):
        # "電話 080-1234-5678", "Tel 22 50 52 88": valid somewhere, and said to be a phone. Seven digits are
        # valid in so many regions that "phone ... order 2024-117" would count; mobile numbers have more.
        return 0.8
    if possible and cued:
        return 0.7
    # No cue, no region of the short list: a number dialled with a trunk "0" and written in groups
    # ("080-1234-5678", "0 2907 4833") is a phone in most of the world, and an order number rarely looks so.
    if body.startswith("0") and not body.isdigit() and body.count("0") < len(digits) - 2:
        return 0.6 if _valid_anywhere(digits, trunk_only=True) else None
    return None


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
        if _SSN_LAYOUT.fullmatch(candidate) and is_unissuable_ssn(candidate.replace("-", "")):
            continue  # "078-05-1120", "666-12-3456": written as an SSN, and one that is never issued
        cued = cue_before(text, match.start(), _PHONE_CUE)
        score = _phone_score(candidate, cued, cued and cue_before(text, match.start(), _STRONG_PHONE_CUE))
        if score is not None:
            yield PiiFinding.at(PiiKind.PHONE, text, match.start(), match.start() + len(candidate), score)


_IPV4 = re.compile(r"\d{1,3}(?:\.\d{1,3}){3}(?![\w]|\.\d)")
_IPV6 = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{1,4}|\d{1,3}(?:\.\d{1,3}){3})?(?![\w:])")


# A network written with its prefix length ("81.206.128.0/22") is a range, not a host: its host bits are zero
# and the prefix is shorter than an address. "81.206.130.46/24" (an interface's address) is a host.
_CIDR_SUFFIX = re.compile(r"/(\d{1,3})(?!\d)")


def _network_written(text: str, end: int, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    suffix = _CIDR_SUFFIX.match(text, end)
    if suffix is None or int(suffix.group(1)) >= address.max_prefixlen:
        return False
    try:
        ipaddress.ip_network(f"{address}/{suffix.group(1)}", strict=True)
    except ValueError:
        return False  # host bits set, or no valid prefix length
    return True


def find_ip_addresses(text: str) -> Iterator[PiiFinding]:
    for match in _IPV4.finditer(text):
        if glued_before(text, match.start(), "."):
            continue
        try:
            address4 = ipaddress.IPv4Address(match.group())
        except ValueError:
            continue
        if is_public_address(address4) and not _network_written(text, match.end(), address4):
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
        if is_public_address(address6) and not _network_written(text, match.end(), address6):
            yield PiiFinding.at(PiiKind.IP_ADDRESS, text, match.start(), match.end(), 0.9)
