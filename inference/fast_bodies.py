"""The completion endpoints' common request bodies, validated in plain Python before DRF would.

DRF's ``Serializer.run_validation`` of a chat body cost about 80 us of a relayed request's
2 ms on this machine (each field's ``run_validation``, its validators, the nested
``stream_options`` serializer), a twentieth of what Tandem adds to a cloud call. Almost
every body a client sends is plain: a model name, messages, a few numbers in range. For
those, :func:`chat` and :func:`completion` build the same dict the serializers would
(``inference.openai_api``'s ``ChatCompletionInputSerializer`` and
``CompletionInputSerializer``: same defaults, same ``null`` handling, same types), and for
anything else they return None: the serializer then validates the body and words the
error, so every refusal is still DRF's, message for message. The fast path only accepts;
it never refuses.

"Plain" is narrower than "valid" on purpose: a string DRF would trim, one with a NUL or a
lone surrogate, a non-ASCII model name, an integer past 2**63 all go to DRF, which accepts
or refuses them by its own rules. ``tests/inference/test_fast_bodies.py`` checks over
generated bodies that whatever this accepts, the serializer accepts with the same result.
"""

from __future__ import annotations

from typing import Any

from speculative.types import MAX_TOP_LOGPROBS

# the limits and defaults of the serializers (inference.openai_api), which take them from here
MODEL_MAX_CHARS = 200
TIER_MAX_CHARS = 32
USER_MAX_CHARS = 256
MAX_STOP = 4  # OpenAI's limit on stop sequences
MAX_LEGACY_LOGPROBS = 5
DEFAULT_TEMPERATURE = 1.0  # OpenAI's default
INT_BOUND = 2**63  # a larger integer goes to DRF (its int(str(value)) has a digit limit)


class _NotPlain(Exception):
    """This body is not one the fast path vouches for: the serializer decides."""


def _plain_text(value: Any, max_chars: int, *, blank: bool) -> str:
    """A CharField's value that DRF returns unchanged: ASCII, no NUL, nothing to trim, within its length."""
    if type(value) is not str or len(value) > max_chars or not value.isascii() or "\x00" in value:
        raise _NotPlain
    if value != value.strip() or (not value and not blank):
        raise _NotPlain
    return value


def _integer(value: Any, default: Any, low: int | None = None, high: int | None = None) -> Any:
    if value is None:
        return default
    if type(value) is not int or not -INT_BOUND < value < INT_BOUND:
        raise _NotPlain
    if (low is not None and value < low) or (high is not None and value > high):
        raise _NotPlain
    return value


def _number(value: Any, default: float, low: float, high: float) -> float:
    if value is None:
        return default
    if type(value) not in (int, float) or not low <= value <= high:  # JSON has no NaN or Infinity (wire.parse_json)
        raise _NotPlain
    return float(value)


def _boolean(value: Any, default: bool) -> bool:
    if value is None:
        return default
    if type(value) is not bool:
        raise _NotPlain
    return value


def stop_sequences(value: Any) -> tuple[str, ...] | None:
    """``stop`` as a tuple: a string, or a list of up to ``MAX_STOP`` non-empty strings; None if it is neither.

    The one definition: the serializer's ``StopField`` refuses what this returns None for.
    """
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or len(stops) > MAX_STOP or not all(isinstance(s, str) and s for s in stops):
        return None
    return tuple(stops)


def single_prompt(value: Any) -> str | None:
    """``prompt`` of /v1/completions: a string, or a list holding exactly one; None if it is neither.

    The one definition: the serializer's ``PromptField`` refuses what this returns None for.
    """
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    return value if isinstance(value, str) else None


def _stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = stop_sequences(value)
    if stops is None:
        raise _NotPlain
    return stops


def _generation(body: dict) -> dict:
    """The fields both endpoints share (``_GenerationInputSerializer``)."""
    get = body.get
    if "model" not in body:
        raise _NotPlain
    stream_options = get("stream_options")
    if stream_options is not None:
        if type(stream_options) is not dict:
            raise _NotPlain
        stream_options = {"include_usage": _boolean(stream_options.get("include_usage"), False)}
    metadata = get("metadata", {})
    if metadata is not None:
        if type(metadata) is not dict:
            raise _NotPlain
        metadata = {k: _plain_text(v, 1 << 30, blank=True) for k, v in metadata.items()}
    tier = get("tier")
    user = get("user")
    if _integer(get("n"), 1) != 1:
        raise _NotPlain
    return {
        "model": _plain_text(body["model"], MODEL_MAX_CHARS, blank=False),
        "max_tokens": _integer(get("max_tokens"), None, low=1),
        "temperature": _number(get("temperature"), DEFAULT_TEMPERATURE, 0.0, 2.0),
        "top_p": _number(get("top_p"), 1.0, 0.0, 1.0),
        "top_k": _integer(get("top_k"), 0, low=0),
        "tier": None if tier is None else _plain_text(tier, TIER_MAX_CHARS, blank=False),
        "seed": _integer(get("seed"), None),
        "stop": _stop(get("stop")),
        "n": 1,
        "stream": _boolean(get("stream"), False),
        "stream_options": stream_options,
        "user": "" if user is None else _plain_text(user, USER_MAX_CHARS, blank=True),
        "metadata": metadata,
    }


def chat(body: dict) -> dict | None:
    """``ChatCompletionInputSerializer``'s result for a plain chat body; None: let the serializer validate it."""
    try:
        data = _generation(body)
        messages = body.get("messages")
        if type(messages) is not list or not messages:
            raise _NotPlain
        data["messages"] = list(messages)
        data["max_completion_tokens"] = _integer(body.get("max_completion_tokens"), None, low=1)
        data["logprobs"] = _boolean(body.get("logprobs"), False)
        data["top_logprobs"] = _integer(body.get("top_logprobs"), None, low=0, high=MAX_TOP_LOGPROBS)
        if data["top_logprobs"] is not None and not data["logprobs"]:
            raise _NotPlain
    except _NotPlain:
        return None
    return data


def completion(body: dict) -> dict | None:
    """``CompletionInputSerializer``'s result for a plain completion body; None: let the serializer validate it."""
    try:
        data = _generation(body)
        prompt = single_prompt(body.get("prompt"))
        if prompt is None:
            raise _NotPlain
        data["prompt"] = prompt
        data["logprobs"] = _integer(body.get("logprobs"), None, low=0, high=MAX_LEGACY_LOGPROBS)
    except _NotPlain:
        return None
    return data
