"""An OpenAI-compatible upstream's logprobs, read into :class:`NamedLogprob` s (the cloud tier relays them).

The chat API sends ``logprobs.content``: ``[{token, logprob, top_logprobs: [{token, logprob}]}]``;
the legacy completions API sends ``logprobs: {tokens, token_logprobs, top_logprobs: [{token: logprob}]}``.
An upstream names its tokens by their text (it sends no ids a local tokenizer could read).
"""

from __future__ import annotations

import math
from typing import Any

from inference.completion import NamedLogprob


def named_logprobs(raw: Any, chat: bool) -> tuple[NamedLogprob, ...]:
    """The tokens' logprobs in a choice's ``logprobs``: the chat API's ``content`` list, else the legacy lists.

    What is malformed (a missing or non-numeric logprob) is left out rather than failing an
    answer the client is already reading: its text is what it paid for.
    """
    if not isinstance(raw, dict):
        return ()
    if chat:
        entries = raw.get("content")
        if not isinstance(entries, list):
            return ()
        return tuple(
            NamedLogprob(e["token"], float(e["logprob"]), _alternatives(e.get("top_logprobs")))
            for e in entries
            if isinstance(e, dict) and isinstance(e.get("token"), str) and _is_number(e.get("logprob"))
        )
    tokens, logprobs, tops = raw.get("tokens"), raw.get("token_logprobs"), raw.get("top_logprobs")
    if not isinstance(tokens, list) or not isinstance(logprobs, list):
        return ()
    tops = tops if isinstance(tops, list) else []
    return tuple(
        NamedLogprob(token, float(lp), _alternatives(tops[i] if i < len(tops) else None))
        for i, (token, lp) in enumerate(zip(tokens, logprobs, strict=False))
        if isinstance(token, str) and _is_number(lp)
    )


def _alternatives(raw: Any) -> tuple[tuple[str, float], ...]:
    """A token's alternatives, highest first: a list of ``{token, logprob}`` (chat) or a ``{token: logprob}`` map."""
    if isinstance(raw, dict):
        pairs = [(t, lp) for t, lp in raw.items() if _is_number(lp)]
    elif isinstance(raw, list):
        pairs = [
            (e["token"], e["logprob"])
            for e in raw
            if isinstance(e, dict) and isinstance(e.get("token"), str) and _is_number(e.get("logprob"))
        ]
    else:
        return ()
    return tuple(sorted(((str(t), float(lp)) for t, lp in pairs), key=lambda p: -p[1]))


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
