"""One line of a batch input file: its shape checked, and its body made into a gateway call as the API would.

A line is ``{"custom_id", "method": "POST", "url", "body"}`` (OpenAI's batch input). Its
body goes through the same validation and the same translation to a
:class:`~inference.completion.CompletionCall` as a request to ``url`` would
(``inference.openai_api``), and its answer is the body that request would get, so a
batch line and the same request sent alone are answered alike.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

from inference import prompts
from inference.engines import INLINE_TOKENIZE_CHARS, ModelEntry, aget_engines
from inference.errors import InvalidRequest
from inference.gateway import CompletionCall, GatewayStream
from inference.openai_api import (
    ChatCompletionInputSerializer,
    CompletionInputSerializer,
    _Chunks,
    _completion_call,
    _default_max_tokens,
    _refuse_unsupported,
    _validated,
)

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
ENDPOINTS = (CHAT, COMPLETIONS)
MAX_CUSTOM_ID_CHARS = 512


def shape_error(line: object, endpoint: str) -> dict | None:
    """Why ``line`` (parsed JSON) is not a batch request for ``endpoint``, as OpenAI's error object; None if it is."""
    if not isinstance(line, dict):
        return {"code": "invalid_request", "message": "the line is not a JSON object"}
    custom_id = line.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id or len(custom_id) > MAX_CUSTOM_ID_CHARS:
        return {
            "code": "invalid_custom_id",
            "message": f"custom_id must be a non-empty string of at most {MAX_CUSTOM_ID_CHARS} characters",
        }
    if line.get("method") != "POST":
        return {"code": "invalid_method", "message": f"method must be 'POST', got {line.get('method')!r}"}
    url = line.get("url")
    if url not in ENDPOINTS:
        return {"code": "invalid_url", "message": f"url must be one of {', '.join(ENDPOINTS)}, got {url!r}"}
    if url != endpoint:
        return {"code": "mismatched_url", "message": f"url {url!r} differs from the batch's endpoint {endpoint!r}"}
    if not isinstance(line.get("body"), dict):
        return {"code": "invalid_body", "message": "body must be a JSON object"}
    return None


async def line_call(
    body: dict[str, Any], url: str, *, request_id: str, tags: dict[str, str]
) -> tuple[CompletionCall, ModelEntry]:
    """The gateway call for a line's ``body`` sent to ``url``, validated as the API validates it.

    Raises :class:`~inference.errors.GatewayError` (an unknown model, bad parameters...): the line fails alone.
    """
    body = dict(body)
    _refuse_unsupported(body)
    if body.get("stream") not in (None, False):
        raise InvalidRequest("a batch line cannot stream: its answer goes to the output file", param="stream")
    if url == CHAT:
        data = _validated(ChatCompletionInputSerializer, body)
        messages = prompts.messages_parse(data["messages"])
        entry = (await aget_engines()).get(data["model"])
        if sum(len(m.content) for m in messages) <= INLINE_TOKENIZE_CHARS:
            prompt = prompts.chat_prompt(entry.tokenizer, messages)
        else:
            prompt = await asyncio.to_thread(prompts.chat_prompt, entry.tokenizer, messages)
        max_tokens = data["max_completion_tokens"] or data["max_tokens"]
        data["messages"] = tuple({"role": m.role, "content": m.content} for m in messages)
        data["logprobs"] = (data["top_logprobs"] or 0) if data["logprobs"] else None
    else:
        data = _validated(CompletionInputSerializer, body)
        entry = (await aget_engines()).get(data["model"])
        prompt, max_tokens = data["prompt"], data["max_tokens"]
    if max_tokens is None:
        max_tokens = await asyncio.to_thread(_default_max_tokens, entry, prompt)
    call = _completion_call(data, prompt, max_tokens, request_id, False)
    # a line waits its turn behind interactive traffic (inference.queueing) and takes its answer whole;
    # the ledger row names the batch (the batch's own tag wins over a body's metadata of the same name)
    call_tags = {**call.tags, **tags}
    return dataclasses.replace(call, latency_class="batch", stream=False, tags=call_tags), entry


def response_body(stream: GatewayStream, entry: ModelEntry, url: str, text: str, deltas: list) -> dict:
    """The body the API would have answered ``url`` with (``chat.completion`` or ``text_completion``)."""
    assert stream.usage is not None
    chunks = _Chunks(stream, chat=url == CHAT, include_usage=False, tokenizer=entry.tokenizer)
    return chunks.whole(text, stream.usage, deltas)
