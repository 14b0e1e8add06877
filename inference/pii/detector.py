"""The detector: runs every recogniser over a prompt and over its de-obfuscated copy, keeps the best
non-overlapping findings, and applies the public-figure rule. One ``Detector`` holds the process's compiled
state (the name model); ``default_detector()`` builds it once, on first use, never at import.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator

from inference.pii.birthdates import find_dates_of_birth
from inference.pii.checksummed import find_credit_cards, find_ibans, find_national_ids, find_passports
from inference.pii.contact import find_emails, find_ip_addresses, find_phones
from inference.pii.context import lowered
from inference.pii.credentials import find_credentials
from inference.pii.cued_names import find_cued_names
from inference.pii.findings import KIND_PRIORITY, PiiFinding, PiiKind, PiiReport
from inference.pii.lone_words import Prompt
from inference.pii.names import NameModel
from inference.pii.non_names import NonNames
from inference.pii.normalise import normalise
from inference.pii.public_figures import is_public_figure, within_public_figure

Recogniser = Callable[[str], Iterator[PiiFinding]]

# Pattern recognisers, run on the original text and on its normalised copy. Names are only looked for in
# the original: normalising never touches capitalised words.
PATTERN_RECOGNISERS: tuple[Recogniser, ...] = (
    find_credentials,
    find_ibans,
    find_credit_cards,
    find_national_ids,
    find_passports,
    find_emails,
    find_ip_addresses,
    find_dates_of_birth,
)
# Phones run last, told what the others found (see contact.find_phones).

# Below this a candidate is not reported. Scores are the recognisers' own confidence; everything that
# passes a checksum or has its cue word scores well above it.
REPORT_THRESHOLD = 0.5


class Detector:
    """Scans text for PII. Build once per process (it loads the name model) and share: it is read-only."""

    def __init__(self, name_model: NameModel | None = None, non_names: NonNames | None = None) -> None:
        self._names = name_model if name_model is not None else NameModel.load()
        self._non_names = non_names if non_names is not None else NonNames.load()

    def scan(self, text: str) -> PiiReport:
        candidates = _pattern_findings(text)
        candidates.extend(self._model_names(text, other_pii=any(c.score >= REPORT_THRESHOLD for c in candidates)))
        candidates.extend(find_cued_names(text, self._names.gazetteer))
        normalised = normalise(text)
        if normalised.changed:
            for found in _pattern_findings(normalised.text):
                start, end = normalised.original_span(found.start, found.end)
                candidates.append(PiiFinding.at(found.kind, text, start, end, found.score))
        findings = _without_public_figures(text, _best_non_overlapping(candidates))
        return PiiReport(tuple(sorted(findings, key=lambda f: f.start)))

    def _model_names(self, text: str, other_pii: bool) -> Iterator[PiiFinding]:
        # Only the model's guesses are checked: a name after "my name is" is a name whatever the word.
        prompt: Prompt | None = None
        for found in self._names.find(text):
            prompt = Prompt(text) if prompt is None else prompt
            if not self._non_names.overrules(text, found, self._names.gazetteer, other_pii, prompt):
                yield found


def _pattern_findings(text: str) -> list[PiiFinding]:
    found = [f for recognise in PATTERN_RECOGNISERS for f in recognise(text)]
    found.extend(find_phones(text, taken=found))
    return found


def _best_non_overlapping(candidates: Iterable[PiiFinding]) -> list[PiiFinding]:
    # Greedy by confidence: pattern findings before any name guess (a capitalised word inside an e-mail
    # address is not a person), then higher score, then the more specific kind, then the longer span.
    ranked = sorted(
        (c for c in candidates if c.score >= REPORT_THRESHOLD),
        key=lambda c: (c.kind is PiiKind.PERSON, -c.score, KIND_PRIORITY[c.kind], c.start - c.end),
    )
    kept: list[PiiFinding] = []
    for candidate in ranked:
        if not any(candidate.overlaps(k) for k in kept):
            kept.append(candidate)
    return kept


def _without_public_figures(text: str, findings: list[PiiFinding]) -> list[PiiFinding]:
    if any(f.kind is not PiiKind.PERSON for f in findings):
        return findings  # personal details present: every name may be tied to them, public or not
    if not findings:
        return findings
    lower = lowered(text)
    return [f for f in findings if not (is_public_figure(f.text) or within_public_figure(lower, f.start, f.end))]


_default: Detector | None = None
_default_lock = threading.Lock()


def default_detector() -> Detector:
    """The process-wide detector, built on first use (loading the name model takes a few milliseconds)."""
    global _default
    if _default is None:
        with _default_lock:
            if _default is None:
                _default = Detector()
    return _default


def scan(text: str) -> PiiReport:
    """Scan ``text`` with the process-wide detector."""
    return default_detector().scan(text)
