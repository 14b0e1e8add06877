"""Redaction and restoration: replace findings with placeholders such as ``<EMAIL_1>`` before text leaves for
a tier that must not see it, and put the originals back into what comes back, whole or streamed.

Placeholders are plain ASCII, upper-case and angle-bracketed so that a model echoes them intact. The same
original value always gets the same placeholder within one redaction, so the model can tell that two
mentions are one person, and a number is skipped when the text already contains that placeholder literally.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from inference.pii.detector import scan
from inference.pii.findings import PiiReport

PLACEHOLDER = re.compile(r"<[A-Z][A-Z_]*_\d+>")


@dataclass(frozen=True)
class Redaction:
    """``text`` with every finding replaced; ``mapping`` takes each placeholder back to its original."""

    text: str
    mapping: Mapping[str, str]

    def restore(self, text: str) -> str:
        """Put the originals back; placeholders this redaction did not make are left as they are."""
        if not self.mapping:
            return text
        return PLACEHOLDER.sub(lambda m: self.mapping.get(m.group(), m.group()), text)


def redact(text: str, report: PiiReport | None = None) -> Redaction:
    """Replace each finding of ``report`` (by default, a fresh scan of ``text``) by a placeholder."""
    if report is None:
        report = scan(text)
    pieces: list[str] = []
    mapping: dict[str, str] = {}
    by_value: dict[tuple[str, str], str] = {}
    counters: dict[str, int] = {}
    position = 0
    for finding in report.findings:
        assert text[finding.start : finding.end] == finding.text, "the report is not of this text"
        key = (str(finding.kind), finding.text)
        placeholder = by_value.get(key)
        if placeholder is None:
            placeholder = _next_placeholder(str(finding.kind), counters, text)
            by_value[key] = placeholder
            mapping[placeholder] = finding.text
        pieces.append(text[position : finding.start])
        pieces.append(placeholder)
        position = finding.end
    pieces.append(text[position:])
    return Redaction("".join(pieces), MappingProxyType(mapping))


def _next_placeholder(kind: str, counters: dict[str, int], text: str) -> str:
    while True:
        counters[kind] = counters.get(kind, 0) + 1
        placeholder = f"<{kind}_{counters[kind]}>"
        if placeholder not in text:  # never collide with a placeholder-like string the user wrote
            return placeholder


class StreamRestorer:
    """Restores a streamed reply chunk by chunk.

    ``push`` returns what is safe to emit now: everything except a tail that could still grow into one of
    this redaction's placeholders (``"... <EMA"``). ``flush`` returns that tail at the end of the stream.
    The concatenation of all outputs equals ``redaction.restore`` of the concatenated input, however the
    input was split: no character is dropped or repeated.
    """

    def __init__(self, redaction: Redaction) -> None:
        self._redaction = redaction
        self._pending = ""

    def push(self, chunk: str) -> str:
        buffer = self._pending + chunk
        cut = self._hold_from(buffer)
        self._pending = buffer[cut:]
        return self._redaction.restore(buffer[:cut])

    def flush(self) -> str:
        tail, self._pending = self._pending, ""
        return self._redaction.restore(tail)

    def _hold_from(self, buffer: str) -> int:
        # Only the last "<" can open an unfinished placeholder: any earlier one is either closed by a ">"
        # (complete, restorable now) or followed by another "<" (so it can never become a placeholder).
        opening = buffer.rfind("<")
        if opening == -1:
            return len(buffer)
        tail = buffer[opening:]
        if ">" not in tail and any(p.startswith(tail) for p in self._redaction.mapping):
            return opening
        return len(buffer)
