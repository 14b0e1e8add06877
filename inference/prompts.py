"""Chat messages -> the prompt text a completion model reads.

Adapters (the OpenAI API, and any other that takes OpenAI-style messages) call
:func:`messages_parse` to validate what a client sent, then :func:`chat_prompt` to
render it. A model whose tokenizer carries a ``chat_template`` is prompted exactly as it
was trained (``apply_chat_template(..., add_generation_prompt=True)``); one without gets
the plain template below, one ``Role: content`` line per message, ending with the
``Assistant:`` cue the model completes::

    System: You are terse.
    User: Hi
    Assistant: Hello.
    User: What is speculative decoding?
    Assistant:

``developer`` messages (OpenAI's newer name for system instructions) are rendered as
``system``: templates written before that role existed would refuse it or drop it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

from jinja2 import TemplateError

from inference.errors import InvalidRequest

ROLES = ("system", "user", "assistant", "developer", "tool")
PLAIN_LABELS = {"system": "System", "user": "User", "assistant": "Assistant", "tool": "Tool"}
PLAIN_CUE = "Assistant:"
PART_SEPARATOR = "\n"  # text parts of one message are joined into one block


@dataclass(frozen=True)
class Message:
    role: str  # one of ROLES, with "developer" already folded into "system"
    content: str


def messages_parse(raw: object) -> list[Message]:
    """Validate OpenAI chat messages; raise :class:`InvalidRequest` naming the offending param.

    Accepted: a non-empty list of objects with ``role`` in :data:`ROLES` and ``content``
    either a string or a list of ``{"type": "text", "text": str}`` parts. Other keys
    (``name``, ``tool_call_id``) are ignored; images, audio and tool calls are refused
    rather than silently dropped, since the answer would ignore them.
    """
    if not isinstance(raw, list) or not raw:
        raise InvalidRequest("'messages' must be a non-empty list of message objects", param="messages")
    return [_message_parse(item, f"messages[{i}]") for i, item in enumerate(raw)]


def _message_parse(item: object, param: str) -> Message:
    if not isinstance(item, dict):
        raise InvalidRequest(f"'{param}' must be an object with 'role' and 'content'", param=param)
    role = item.get("role")
    if role not in ROLES:
        raise InvalidRequest(f"'{param}.role' must be one of {', '.join(ROLES)}; got {role!r}", param=f"{param}.role")
    return Message("system" if role == "developer" else role, _content_parse(item.get("content"), f"{param}.content"))


def _content_parse(content: object, param: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list) or not content:
        raise InvalidRequest(f"'{param}' must be a string or a non-empty list of text parts", param=param)
    texts = []
    for i, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise InvalidRequest(
                f'\'{param}[{i}]\' must be {{"type": "text", "text": <string>}}; got {kind!r} '
                "(only text parts are supported)",
                param=f"{param}[{i}]",
            )
        texts.append(part["text"])
    return PART_SEPARATOR.join(texts)


def chat_prompt(tokenizer: object, messages: Sequence[Message]) -> str:
    """The prompt text for ``messages``: the tokenizer's chat template, or the plain template."""
    if getattr(tokenizer, "chat_template", None):
        try:
            return tokenizer.apply_chat_template(  # type: ignore[attr-defined]
                [{"role": m.role, "content": m.content} for m in messages],
                tokenize=False,
                add_generation_prompt=True,
            )
        except TemplateError as exc:  # e.g. "roles must alternate user/assistant": the client can fix it
            raise InvalidRequest(f"the model's chat template refused these messages: {exc}", param="messages") from None
    return plain_prompt(messages)


# A chat this short renders in microseconds: on the event loop, no thread hop (longer: on a thread).
INLINE_RENDER_CHARS = 2048


async def achat_prompt(tokenizer: object, messages: Sequence[Message]) -> str:
    """``chat_prompt`` for the event loop: a long chat is rendered on a thread, never on the loop."""
    if sum(len(m.content) for m in messages) <= INLINE_RENDER_CHARS:
        return chat_prompt(tokenizer, messages)
    return await asyncio.to_thread(chat_prompt, tokenizer, messages)


def plain_prompt(messages: Sequence[Message]) -> str:
    """The documented fallback template (see the module docstring)."""
    lines = [f"{PLAIN_LABELS[m.role]}: {m.content}" for m in messages]
    return "\n".join([*lines, PLAIN_CUE])
