"""The values the detector hands out: PII kinds, one finding, and the report of one scan."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class PiiKind(StrEnum):
    """What a finding is; a ``StrEnum`` so that ``report.kinds`` compares equal to plain strings."""

    EMAIL = "EMAIL"
    PHONE = "PHONE"
    CREDIT_CARD = "CREDIT_CARD"
    IBAN = "IBAN"
    NATIONAL_ID = "NATIONAL_ID"
    PASSPORT = "PASSPORT"
    DATE_OF_BIRTH = "DATE_OF_BIRTH"
    CREDENTIAL = "CREDENTIAL"
    IP_ADDRESS = "IP_ADDRESS"
    PERSON = "PERSON"


# When two candidates overlap and score the same, the more specific kind wins: a checksummed
# number beats a phone-shaped reading of the same digits, anything beats a name guess.
KIND_PRIORITY: dict[PiiKind, int] = {
    kind: rank
    for rank, kind in enumerate(
        (
            PiiKind.CREDENTIAL,
            PiiKind.IBAN,
            PiiKind.CREDIT_CARD,
            PiiKind.NATIONAL_ID,
            PiiKind.PASSPORT,
            PiiKind.EMAIL,
            PiiKind.IP_ADDRESS,
            PiiKind.DATE_OF_BIRTH,
            PiiKind.PHONE,
            PiiKind.PERSON,
        )
    )
}


@dataclass(frozen=True, slots=True)
class PiiFinding:
    """One piece of PII: ``text == scanned_text[start:end]`` (offsets into the original text)."""

    kind: PiiKind
    start: int
    end: int
    text: str
    score: float

    @classmethod
    def at(cls, kind: PiiKind, text: str, start: int, end: int, score: float) -> PiiFinding:
        """The finding for ``text[start:end]``."""
        return cls(kind, start, end, text[start:end], score)

    def overlaps(self, other: PiiFinding) -> bool:
        return self.start < other.end and other.start < self.end


@dataclass(frozen=True, slots=True)
class PiiReport:
    """The findings of one scan, sorted by start and never overlapping; truthy when there is any."""

    findings: tuple[PiiFinding, ...] = ()
    kinds: frozenset[str] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "kinds", frozenset(f.kind for f in self.findings))

    def __bool__(self) -> bool:
        return bool(self.findings)
