"""The OpenAI-compatible HTTP API (``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``).

Thin adapters over :mod:`inference.gateway`: authenticate the bearer key, validate the
body, turn it into a :class:`~inference.gateway.CompletionCall`, start it, and write the
result in OpenAI's shapes, as one JSON object or as server-sent events. The gateway does
everything else (admission, routing, reservation, settlement), so the ledger charges
exactly what these views hand to the client.

The views are plain async Django views, not DRF ``APIView``s: DRF views are sync, and
under ASGI a sync view can only stream an async iterator by hopping to a thread for every
chunk. DRF serializers still validate the bodies (the ``*InputSerializer`` classes), with
strict fields, since OpenAI does not coerce ``"5"`` into 5 either. Unknown fields are
ignored, as OpenAI's own API does; but a field of OpenAI's API that asks for behaviour
Tandem does not provide (tools, penalties, JSON mode...) is refused with a 400 naming it,
never ignored in silence, unless it is given at its default value
(``UNSUPPORTED_FIELDS``).

Every response, error or not, streaming or not, carries ``x-request-id``: the ledger's
request id (a client's own ``X-Request-Id`` when it is well-formed). Errors are mapped
from :class:`~inference.errors.GatewayError` in one place, :func:`error_response`.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import re
import weakref
from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import aclosing
from typing import Any

from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.http import HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.views.decorators.csrf import csrf_exempt
from rest_framework import serializers
from rest_framework.settings import api_settings

from inference import fast_bodies, gateway, metrics, prompts
from inference.arrivals import counted_arrival
from inference.completion import NamedLogprob
from inference.engines import ModelEntry, aget_engines
from inference.errors import AuthenticationFailed, GatewayError, InvalidRequest, PermissionDenied, unexpected
from inference.fast_bodies import (
    DEFAULT_TEMPERATURE,
    MAX_LEGACY_LOGPROBS,
    MAX_STOP,
    MODEL_MAX_CHARS,
    TIER_MAX_CHARS,
    USER_MAX_CHARS,
)
from inference.gateway import CompletionCall, GatewayStream, Principal, TokenDelta, UsageSummary
from inference.limits import limiter
from inference.relay import KEEPALIVE, relay
from inference.wire import parse_json
from speculative.types import MAX_TOP_LOGPROBS

log = logging.getLogger(__name__)

MODELS_SCOPE = "models:read"
# max_tokens when a request names none: OpenAI's "as much as fits", capped so that leaving
# it out does not reserve (and hold against the budget) the cost of a whole context
DEFAULT_MAX_TOKENS = 256
SEED_RANGE = (-(2**63), 2**63 - 1)  # OpenAI's seed is an int64; torch generators take that range
REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9_.:-]{8,64}$")
SSE_DONE = b"data: [DONE]\n\n"
SSE_KEEPALIVE = b": keep-alive\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
SSE_CONTENT_TYPE = "text/event-stream; charset=utf-8"
JSON_CONTENT_TYPE = "application/json"  # JsonResponse's
QUEUED_EVERY_S = 1.0  # a waiting stream's comment line (its place in the queue, or a keep-alive) at most this often


class MethodNotAllowed(InvalidRequest):
    status = 405
    code = "method_not_allowed"


# request bodies ---------------------------------------------------------------------------
class _Strict:
    """Refuse values of the wrong JSON type instead of coercing them; ``null`` means the default.

    DRF turns ``"5"`` into 5 and ``"true"`` into True; OpenAI refuses both, and a coerced
    value would hide a client's bug. ``bool`` is an ``int`` to Python, so it is refused
    wherever it is not listed.
    """

    accepted: tuple[type, ...] = ()

    def validate_empty_values(self, data):
        if data is None and self.default is not serializers.empty:  # type: ignore[attr-defined]
            return True, self.get_default()  # type: ignore[attr-defined]
        return super().validate_empty_values(data)  # type: ignore[misc]

    def to_internal_value(self, data):
        if not isinstance(data, self.accepted) or (isinstance(data, bool) and bool not in self.accepted):
            self.fail("invalid")  # type: ignore[attr-defined]
        return super().to_internal_value(data)  # type: ignore[misc]


class StrictCharField(_Strict, serializers.CharField):
    accepted = (str,)


class StrictIntegerField(_Strict, serializers.IntegerField):
    accepted = (int,)


class StrictFloatField(_Strict, serializers.FloatField):
    accepted = (int, float)


class StrictBooleanField(_Strict, serializers.BooleanField):
    accepted = (bool,)


class StopField(serializers.Field):
    """``stop``: a string or a list of up to four non-empty strings, as a tuple."""

    default_error_messages = {"invalid": f"Must be a non-empty string or a list of at most {MAX_STOP} of them."}

    def to_internal_value(self, data):
        stops = fast_bodies.stop_sequences(data)
        if stops is None:
            self.fail("invalid")
        return stops


class PromptField(serializers.Field):
    """``prompt`` of /v1/completions: a string, or a list holding exactly one string (no token arrays, no batches)."""

    default_error_messages = {"invalid": "Must be a string or a list with exactly one string (one prompt per request)."}

    def to_internal_value(self, data):
        prompt = fast_bodies.single_prompt(data)
        if prompt is None:
            self.fail("invalid")
        return prompt


class StreamOptionsInputSerializer(serializers.Serializer):
    include_usage = StrictBooleanField(required=False, default=False)


class _GenerationInputSerializer(serializers.Serializer):
    """What both completion endpoints accept; their own serializers add the prompt's shape."""

    model = StrictCharField(max_length=MODEL_MAX_CHARS)
    max_tokens = StrictIntegerField(required=False, default=None, allow_null=True, min_value=1)
    temperature = StrictFloatField(required=False, default=DEFAULT_TEMPERATURE, min_value=0.0, max_value=2.0)
    top_p = StrictFloatField(required=False, default=1.0, min_value=0.0, max_value=1.0)
    top_k = StrictIntegerField(required=False, default=0, min_value=0)  # Tandem's extension; 0 = off
    # Tandem's extension: ask for a tier (edge, speculative, cloud); the tenant's routing policy allows or refuses it
    tier = StrictCharField(required=False, default=None, allow_null=True, max_length=TIER_MAX_CHARS)
    seed = StrictIntegerField(
        required=False, default=None, allow_null=True, min_value=SEED_RANGE[0], max_value=SEED_RANGE[1]
    )
    stop = StopField(required=False, default=(), allow_null=True)
    n = StrictIntegerField(required=False, default=1)
    stream = StrictBooleanField(required=False, default=False)
    stream_options = StreamOptionsInputSerializer(required=False, default=None, allow_null=True)
    user = StrictCharField(required=False, default="", allow_blank=True, max_length=USER_MAX_CHARS)
    metadata = serializers.DictField(
        child=StrictCharField(allow_blank=True), required=False, default=dict, allow_null=True
    )

    def validate_n(self, value: int) -> int:
        if value != 1:
            raise serializers.ValidationError(f"Only n=1 is supported (one choice per request), got {value}.")
        return value

    def validate_stop(self, value: tuple[str, ...] | None) -> tuple[str, ...]:
        return value or ()


class ChatCompletionInputSerializer(_GenerationInputSerializer):
    # The shape of each message is checked by inference.prompts, which names the exact offender.
    messages = serializers.ListField(allow_empty=False)
    max_completion_tokens = StrictIntegerField(required=False, default=None, allow_null=True, min_value=1)
    logprobs = StrictBooleanField(required=False, default=False, allow_null=True)
    top_logprobs = StrictIntegerField(
        required=False, default=None, allow_null=True, min_value=0, max_value=MAX_TOP_LOGPROBS
    )

    def validate(self, attrs):
        if attrs.get("top_logprobs") is not None and not attrs.get("logprobs"):
            raise serializers.ValidationError({"top_logprobs": "top_logprobs needs logprobs set to true."})
        return attrs


class CompletionInputSerializer(_GenerationInputSerializer):
    prompt = PromptField()
    # the legacy endpoint's logprobs: how many alternatives per token (0: only the chosen token's)
    logprobs = StrictIntegerField(
        required=False, default=None, allow_null=True, min_value=0, max_value=MAX_LEGACY_LOGPROBS
    )


# OpenAI's fields Tandem does not implement, each with the values that ask for nothing
# (its default): a client sending those is served, one asking for more is told which field.
UNSUPPORTED_FIELDS: dict[str, tuple[Any, ...]] = {
    "tools": (None, []),
    "tool_choice": (None, "none", "auto"),
    "functions": (None, []),
    "function_call": (None, "none", "auto"),
    "parallel_tool_calls": (None, True),
    "response_format": (None, {"type": "text"}),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}),
    "audio": (None,),
    "modalities": (None, ["text"]),
    "prediction": (None,),
    "web_search_options": (None,),
    "reasoning_effort": (None,),
    "best_of": (None, 1),
    "echo": (None, False),
    "suffix": (None, ""),
}


def _refuse_unsupported(body: dict) -> None:
    for name, defaults in UNSUPPORTED_FIELDS.items():
        if name in body and not any(body[name] == d and type(body[name]) is type(d) for d in defaults):
            raise InvalidRequest(
                f"Tandem does not support {name!r} (only its default value, "
                f"{' or '.join(json.dumps(d) for d in defaults)}, is accepted)",
                param=name,
                code="unsupported_parameter",
            )


def _json_body(request: HttpRequest) -> dict:
    try:
        body = parse_json(request.body)
    except RequestDataTooBig:
        raise InvalidRequest(
            f"the request body is larger than {settings.DATA_UPLOAD_MAX_MEMORY_SIZE} bytes", code="request_too_large"
        ) from None
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object", code="invalid_json")
    _refuse_unsupported(body)
    return body


_validators: dict[type[serializers.Serializer], serializers.Serializer] = {}


def _validated(serializer_class: type[serializers.Serializer], body: dict) -> dict:
    """``body`` through ``serializer_class``'s validation, or the first error as an InvalidRequest.

    One instance of each serializer serves every request: DRF deep-copies a serializer's
    declared fields for each new instance, which was a tenth of a streamed request's
    overhead here (about 0.3 ms). ``run_validation`` only reads the instance (the fields,
    their validators); nothing of a request is kept on it, and the views that call this
    run on the event loop, one at a time between awaits.
    """
    serializer = _validators.get(serializer_class)
    if serializer is None:
        serializer = _validators[serializer_class] = serializer_class()
    try:
        return dict(serializer.run_validation(body))
    except serializers.ValidationError as exc:
        param, message = _first_error(exc.detail)
        raise InvalidRequest(f"Invalid '{param}': {message}" if param else message, param=param) from None


def _first_error(errors: Any, path: str = "") -> tuple[str | None, str]:
    """The first of DRF's nested errors as (``messages[0].role``-style param, message)."""
    if isinstance(errors, dict):
        key, value = next(iter(errors.items()))
        if key == api_settings.NON_FIELD_ERRORS_KEY:
            return _first_error(value, path)
        return _first_error(value, f"{path}[{key}]" if isinstance(key, int) else f"{path}.{key}" if path else key)
    if isinstance(errors, list):
        return _first_error(next((e for e in errors if e), ""), path)
    return path or None, str(errors)


# authentication and errors ------------------------------------------------------------------
async def _principal(request: HttpRequest) -> Principal:
    scheme, _, raw_key = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not raw_key.strip():
        raise AuthenticationFailed("no API key: send it as 'Authorization: Bearer <key>'", code="missing_api_key")
    principal = await gateway.authenticate_api_key(raw_key.strip())
    request.tandem_principal = principal  # type: ignore[attr-defined]  # its rate limits go in the headers
    return principal


def error_response(err: GatewayError) -> JsonResponse:
    """The one mapping from the platform's errors to OpenAI's error body and status."""
    metrics.count_error(err)
    response = JsonResponse({"error": err.as_dict()}, status=err.status)
    if err.status == 401:
        response["WWW-Authenticate"] = "Bearer"
    if err.retry_after is not None:
        response["Retry-After"] = str(err.retry_after)
    return response


def _request_id(request: HttpRequest) -> str:
    """The client's ``X-Request-Id`` when well-formed (so both sides' logs share it), else a new one.

    Ids starting with ``req_`` are the server's (``gateway.new_request_id``): a client's is
    replaced, so it can never collide with a minted id that skipped the reservation row.
    """
    given = request.headers.get("X-Request-Id", "")
    if _client_request_id(given):
        return given
    return gateway.new_request_id()


def _client_request_id(given: str) -> bool:
    return bool(REQUEST_ID_RE.fullmatch(given)) and not given.startswith(gateway.MINTED_ID_PREFIX)


View = Callable[..., Awaitable[HttpResponse]]


def openai_endpoint(*methods: str) -> Callable[[View], View]:
    """Method check, request id, and the error mapping around a view ``(request, request_id, ...)``.

    Bearer keys, not cookies, authenticate here, so there is no CSRF to defend against.
    """

    def decorate(view: View) -> View:
        @csrf_exempt
        @functools.wraps(view)
        async def endpoint(request: HttpRequest, *args, **kwargs) -> HttpResponse:
            request_id = _request_id(request)
            try:
                if request.method not in methods:
                    raise MethodNotAllowed(f"{request.method} is not allowed here; use {' or '.join(methods)}")
                response = await view(request, request_id, *args, **kwargs)
            except GatewayError as err:
                response = error_response(err)
                if isinstance(err, MethodNotAllowed):
                    response["Allow"] = ", ".join(methods)
            except Exception as exc:  # noqa: BLE001 - the adapter's edge: logged with its traceback, answered in OpenAI's shape
                log.exception("request %s failed", request_id)
                response = error_response(unexpected(exc, request_id))
            response["x-request-id"] = request_id
            principal = getattr(request, "tandem_principal", None)
            if principal is not None:  # OpenAI's x-ratelimit-* headers: where the key's tenant stands now
                for name, value in (await limiter.state(principal)).headers().items():
                    response[name] = value
            return response

        return endpoint

    return decorate


@openai_endpoint("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS")
async def not_found(request: HttpRequest, request_id: str, rest: str = "") -> HttpResponse:
    """A path under /v1/ that no endpoint serves: as every endpoint, a key first (401), then OpenAI's 404."""
    await _principal(request)
    raise NotFound(f"no endpoint at {request.path!r}; the API serves /v1/chat/completions, /v1/completions, /v1/models")


class NotFound(InvalidRequest):
    status = 404
    code = "unknown_url"


# completions --------------------------------------------------------------------------------
@openai_endpoint("POST")
@counted_arrival
async def chat_completions(request: HttpRequest, request_id: str) -> HttpResponse:
    principal = await _principal(request)
    body = _json_body(request)
    data = fast_bodies.chat(body) or _validated(ChatCompletionInputSerializer, body)
    messages = prompts.messages_parse(data["messages"])
    entry = (await aget_engines()).get(data["model"])
    prompt = await prompts.achat_prompt(entry.tokenizer, messages)
    max_tokens = data["max_completion_tokens"] or data["max_tokens"]
    data["messages"] = tuple({"role": m.role, "content": m.content} for m in messages)
    data["logprobs"] = (data["top_logprobs"] or 0) if data["logprobs"] else None
    return await _complete(principal, data, entry, prompt, max_tokens, request_id, chat=True)


@openai_endpoint("POST")
@counted_arrival
async def completions(request: HttpRequest, request_id: str) -> HttpResponse:
    principal = await _principal(request)
    body = _json_body(request)
    data = fast_bodies.completion(body) or _validated(CompletionInputSerializer, body)
    entry = (await aget_engines()).get(data["model"])
    return await _complete(principal, data, entry, data["prompt"], data["max_tokens"], request_id, chat=False)


async def _complete(
    principal: Principal,
    data: dict,
    entry: ModelEntry,
    prompt: str,
    max_tokens: int | None,
    request_id: str,
    *,
    chat: bool,
) -> HttpResponse:
    if max_tokens is None:
        max_tokens = await asyncio.to_thread(_default_max_tokens, entry, prompt)
    fresh = not _client_request_id(request_id)  # this view minted it (a client's own id is kept as sent)
    call = _completion_call(data, prompt, max_tokens, request_id, fresh)
    include_usage = bool(data["stream"] and (data["stream_options"] or {}).get("include_usage"))

    def chunks_for(stream: GatewayStream) -> _Chunks:
        return _Chunks(stream, chat=chat, include_usage=include_usage, tokenizer=entry.tokenizer)

    if data["stream"]:
        starting = await _start_or_queue(principal, call)
        if isinstance(starting, _Queued):  # it waits for an engine slot: answer now, keep-alives till it starts
            return StreamingHttpResponse(
                _queued_sse_events(starting, chunks_for), content_type=SSE_CONTENT_TYPE, headers=SSE_HEADERS
            )
        response = StreamingHttpResponse(
            _sse_events(starting, chunks_for(starting)), content_type=SSE_CONTENT_TYPE, headers=SSE_HEADERS
        )
        _close_if_never_streamed(response, starting)
        return response
    stream = await gateway.start(principal, call)
    chunks = chunks_for(stream)
    try:
        text, deltas = await gateway.collect(stream, ledger_written=False)  # the row is written behind the reply
    finally:
        if stream.usage is None:  # this view was cancelled (the client left): settle what was sent, shielded
            await asyncio.shield(stream.aclose())
        else:  # collect settled it: this only stops the stream, on this turn of the loop (a shield is a task's turn)
            await stream.aclose()
    assert stream.usage is not None
    # JsonResponse's encoder class and content setter, without them: the same bytes, 20 us less a request
    body = json.dumps(chunks.whole(text, stream.usage, deltas), ensure_ascii=False).encode()
    return HttpResponse(body, content_type=JSON_CONTENT_TYPE)


_closing: set[asyncio.Future] = set()  # close tasks started by finalizers, kept alive until they finish


def _close_if_never_streamed(response: StreamingHttpResponse, stream: GatewayStream) -> None:
    """Close ``stream`` when ``response`` is dropped without its body ever being read.

    Money: the SSE generator's ``finally`` closes the stream once Django starts reading the
    body. A client that goes away after this view returns but before then (Django is still
    running the sync middlewares' ``process_response``, each a thread hop) has the request
    task cancelled with the generator never started, and an unstarted generator runs no
    ``finally``: the reservation would stay held and the engine would run to max_tokens.
    Nothing was sent, so the gateway releases the reservation and charges nothing.
    """
    loop = asyncio.get_running_loop()

    def close_on_loop() -> None:
        task = asyncio.ensure_future(stream.aclose())
        _closing.add(task)
        task.add_done_callback(_closing.discard)

    def on_dropped() -> None:  # may run on any thread (the cycle collector), so hand over to the loop
        if stream.usage is None:
            try:
                loop.call_soon_threadsafe(close_on_loop)
            except RuntimeError:  # the loop is closed: the process is going away
                log.warning("request %s: stream dropped after its event loop closed", stream.request_id)

    weakref.finalize(response, on_dropped).atexit = False


def _default_max_tokens(entry: ModelEntry, prompt: str) -> int:
    """DEFAULT_MAX_TOKENS, or what is left of the context after the prompt when that is less."""
    if len(prompt) > settings.TANDEM_MAX_PROMPT_CHARS:
        return DEFAULT_MAX_TOKENS  # the gateway refuses this prompt: no point tokenising it
    prompt_tokens = len(entry.tokenizer.encode(prompt, add_special_tokens=False))  # type: ignore[attr-defined]
    return max(1, min(DEFAULT_MAX_TOKENS, entry.context_length - prompt_tokens))


def _completion_call(data: dict, prompt: str, max_tokens: int, request_id: str, fresh: bool) -> CompletionCall:
    temperature, top_p = data["temperature"], data["top_p"]
    if top_p == 0.0:
        # A nucleus of probability mass 0 keeps only the most probable token: greedy decoding, exactly.
        temperature, top_p = 0.0, 1.0
    tags = dict(data["metadata"] or {})
    if data["user"]:
        tags["user"] = data["user"]
    return CompletionCall(
        model=data["model"],
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=data["top_k"],
        seed=data["seed"],
        stop=data["stop"],
        tags=tags,
        request_id=request_id,
        request_id_fresh=fresh,
        messages=data.get("messages", ()),
        requested_tier=data["tier"],
        logprobs=data["logprobs"],
        stream=data["stream"],
    )


# response shapes ----------------------------------------------------------------------------
def _usage(usage: UsageSummary) -> dict:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
    }


class _Chunks:
    """OpenAI's objects for one completion: ``chat.completion(.chunk)`` or ``text_completion``."""

    def __init__(self, stream: GatewayStream, *, chat: bool, include_usage: bool, tokenizer: Any = None):
        self.chat = chat
        self.include_usage = include_usage
        self._logprobs = stream.call.logprobs is not None
        self._tokenizer = tokenizer  # names the alternatives of top_logprobs
        self._id = f"{'chatcmpl' if chat else 'cmpl'}-{stream.request_id}"
        self._created = stream.created
        self._model = stream.model

    def whole(self, text: str, usage: UsageSummary, deltas: list[TokenDelta] | None = None) -> dict:
        """The non-streaming response."""
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text, "refusal": None}}
        else:
            choice = {"index": 0, "text": text}
        choice |= {"logprobs": self._logprobs_of(deltas or []), "finish_reason": usage.finish_reason}
        head = self._head("chat.completion" if self.chat else "text_completion")
        return head | {"choices": [choice], "usage": _usage(usage), "tandem": usage.as_dict()}

    def opening(self) -> dict | None:
        """Chat's first chunk names the role; text completions have none."""
        return self._chunk({"role": "assistant", "content": ""}) if self.chat else None

    def delta(self, delta: TokenDelta) -> dict:
        chunk = self._chunk({"content": delta.text} if self.chat else delta.text, logprobs=self._logprobs_of([delta]))
        tandem: dict = {"provenance": delta.provenance.value}
        if delta.route is not None:  # another tier took over mid-stream: from this token on, it writes
            tandem["route"] = delta.route.as_dict()
        return chunk | {"tandem": tandem}

    def finish(self, usage: UsageSummary) -> dict:
        """The last choice chunk: the finish reason, and the Tandem summary (route, drafts, cost)."""
        return self._chunk({} if self.chat else "", finish_reason=usage.finish_reason) | {"tandem": usage.as_dict()}

    def usage(self, usage: UsageSummary) -> dict:
        return self._head(self._chunk_object) | {"choices": [], "usage": _usage(usage)}

    @property
    def _chunk_object(self) -> str:
        return "chat.completion.chunk" if self.chat else "text_completion"

    def _head(self, obj: str) -> dict:
        return {
            "id": self._id,
            "object": obj,
            "created": self._created,
            "model": self._model,
            "system_fingerprint": None,
        }

    def _logprobs_of(self, deltas: list[TokenDelta]) -> dict | None:
        """OpenAI's logprobs object for these tokens (chat: ``content``; completions: the legacy lists)."""
        if not self._logprobs:
            return None
        named = [n for d in deltas for n in self._named(d)]
        if self.chat:
            return {"content": [_entry(n) for n in named], "refusal": None}
        return {
            "tokens": [n.token for n in named],
            "token_logprobs": [n.logprob for n in named],
            "top_logprobs": [dict(n.top) for n in named],
            "text_offset": None,
        }

    def _named(self, delta: TokenDelta) -> tuple[NamedLogprob, ...]:
        """The delta's tokens with their alternatives named: a cloud chunk's as its upstream named them."""
        if delta.named_logprobs or delta.logprob is None:
            return delta.named_logprobs
        return (NamedLogprob(delta.text, delta.logprob, tuple((self._token(i), lp) for i, lp in delta.top_logprobs)),)

    def _token(self, token_id: int) -> str:
        return self._tokenizer.decode([token_id]) if self._tokenizer is not None else str(token_id)

    def _chunk(self, delta: dict | str, finish_reason: str | None = None, logprobs: dict | None = None) -> dict:
        body = {"delta": delta} if self.chat else {"text": delta}
        chunk = self._head(self._chunk_object) | {
            "choices": [{"index": 0, **body, "logprobs": logprobs, "finish_reason": finish_reason}]
        }
        if self.include_usage:
            chunk["usage"] = None  # as OpenAI does: every chunk before the usage chunk says "not yet"
        return chunk


def _entry(named: NamedLogprob) -> dict:
    """One token of the chat API's ``logprobs.content``."""
    return {
        "token": named.token,
        "logprob": named.logprob,
        "bytes": list(named.token.encode()),
        "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in named.top],
    }


def _sse(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


async def _start_or_queue(principal: Principal, call: CompletionCall) -> GatewayStream | _Queued:
    """The started stream; or, where it has to wait for an engine slot, its start in progress.

    A streamed request that waits is answered at once (200, ``text/event-stream``) and kept
    alive while it waits, so that clients and proxies with idle timeouts keep it; one that
    the queue refuses up front (it could not start before its deadline) still gets its
    429/503 with ``Retry-After``.
    """
    queued = _Queued()
    queued.starting = asyncio.ensure_future(gateway.start(principal, call, queued.moved))
    told = asyncio.ensure_future(queued.told.wait())
    try:
        await asyncio.wait({queued.starting, told}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # the client went away: stop starting it (nothing was charged)
        queued.starting.cancel()
        raise
    finally:
        told.cancel()
    return queued.starting.result() if queued.starting.done() else queued


class _Queued:
    """A streamed request waiting for an engine slot, and its latest place in the queue."""

    def __init__(self) -> None:
        self.starting: asyncio.Future[GatewayStream]
        self.told = asyncio.Event()
        self.position = 0

    def moved(self, position: int) -> None:
        self.position = position
        self.told.set()


async def _queued_sse_events(
    queued: _Queued, chunks_for: Callable[[GatewayStream], _Chunks]
) -> AsyncGenerator[bytes, None]:
    """A queued stream's SSE body: a comment with its place in the queue while it waits, then the stream.

    Refused after the answer began (its deadline passed), it ends with one ``error`` event
    carrying ``retry_after``; a client that leaves while it waits leaves the queue.
    """
    starting = queued.starting
    relayed = False
    try:
        told = -1
        while not starting.done():
            if queued.position != told:
                told = queued.position
                yield b": queued, position %d\n\n" % told
            done, _ = await asyncio.wait({starting}, timeout=QUEUED_EVERY_S)
            if not done and queued.position == told:
                yield SSE_KEEPALIVE
        try:
            stream = starting.result()
        except GatewayError as err:
            metrics.count_error(err)
            yield _sse({"error": err.as_dict(), "retry_after": err.retry_after})
            return
        relayed = True
        async with aclosing(_sse_events(stream, chunks_for(stream))) as events:  # it closes the stream
            async for event in events:
                yield event
    finally:
        if not starting.done():
            starting.cancel()
        elif not relayed and not starting.cancelled() and starting.exception() is None:
            await asyncio.shield(starting.result().aclose())  # started as the client left: settle it (nothing sent)


async def _sse_events(stream: GatewayStream, chunks: _Chunks) -> AsyncGenerator[bytes, None]:
    """The SSE body: opening chunk, a chunk per non-empty delta, finish, usage, ``[DONE]``.

    The chunks of tokens that are ready together (a speculative round's, or an engine ahead
    of the client) go out in one write: one chunk per token as OpenAI sends them, one
    ``http.response.body`` message for all of them. An error in the middle becomes one
    ``error`` event and ends the stream: the status and headers are long gone, and the
    gateway has already settled what was delivered. The relay (``inference.relay``) closes
    the stream however this generator ends, so a client that goes away is charged for
    exactly what it was sent.
    """
    try:
        opening = chunks.opening()
        if opening is not None:
            yield _sse(opening)
        sent_any = opening is not None
        async with aclosing(relay(stream, settings.TANDEM_KEEPALIVE_S)) as batches:
            async for batch in batches:
                if batch is KEEPALIVE:
                    yield SSE_KEEPALIVE
                    continue
                events = []
                for delta in batch:
                    # empty texts (held back for a stop string) carry nothing, unless they announce a new route
                    if delta.text or not sent_any or delta.route is not None:
                        events.append(_sse(chunks.delta(delta)))
                        sent_any = True
                if events:
                    yield b"".join(events)
        assert stream.usage is not None
        tail = [_sse(chunks.finish(stream.usage))]
        if chunks.include_usage:
            tail.append(_sse(chunks.usage(stream.usage)))
        yield b"".join([*tail, SSE_DONE])
    except GatewayError as err:
        metrics.count_error(err)
        yield _sse({"error": err.as_dict()})


# models -------------------------------------------------------------------------------------
def _model_object(entry: ModelEntry) -> dict:
    return {
        "id": entry.name,
        "object": "model",
        "created": entry.created,
        "owned_by": "tandem",
        "tandem": {"context_length": entry.context_length, "description": entry.description},
    }


async def _models_principal(request: HttpRequest) -> Principal:
    principal = await _principal(request)
    if not principal.may(MODELS_SCOPE):
        raise PermissionDenied(f"this API key lacks the {MODELS_SCOPE!r} scope")
    return principal


@openai_endpoint("GET")
async def models_list(request: HttpRequest, request_id: str) -> HttpResponse:
    await _models_principal(request)
    engines = await aget_engines()
    return JsonResponse({"object": "list", "data": [_model_object(e) for e in engines.models.values()]})


@openai_endpoint("GET")
async def model_detail(request: HttpRequest, request_id: str, model_id: str) -> HttpResponse:
    await _models_principal(request)
    engines = await aget_engines()
    return JsonResponse(_model_object(engines.get(model_id)))
