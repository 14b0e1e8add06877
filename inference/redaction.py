"""Redact-then-cloud: personal data leaves for a cloud upstream as placeholders, and comes back in the answer.

``redacted_call(call, report)`` replaces every finding of the prompt's PII scan with a
placeholder (``<EMAIL_1>``): in a chat, in each message, numbered across the whole
conversation. ``Restoring`` wraps the cloud completion: each chunk's placeholders are put
back before the client sees it (a placeholder split over chunks is held back until it is
whole), while the charge counts the text the upstream actually produced.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncGenerator

from inference.cloud import CLOUD_TOKEN_ID
from inference.completion import CompletionCall
from inference.pii import PiiReport, Redaction, StreamRestorer, redact
from speculative.types import Provenance, TokenEvent

# Joins a chat's messages for one scan and one redaction, then splits them again: no
# finding spans it (the scanner never reads a NUL as part of a value), so the split is exact.
MESSAGE_SEPARATOR = "\x00"


def scan_text(call: CompletionCall) -> str:
    """What the PII scan reads: a chat's messages (what a cloud upstream is sent), else the prompt."""
    if call.messages:
        return MESSAGE_SEPARATOR.join(m.get("content", "") for m in call.messages)
    return call.prompt


def serving_call(
    call: CompletionCall, redact_it: bool, report: PiiReport | None
) -> tuple[CompletionCall, Redaction | None] | None:
    """The call as a route's tier is given it: redacted for a route that gets PII redacted (``Route.redact``).

    None when the PII cannot be cut out cleanly: that tier may not take the request.
    Every route of a request goes through here (the first, a failover, an escalation), so
    no way onto the cloud skips the redaction.
    """
    if not redact_it:
        return call, None
    assert report is not None, "a route that redacts PII comes from a scan that found it"
    return redacted_call(call, report)


def redacted_call(call: CompletionCall, report: PiiReport) -> tuple[CompletionCall, Redaction] | None:
    """``call`` with its PII replaced by placeholders, and the redaction to restore the answer; None if it cannot be.

    A call that goes on from a partial answer (a failover mid-stream) has that answer
    redacted too: it was restored for the client, so it may hold the originals.
    """
    redaction = redact(scan_text(call), report)
    continue_from = _hidden(call.continue_from, redaction)
    if not call.messages:
        return dataclasses.replace(call, prompt=redaction.text, continue_from=continue_from), redaction
    contents = redaction.text.split(MESSAGE_SEPARATOR)
    if len(contents) != len(call.messages):
        return None  # a finding ran across two messages: keep the request off the cloud instead
    messages = tuple({**m, "content": c} for m, c in zip(call.messages, contents, strict=True))
    prompt = "\n".join(contents)  # never read by the cloud tier, which sends the messages
    return dataclasses.replace(call, prompt=prompt, messages=messages, continue_from=continue_from), redaction


def _hidden(text: str, redaction: Redaction) -> str:
    """``text`` with the redaction's originals put back into their placeholders (longest first)."""
    for placeholder, original in sorted(redaction.mapping.items(), key=lambda item: -len(item[1])):
        text = text.replace(original, placeholder)
    return text


class Restoring:
    """A cloud completion whose chunks have the redaction's placeholders put back, counted as the upstream sent them."""

    def __init__(self, completion, redaction: Redaction):
        self._completion = completion
        self._restorer = StreamRestorer(redaction)
        self._raw: list[str] = []  # each event's text as the upstream sent it
        self.stats = completion.stats
        self._events = self._run()

    def __aiter__(self) -> Restoring:
        return self

    async def __anext__(self) -> TokenEvent:
        return await self._events.__anext__()

    async def aclose(self) -> None:
        await self._events.aclose()
        await self._completion.aclose()

    async def _run(self) -> AsyncGenerator[TokenEvent, None]:
        async for event in self._completion:
            self._raw.append(event.text)
            yield dataclasses.replace(event, text=self._restorer.push(event.text))
        tail = self._restorer.flush()
        if tail:
            self._raw.append("")
            yield TokenEvent(CLOUD_TOKEN_ID, tail, Provenance.CLOUD)

    def token_counts(self, delivered_text: str, delivered: int, completed: bool) -> tuple[int, int]:
        """The upstream's counts, over the text it produced (placeholders, not the originals)."""
        return self._completion.token_counts("".join(self._raw[:delivered]), delivered, completed)
