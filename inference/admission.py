"""Whether a request may start: ``validate(call)`` refuses a malformed call (400/413 and friends) before anything
is held. Where it then waits for an engine slot, and what it is refused at capacity, is ``inference.queueing``.
"""

from __future__ import annotations

from django.conf import settings

from inference.completion import MINTED_ID_PREFIX, CompletionCall
from inference.errors import ContextTooLong, InvalidRequest
from speculative.types import MAX_TOP_LOGPROBS

MAX_TAGS = 16


def validate(call: CompletionCall) -> None:
    """Refuse a call whose values no tier could serve; charges nothing."""
    if not call.request_id_fresh and call.request_id.startswith(MINTED_ID_PREFIX):
        # Minted ids may skip the reservation row's uniqueness check (budget leases): a
        # caller's own id must never be able to collide with one.
        raise InvalidRequest(f"request ids starting with {MINTED_ID_PREFIX!r} are the server's", param="request_id")
    if call.logprobs is not None and (
        isinstance(call.logprobs, bool)
        or not isinstance(call.logprobs, int)
        or not 0 <= call.logprobs <= MAX_TOP_LOGPROBS
    ):
        raise InvalidRequest(f"logprobs must be an integer from 0 to {MAX_TOP_LOGPROBS}, or null", param="logprobs")
    if call.latency_class not in ("interactive", "batch"):
        raise InvalidRequest(
            f"latency_class must be 'interactive' or 'batch', got {call.latency_class!r}", param="latency_class"
        )
    if "~" in call.request_id:  # the separator of a later leg's ledger id (settlement.LEG_ID_SEPARATOR)
        raise InvalidRequest("a request id may not contain '~'", param="request_id")
    if not isinstance(call.prompt, str) or not call.prompt:
        raise InvalidRequest("the prompt is empty", param="prompt")
    if len(call.prompt) > settings.TANDEM_MAX_PROMPT_CHARS:
        raise ContextTooLong(
            f"the prompt has {len(call.prompt)} characters; at most {settings.TANDEM_MAX_PROMPT_CHARS} are accepted",
            param="prompt",
        )
    if isinstance(call.max_tokens, bool) or not isinstance(call.max_tokens, int) or call.max_tokens < 1:
        raise InvalidRequest(f"max_tokens must be a positive integer, got {call.max_tokens!r}", param="max_tokens")
    if len(call.tags) > MAX_TAGS or any(
        not isinstance(k, str) or not isinstance(v, str) or len(k) > 64 or len(v) > 256 for k, v in call.tags.items()
    ):
        raise InvalidRequest(f"tags must be at most {MAX_TAGS} string pairs (keys <= 64, values <= 256 chars)")
