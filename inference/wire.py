"""JSON off the wire (an HTTP body, a websocket frame): parsed strictly, or refused with a 400 a client can act on.

``parse_json`` refuses what ``json.loads`` would let through into the platform or fail on
with an exception nobody answers: NaN and Infinity (they slip past every range check),
nesting deeper than any request needs (a body 5,000 levels deep made the C decoder raise
``RecursionError``, which surfaced as a 500), and bytes that are not UTF-8.
"""

from __future__ import annotations

import json
from typing import Any

from inference.errors import InvalidRequest

MAX_JSON_DEPTH = 32  # a chat request nests 4 deep (body, messages, message, content part); tags and the rest less


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not JSON")


def parse_json(data: str | bytes, what: str = "the request body") -> Any:
    """``data`` as JSON, or InvalidRequest (400, code ``invalid_json``) saying what is wrong with it."""
    try:
        value = json.loads(data, parse_constant=_refuse_constant)
    except RecursionError:
        raise InvalidRequest(f"{what} nests deeper than {MAX_JSON_DEPTH} levels", code="invalid_json") from None
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise InvalidRequest(f"{what} is not valid JSON: {exc}", code="invalid_json") from None
    if _deeper_than(value, MAX_JSON_DEPTH):
        raise InvalidRequest(f"{what} nests deeper than {MAX_JSON_DEPTH} levels", code="invalid_json")
    return value


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether containers nest more than ``limit`` deep (iterative: no recursion on hostile input)."""
    level: list[Any] = [value]
    for _ in range(limit):
        level = [
            child
            for item in level
            if isinstance(item, dict | list)
            for child in (item.values() if isinstance(item, dict) else item)
            if isinstance(child, dict | list)
        ]
        if not level:
            return False
    return bool(level)
