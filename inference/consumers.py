"""The websocket stream (``ws/v1/completions``): a thin adapter from JSON frames to ``inference.gateway``.

Authentication happens once, in ``connect``: the console's session (``scope["user"]``, from
``AuthMiddlewareStack``) or an API key in the handshake's ``Authorization: Bearer <key>``
header (non-browser clients). An unauthenticated connection is accepted only to be told
why (an ``error`` frame), then closed with code 4401.

Protocol: JSON text frames, one object each.

client -> server::

    {"type": "start", "id": "<client id>", "model": "tandem-demo", "prompt": "..." | "messages": [...],
     "max_tokens": 64, "temperature": 0, "top_p": 1, "top_k": 0, "seed": null,
     "stop": [], "tags": {}, "tier": null, "logprobs": null, "tenant": <tenant id; console sessions only>}
    {"type": "cancel", "id": "<client id>"}
    {"type": "ping"}                                   -> {"type": "pong"}

server -> client::

    {"type": "started", "id", "request_id", "model", "route": {"tier", "reason", "degraded", "policy_version"}}
    {"type": "delta", "id", "index", "text", "tokens": [{"token_id", "text", "provenance"}, ...]}
                                                       with logprobs asked for, each token also has
                                                       "logprob" and "top_logprobs": [{"token_id", "logprob"}];
                                                       a cloud chunk (token_id -1) has its text's "logprob" and
                                                       "logprobs": [{"token", "logprob", "top_logprobs":
                                                       [{"token", "logprob"}]}], as its upstream named them
                                                       provenance: "drafted" | "verifier" | "edge" | "cloud"
    {"type": "route", "id", "index", "route": {...}}   another tier took over mid-stream (its tier failed):
                                                       from token ``index`` on, the text comes from ``route``
    {"type": "done", "id", "usage": {...}}            usage: UsageSummary.as_dict(); outcome
                                                       "completed" or "cancelled"
    {"type": "error", "id": <id or null>, "error": {"message", "type", "param", "code"},
     "usage": {...} | null}                            usage when the failure came mid-stream
    {"type": "ping"}                                   keep-alive while a stream waits for tokens

``model`` and one of ``prompt`` (text the model continues) and ``messages`` (a chat, as the
OpenAI chat API takes it: ``[{"role": "system" | "user" | "assistant", "content": "..."}]``,
rendered through the model's chat template) are required in ``start``; the other fields
take the defaults shown. ``tier`` asks for a tier (``edge``, ``speculative``, ``cloud``); the tenant's
routing policy allows it or refuses it (``invalid_request``, param ``tier``). On the cloud
tier a "token" of a delta frame is a chunk of the upstream's text, and the usage counts
what the upstream reported (or that text in its model's tokens). Up to ``MAX_STREAMS_PER_CONNECTION`` streams run at once on one connection, each
keyed by its client ``id`` (a live id cannot be reused). Every delta sent is charged and
nothing else is: ``done.usage.completion_tokens`` (or the error frame's) equals the tokens
in the delta frames the client received for that id. A malformed frame gets an ``error`` frame with code
``invalid_request`` (its ``param`` names the field), starts nothing and leaves the
connection open.

A delta frame carries one or more consecutive tokens: ``index`` is its first token's
position in the completion, ``text`` their text joined, ``tokens`` each token's id, text
and provenance. A frame holds the tokens that were ready when it was sent and never waits
for more: a speculative round hands over its accepted draft tokens and the verifier's
token at once, and a client slower than the engine gets fewer, larger frames (at most
``gateway.MAX_DELTAS_AT_ONCE`` tokens each) instead of a growing backlog.

Tenant scoping: a console user acts in the tenant named by ``tenant`` (their membership is
checked by ``gateway.principal_for_user``; their first tenant when it is absent); an API
key always acts in its own tenant, and a ``tenant`` naming another is refused (403).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from channels.generic.websocket import AsyncJsonWebsocketConsumer
from django.conf import settings

from inference import gateway, metrics, prompts
from inference.engines import aget_engines
from inference.errors import (
    AuthenticationFailed,
    GatewayError,
    InvalidRequest,
    PermissionDenied,
    RateLimited,
    unexpected,
)
from inference.relay import KEEPALIVE, relay
from inference.wire import parse_json

log = logging.getLogger(__name__)

MAX_STREAMS_PER_CONNECTION = 4
MAX_ID_CHARS = 128
CLOSE_UNAUTHENTICATED = 4401
# A frame may carry a prompt of TANDEM_MAX_PROMPT_CHARS characters written as JSON escapes
# (up to 6 characters each) plus the other fields; anything longer is refused before parsing.
FRAME_OVERHEAD_CHARS = 16_384

_START_FIELDS = frozenset(
    {
        "type",
        "id",
        "model",
        "prompt",
        "messages",
        "max_tokens",
        "temperature",
        "top_p",
        "top_k",
        "seed",
        "stop",
        "tags",
        "tier",
        "logprobs",
        "tenant",
    }
)


@dataclass
class _Live:
    """One stream on this connection, from its start frame until its last frame is sent."""

    id: str
    call: gateway.CompletionCall
    tenant_id: int | None
    task: asyncio.Task | None = None
    stream: gateway.GatewayStream | None = None
    stop: asyncio.Event = field(default_factory=asyncio.Event)  # cancel frame or disconnect
    client_gone: bool = False


class CompletionConsumer(AsyncJsonWebsocketConsumer):
    """Streams completions over one websocket; every stream goes through ``gateway.start``."""

    async def connect(self) -> None:
        self.live: dict[str, _Live] = {}
        self._sends: set[asyncio.Future] = set()  # queued frames on their way
        self.user = None
        self.raw_key: str | None = None
        await self.accept()
        try:
            await self._authenticate()
        except AuthenticationFailed as exc:
            await self._send_error(None, exc)
            await self.close(code=CLOSE_UNAUTHENTICATED)

    async def _authenticate(self) -> None:
        raw_key = _bearer_token(self.scope.get("headers", ()))
        if raw_key is not None:
            # An explicit key wins over any session cookie: a key that fails is a failure.
            await gateway.authenticate_api_key(raw_key)
            self.raw_key = raw_key
            return
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            raise AuthenticationFailed(
                "sign in to the console, or send an API key as 'Authorization: Bearer <key>'",
                code="not_authenticated",
            )
        self.user = user

    async def disconnect(self, code: int) -> None:
        """The client went away: stop every stream and settle what each delivered."""
        live = list(getattr(self, "live", {}).values())
        for item in live:
            item.client_gone = True
            item.stop.set()
        tasks = [item.task for item in live if item.task is not None]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    # frames in -------------------------------------------------------------------------------
    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None, **kwargs: Any) -> None:
        if text_data is None:
            await self._send_error(None, InvalidRequest("frames must be JSON text, not binary"))
            return
        limit = 6 * settings.TANDEM_MAX_PROMPT_CHARS + FRAME_OVERHEAD_CHARS
        if len(text_data) > limit:
            await self._send_error(None, InvalidRequest(f"the frame has {len(text_data)} characters; at most {limit}"))
            return
        try:
            content = parse_json(text_data, "the frame")
        except InvalidRequest as exc:
            await self._send_error(None, exc)
            return
        await self.receive_json(content)

    async def receive_json(self, content: Any, **kwargs: Any) -> None:
        if not isinstance(content, dict):
            await self._send_error(None, InvalidRequest("a frame must be a JSON object"))
            return
        handlers = {"start": self.on_start, "cancel": self.on_cancel, "ping": self.on_ping}
        handler = handlers.get(str(content.get("type")))
        if handler is None:
            error = InvalidRequest(
                f"unknown frame type {content.get('type')!r}; expected start, cancel or ping", param="type"
            )
            await self._send_error(_frame_id(content), error)
            return
        await handler(content)

    async def on_ping(self, content: dict) -> None:
        await self.send_json({"type": "pong"})

    async def on_start(self, content: dict) -> None:
        try:
            stream_id, call, tenant_id = _parse_start(content)
        except InvalidRequest as exc:
            await self._send_error(_frame_id(content), exc)
            return
        error: GatewayError
        if stream_id in self.live:
            error = InvalidRequest(f"a stream with id {stream_id!r} is still running on this connection", param="id")
            await self._send_error(stream_id, error)
            return
        if len(self.live) >= MAX_STREAMS_PER_CONNECTION:
            error = RateLimited(
                f"this connection already runs {MAX_STREAMS_PER_CONNECTION} streams; wait for one to end",
                code="too_many_streams",
            )
            await self._send_error(stream_id, error)
            return
        # Registered before the task runs, so the limit and the id check hold for the next frame.
        item = self.live[stream_id] = _Live(stream_id, call, tenant_id)
        item.task = asyncio.create_task(self._serve(item), name=f"ws-{call.request_id}")

    async def on_cancel(self, content: dict) -> None:
        stream_id = content.get("id")
        item = self.live.get(stream_id) if isinstance(stream_id, str) else None
        if item is None:
            error = InvalidRequest(f"no stream with id {stream_id!r} is running on this connection", param="id")
            await self._send_error(_frame_id(content), error)
            return
        item.stop.set()  # the stream's task closes it and sends the done frame

    # one stream ------------------------------------------------------------------------------
    async def _serve(self, item: _Live) -> None:
        try:
            try:
                principal = await self._principal(item.tenant_id)
                if item.call.messages:
                    item.call = await _rendered(item.call)
                item.stream = await gateway.start(principal, item.call, functools.partial(self._queued, item))
            except GatewayError as exc:  # refused before any output: nothing was charged
                await self._send_error(item.id, exc)
                return
            await self._relay(item, item.stream)
        except Exception as exc:
            log.exception("request %s: the websocket stream failed", item.call.request_id)
            usage = item.stream.usage if item.stream is not None else None
            await self._send_error(item.id, unexpected(exc, item.call.request_id), usage)
        finally:
            self.live.pop(item.id, None)
            if item.stream is not None and item.stream.usage is None:  # this task died (or was cancelled)
                await item.stream.aclose()

    def _queued(self, item: _Live, position: int) -> None:
        """The stream waits for an engine slot: say where it stands (a frame now and then until it starts)."""
        frame = {"type": "queued", "id": item.id, "request_id": item.call.request_id, "position": position}
        task = asyncio.ensure_future(self._send_for(item, frame))
        self._sends.add(task)
        task.add_done_callback(self._sends.discard)

    async def _relay(self, item: _Live, stream: gateway.GatewayStream) -> None:
        """Send the stream's frames until it ends, fails, or is stopped by a cancel frame or a disconnect."""
        await self._send_for(
            item,
            {
                "type": "started",
                "id": item.id,
                "request_id": stream.request_id,
                "model": stream.model,
                "route": stream.route.as_dict(),
            },
        )
        try:
            # The relay closes the stream however it ends: stopped, it settles what was sent.
            async with aclosing(relay(stream, settings.TANDEM_KEEPALIVE_S, item.stop)) as batches:
                async for batch in batches:
                    if batch is KEEPALIVE:
                        await self._send_for(item, {"type": "ping"})
                    else:
                        await self._send_deltas(item, batch)
        except GatewayError as exc:  # failed mid-stream: the gateway settled what was delivered
            await self._send_error(item.id, exc, stream.usage)
            return
        await self._send_done(item, stream)

    # frames out ------------------------------------------------------------------------------
    async def _send_for(self, item: _Live, frame: dict) -> None:
        """A frame of one stream; dropped once its client is gone (the stream is only being settled).

        A send can find the connection closed before this consumer has heard of the disconnect
        (a browser tab closed mid-stream): uvicorn raises ``ClientDisconnected`` (an ``OSError``),
        or a ``RuntimeError`` once it has seen the close itself. Either marks the client gone and
        stops the stream, as the disconnect would: it settles, and the stream's task ends quietly.
        """
        if item.client_gone:
            return
        try:
            await self.send_json(frame)
        except (OSError, RuntimeError) as exc:
            item.client_gone = True
            item.stop.set()
            log.info(
                "request %s: the client left mid-stream (%s)", item.call.request_id, str(exc) or type(exc).__name__
            )

    async def _send_deltas(self, item: _Live, deltas: list[gateway.TokenDelta]) -> None:
        """Delta frames for consecutive tokens; a ``route`` frame first where another tier took over."""
        start = 0
        for i, delta in enumerate(deltas):
            if delta.route is not None:
                if i > start:
                    await self._send_delta_frame(item, deltas[start:i])
                frame = {"type": "route", "id": item.id, "index": delta.index, "route": delta.route.as_dict()}
                await self._send_for(item, frame)
                start = i
        await self._send_delta_frame(item, deltas[start:])

    async def _send_delta_frame(self, item: _Live, deltas: list[gateway.TokenDelta]) -> None:
        """One delta frame for consecutive tokens: their joined text, and each token on its own."""
        tokens = [_token(d) for d in deltas]
        text = "".join(d.text for d in deltas)
        await self._send_for(
            item, {"type": "delta", "id": item.id, "index": deltas[0].index, "text": text, "tokens": tokens}
        )

    async def _send_done(self, item: _Live, stream: gateway.GatewayStream) -> None:
        assert stream.usage is not None
        await self._send_for(item, {"type": "done", "id": item.id, "usage": stream.usage.as_dict()})

    async def _send_error(
        self, stream_id: str | None, error: GatewayError, usage: gateway.UsageSummary | None = None
    ) -> None:
        metrics.count_error(error)
        frame: dict[str, Any] = {
            "type": "error",
            "id": stream_id,
            "error": error.as_dict(),
            "usage": usage and usage.as_dict(),
        }
        if error.retry_after is not None:
            frame["retry_after"] = error.retry_after  # seconds worth waiting before starting it again
        item = self.live.get(stream_id) if stream_id is not None else None
        if item is None:
            await self.send_json(frame)
        else:
            await self._send_for(item, frame)

    # tenant scoping ----------------------------------------------------------------------------
    async def _principal(self, tenant_id: int | None) -> gateway.Principal:
        """Who runs this stream, resolved per start so a revoked key or membership stops new streams."""
        if self.raw_key is not None:
            principal = await gateway.authenticate_api_key(self.raw_key)
            if tenant_id is not None and tenant_id != principal.tenant_id:
                raise PermissionDenied("an API key acts only in its own tenant", param="tenant")
            return principal
        return await gateway.principal_for_user(self.user, tenant_id)


def _token(delta: gateway.TokenDelta) -> dict:
    token: dict = {"token_id": delta.token_id, "text": delta.text, "provenance": delta.provenance.value}
    if delta.logprob is not None:
        token["logprob"] = delta.logprob
        if delta.named_logprobs:  # an upstream's tokens: no ids here, named as it sent them
            token["logprobs"] = [
                {
                    "token": n.token,
                    "logprob": n.logprob,
                    "top_logprobs": [{"token": t, "logprob": lp} for t, lp in n.top],
                }
                for n in delta.named_logprobs
            ]
        else:
            token["top_logprobs"] = [{"token_id": i, "logprob": lp} for i, lp in delta.top_logprobs]
    return token


def _bearer_token(headers) -> str | None:
    for name, value in headers:
        if name.lower() == b"authorization":
            scheme, _, token = value.decode("latin1").partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
            raise AuthenticationFailed("the Authorization header must be 'Bearer <API key>'")
    return None


def _frame_id(content: Any) -> str | None:
    """The frame's id, echoed in an error frame when it is one a client could have sent."""
    if isinstance(content, dict):
        value = content.get("id")
        if isinstance(value, str) and 0 < len(value) <= MAX_ID_CHARS:
            return value
    return None


# parsing a start frame -------------------------------------------------------------------------
async def _rendered(call: gateway.CompletionCall) -> gateway.CompletionCall:
    """A chat's call with its prompt: the messages through the model's chat template (as the chat API does)."""
    entry = (await aget_engines()).get(call.model)  # ModelNotFound: an error frame, nothing charged
    messages = [prompts.Message(m["role"], m["content"]) for m in call.messages]
    return dataclasses.replace(call, prompt=await prompts.achat_prompt(entry.tokenizer, messages))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _parse_start(content: dict) -> tuple[str, gateway.CompletionCall, int | None]:
    """The frame's shape and types; the gateway checks the values (ranges, lengths, the model)."""
    unknown = sorted(set(content) - _START_FIELDS)
    if unknown:
        raise InvalidRequest(f"unknown field {unknown[0]!r} in a start frame", param=unknown[0])
    stream_id = content.get("id")
    if not isinstance(stream_id, str) or not 0 < len(stream_id) <= MAX_ID_CHARS:
        raise InvalidRequest(f"id must be a string of 1 to {MAX_ID_CHARS} characters", param="id")
    if not isinstance(content.get("model"), str):
        raise InvalidRequest("model must be a string", param="model")
    kwargs: dict[str, Any] = {"model": content["model"]}
    if ("prompt" in content) == ("messages" in content):
        raise InvalidRequest("a start frame takes a prompt or messages (a chat), exactly one of them", param="prompt")
    if "messages" in content:
        # validated here (a bad chat starts nothing); rendered through the model's template when the stream starts
        messages = prompts.messages_parse(content["messages"])
        kwargs["messages"] = tuple({"role": m.role, "content": m.content} for m in messages)
        kwargs["prompt"] = ""
    elif isinstance(content["prompt"], str):
        kwargs["prompt"] = content["prompt"]
    else:
        raise InvalidRequest("prompt must be a string", param="prompt")
    for name, check, what in (
        ("max_tokens", _is_int, "an integer"),
        ("top_k", _is_int, "an integer"),
        ("temperature", _is_number, "a number"),
        ("top_p", _is_number, "a number"),
    ):
        if name in content:
            if not check(content[name]):
                raise InvalidRequest(f"{name} must be {what}", param=name)
            kwargs[name] = content[name]
    for name in ("temperature", "top_p"):
        if name in kwargs:
            kwargs[name] = float(kwargs[name])
    seed = content.get("seed")
    if seed is not None and not _is_int(seed):
        raise InvalidRequest("seed must be an integer or null", param="seed")
    kwargs["seed"] = seed
    stop = content.get("stop", [])
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise InvalidRequest("stop must be a string or a list of strings", param="stop")
    kwargs["stop"] = tuple(stop)
    tags = content.get("tags", {})
    if not isinstance(tags, dict):
        raise InvalidRequest("tags must be an object of string values", param="tags")
    kwargs["tags"] = tags
    tier = content.get("tier")
    if tier is not None and not isinstance(tier, str):
        raise InvalidRequest("tier must be a tier's name (edge, speculative, cloud) or null", param="tier")
    kwargs["requested_tier"] = tier
    logprobs = content.get("logprobs")
    if logprobs is not None and not _is_int(logprobs):
        raise InvalidRequest(
            "logprobs must be an integer (0: each token's; N: and the top N) or null", param="logprobs"
        )
    kwargs["logprobs"] = logprobs
    tenant_id = content.get("tenant")
    if tenant_id is not None and not _is_int(tenant_id):
        raise InvalidRequest("tenant must be a tenant id (an integer) or null", param="tenant")
    return stream_id, gateway.CompletionCall(**kwargs), tenant_id
