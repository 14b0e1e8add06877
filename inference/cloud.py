"""The cloud tier: a model's completions relayed from an OpenAI-compatible upstream, chunk by chunk.

``CloudEngine`` is the cloud engine of one public model. Its upstreams are the enabled
``CloudUpstream`` rows for that model, which ``UpstreamDirectory`` re-reads at most every
``TANDEM_UPSTREAMS_TTL_S`` seconds; each has a circuit breaker here. A completion tries
the upstreams a tenant may use in priority order until one answers (a failure before
the first chunk moves on to the next), then relays that one's server-sent events: each
chunk of text becomes one token event (``Provenance.CLOUD``), and the upstream's reported
``usage`` becomes the ledger's counts (or, when it sends none, the delivered text counted
with the model's tokenizer). The HTTP client is :mod:`inference.upstream_pool` (and :mod:`inference.upstream_http`).

Nothing here knows what the upstream is: any server that speaks OpenAI's API works. A
chat goes upstream as its messages, rendered by the upstream's own template.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from inference.breakers import CircuitBreaker
from inference.cloud_logprobs import named_logprobs
from inference.completion import NamedLogprob
from inference.errors import InvalidRequest, UpstreamFailed
from inference.model_tokenizers import counts_with, gguf_tokenizer
from inference.upstream_http import HttpError, Response
from inference.upstream_pool import pool
from speculative.errors import InvalidRequestError
from speculative.types import FinishReason, Provenance, SamplingParams, TokenEvent, check_sampling

log = logging.getLogger(__name__)

CLOUD_TOKEN_ID = -1  # an upstream's chunks carry text, not token ids
DRAIN_AFTER_DONE_S = 1.0  # the rest of a body after [DONE] is read this long, to keep its connection
MAX_ERROR_BODY = 2048  # bytes of an upstream's error body quoted in our error
# Statuses that say the request itself is wrong (another upstream would refuse it too),
# as opposed to the upstream being down, overloaded or misconfigured.
REQUEST_ERROR_STATUSES = frozenset({400, 404, 413, 422})


@dataclass(frozen=True)
class Upstream:
    """A snapshot of one ``CloudUpstream`` row, safe to use on the event loop."""

    name: str
    model: str
    base_url: str
    api_key_env: str
    upstream_model: str
    connect_timeout_s: float = 3.0
    first_token_timeout_s: float = 30.0
    idle_timeout_s: float = 30.0
    all_tenants: bool = False
    tenant_ids: frozenset[int] = frozenset()
    priority: int = 100
    continues_final_message: bool = False
    note: str = ""
    tokenizer: str = ""  # a GGUF file of the upstream's model: its tokenizer and chat template

    def allows(self, tenant_id: int | None) -> bool:
        return self.all_tenants or (tenant_id is not None and tenant_id in self.tenant_ids)

    def headers(self) -> dict[str, str]:
        key = os.environ.get(self.api_key_env, "") if self.api_key_env else ""
        return {"Authorization": f"Bearer {key}"} if key else {}


class UpstreamDirectory:
    """This process's view of the registered upstreams and their breakers.

    The rows are read on a DB thread (``refresh``) at most every ``ttl_s`` seconds; routing
    reads the snapshot in memory. Breakers live as long as the process and are keyed by
    upstream name, so a re-read keeps their state.
    """

    def __init__(self, ttl_s: float = 5.0, load: Any = None):
        self.ttl_s = ttl_s
        self._load = load or _load_upstreams
        self._by_model: dict[str, tuple[Upstream, ...]] = {}
        self._loaded_at: float | None = None
        self._breakers: dict[str, CircuitBreaker] = {}

    def stale(self) -> bool:
        return self._loaded_at is None or time.monotonic() - self._loaded_at >= self.ttl_s

    def refresh(self) -> None:
        """Re-read the rows (sync: on a DB thread)."""
        self.replace(self._load())

    def replace(self, upstreams: Iterable[Upstream]) -> None:
        by_model: dict[str, list[Upstream]] = {}
        for upstream in sorted(upstreams, key=lambda u: (u.priority, u.name)):
            by_model.setdefault(upstream.model, []).append(upstream)
        self._by_model = {model: tuple(items) for model, items in by_model.items()}
        self._loaded_at = time.monotonic()

    def forget(self) -> None:
        self._loaded_at = None

    def for_model(self, model: str, tenant_id: int | None) -> tuple[Upstream, ...]:
        return tuple(u for u in self._by_model.get(model, ()) if u.allows(tenant_id))

    def breaker(self, upstream: Upstream) -> CircuitBreaker:
        breaker = self._breakers.get(upstream.name)
        if breaker is None:
            breaker = self._breakers[upstream.name] = CircuitBreaker(f"cloud/{upstream.name}")
        return breaker

    def snapshot(self, tenant_id: int | None = None) -> list[dict]:
        """Every upstream (that ``tenant_id`` may use, when given) with its breaker's state: the console's health panel."""
        return [
            {
                "name": u.name,
                "model": u.model,
                "upstream_model": u.upstream_model,
                "note": u.note,
                "breaker": self.breaker(u).snapshot(),
            }
            for items in self._by_model.values()
            for u in items
            if tenant_id is None or u.allows(tenant_id)
        ]


def _load_upstreams() -> list[Upstream]:
    from inference.models import CloudUpstream

    rows = CloudUpstream.objects.filter(enabled=True).prefetch_related("tenants")
    return [
        Upstream(
            name=row.name,
            model=row.model,
            base_url=row.base_url,
            api_key_env=row.api_key_env,
            upstream_model=row.upstream_model,
            connect_timeout_s=row.connect_timeout_s,
            first_token_timeout_s=row.first_token_timeout_s,
            idle_timeout_s=row.idle_timeout_s,
            all_tenants=row.all_tenants,
            tenant_ids=frozenset(t.pk for t in row.tenants.all()),
            priority=row.priority,
            continues_final_message=row.continues_final_message,
            note=row.note,
            tokenizer=row.tokenizer,
        )
        for row in rows
    ]


@dataclass(frozen=True)
class CloudRequest:
    """A request for the cloud tier: the text or messages to send, the upstreams to try, its prompt's tokens.

    ``prompt_ids`` is the prompt in the first upstream's model's tokens (its chat template
    applied) when that upstream names its tokenizer, else in the local model's: what the
    money held for the request is estimated from. What is charged is the upstream's
    reported count, or the same tokenizer's count of what was delivered.
    """

    prompt_ids: tuple[int, ...]
    prompt: str
    messages: tuple[Mapping[str, str], ...]
    max_tokens: int
    sampling: SamplingParams
    stop: tuple[str, ...]
    tenant_id: int | None
    upstreams: tuple[Upstream, ...]
    continuation: str = ""  # the answer so far, when this tier takes over mid-stream
    stream: bool = True  # False: the client waits for the whole answer, so the upstream is asked for it whole
    logprobs: int | None = None  # asked for: each token's logprob and this many alternatives, named upstream


@dataclass(frozen=True)
class CloudTokenEvent(TokenEvent):
    """A chunk of an upstream's text, with its tokens' logprobs when the request asked for them."""

    named: tuple[NamedLogprob, ...] = ()


@dataclass
class CloudStats:
    """What the upstream said of a completion: its finish reason and, when it reported them, its token counts."""

    upstream: str = ""
    finish_reason: FinishReason | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    ttft_ms: float | None = None
    attempts: list[str] = field(default_factory=list)  # "name: error" of upstreams that failed before answering


class CloudEngine:
    """The cloud tier of one public model."""

    def __init__(self, model: str, tokenizer: Any, directory: UpstreamDirectory):
        self.model = model
        self.tokenizer = tokenizer  # counts prompt tokens for the hold, and delivered text when no usage comes
        self.directory = directory

    def allows(self, tenant_id: int | None) -> bool:
        return bool(self.directory.for_model(self.model, tenant_id))

    def available(self, tenant_id: int | None) -> bool:
        return any(self.directory.breaker(u).available() for u in self.directory.for_model(self.model, tenant_id))

    def request(
        self,
        prompt: str,
        *,
        max_tokens: int,
        sampling: SamplingParams,
        stop: Sequence[str] = (),
        messages: Sequence[Mapping[str, str]] = (),
        tenant_id: int | None = None,
        continuation: str = "",
        stream: bool = True,
        logprobs: int | None = None,
    ) -> CloudRequest:
        check_sampling(sampling)
        if max_tokens < 1:
            raise InvalidRequestError(f"max_tokens must be >= 1, got {max_tokens}")
        if any(not isinstance(s, str) or not s for s in stop):
            raise InvalidRequestError("stop strings must be non-empty strings")
        upstreams = tuple(
            u
            for u in self.directory.for_model(self.model, tenant_id)
            if self.directory.breaker(u).available() and (not continuation or _continues(u, bool(messages)))
        )
        first = upstreams[0] if upstreams else None
        tokenizer = self.tokenizer_of(first)
        text = prompt + continuation
        if messages and first is not None and first.tokenizer and getattr(tokenizer, "template", None):
            # what the upstream will read: the conversation in its own template
            text = tokenizer.render_chat(messages) + continuation
        ids = tuple(tokenizer.encode(text, add_special_tokens=False))
        return CloudRequest(
            ids,
            prompt,
            tuple(messages),
            max_tokens,
            sampling,
            tuple(stop),
            tenant_id,
            upstreams,
            continuation,
            stream,
            logprobs,
        )

    def can_continue(self, request: CloudRequest) -> bool:
        """Whether an upstream may go on from the request's partial answer (there is one that can)."""
        return bool(request.upstreams)

    def astream(self, request: CloudRequest) -> CloudCompletion:
        return CloudCompletion(self, request)

    def tokenizer_of(self, upstream: Upstream | None) -> Any:
        """The upstream's model's tokenizer when it names one, else the local model's (an estimate)."""
        if upstream is not None and upstream.tokenizer:
            return gguf_tokenizer(upstream.tokenizer)
        return self.tokenizer


class CloudCompletion:
    """One completion relayed from the first upstream that answers. An async iterator of :class:`TokenEvent`."""

    def __init__(self, engine: CloudEngine, request: CloudRequest):
        self.engine, self.request = engine, request
        self.stats = CloudStats()
        self._answered_by: Upstream | None = None
        self._events = self._run()

    def __aiter__(self) -> CloudCompletion:
        return self

    async def __anext__(self) -> TokenEvent:
        return await self._events.__anext__()

    async def aclose(self) -> None:
        await self._events.aclose()

    def token_counts(self, delivered_text: str, delivered: int, completed: bool) -> tuple[int, int]:
        """(prompt, completion) tokens to charge: the upstream's report for a finished answer, else counted here.

        A stream cut short is charged for the text the client was sent, counted with the
        model's tokenizer (at least one token a non-empty chunk), never for what the
        upstream generated past it.
        """
        prompt = self.stats.prompt_tokens if self.stats.prompt_tokens is not None else len(self.request.prompt_ids)
        if completed and self.stats.completion_tokens is not None:
            completion = self.stats.completion_tokens
        else:
            tokenizer = self.engine.tokenizer_of(self._answered_by)
            completion = max(counts_with(tokenizer, delivered_text), delivered)
        return prompt, min(completion, self.request.max_tokens)

    async def _run(self) -> AsyncGenerator[TokenEvent, None]:
        directory, request = self.engine.directory, self.request
        upstreams = [u for u in request.upstreams if directory.breaker(u).available()]
        if not upstreams:
            raise UpstreamFailed(
                f"no cloud upstream of {self.engine.model!r} is available", code="upstream_unavailable"
            )
        for upstream in upstreams:
            breaker = directory.breaker(upstream)
            started = time.perf_counter()
            answered = False
            try:
                async for event in self._relay(upstream):
                    if not answered:
                        answered = True
                        self._answered_by = upstream
                        self.stats.upstream = upstream.name
                        self.stats.ttft_ms = (time.perf_counter() - started) * 1e3
                        breaker.record_success(self.stats.ttft_ms)
                    yield event
                if not answered:  # an empty answer is still an answer
                    self._answered_by = upstream
                    self.stats.upstream = upstream.name
                    breaker.record_success((time.perf_counter() - started) * 1e3)
                return
            except UpstreamFailed as exc:
                breaker.record_failure(exc.message)
                if answered:
                    raise  # part of the answer was sent: the gateway decides what happens next
                self.stats.attempts.append(f"{upstream.name}: {exc.message}")
                log.warning("cloud upstream %s failed before answering: %s", upstream.name, exc.message)
        raise UpstreamFailed(
            f"every cloud upstream of {self.engine.model!r} failed: {'; '.join(self.stats.attempts)}",
            code="upstream_unavailable",
        )

    async def _relay(self, upstream: Upstream) -> AsyncGenerator[TokenEvent, None]:
        chat, body = self._plan(upstream)
        url = upstream.base_url.rstrip("/") + ("/chat/completions" if chat else "/completions")
        if not self.request.stream:
            async for event in self._whole(upstream, url, body | {"stream": False}, chat):
                yield event
            return
        answered = False
        try:
            async with asyncio.timeout(upstream.first_token_timeout_s) as first_token:
                async with await _post(upstream, url, body) as response:
                    if response.status != 200:
                        await _refuse(upstream, response)
                    async for event in self._events_of(response, chat):
                        if not answered:
                            answered = True
                            first_token.reschedule(None)  # from here on the idle timeout guards each chunk
                        yield event
        except TimeoutError as exc:  # asyncio's (the first token), the connect's, or the read's (between chunks)
            if not answered:
                raise UpstreamFailed(
                    f"{upstream.name} sent no token within {upstream.first_token_timeout_s:g} s",
                    code="upstream_timeout",
                ) from None
            raise UpstreamFailed(f"{upstream.name} timed out: {type(exc).__name__}", code="upstream_timeout") from None
        except HttpError as exc:
            raise UpstreamFailed(f"{upstream.name} is unreachable: {exc}") from None

    async def _whole(
        self, upstream: Upstream, url: str, body: dict[str, Any], chat: bool
    ) -> AsyncGenerator[TokenEvent, None]:
        """A non-streaming client's answer, asked for whole: one response and one parse instead of a chunk each.

        Measured with the relay benchmark: a 32-chunk stream relayed chunk by chunk cost the
        gateway about 1.5 ms of parsing and hand-overs that a client waiting for the whole
        answer never sees. The answer becomes one event; the usage is the upstream's.
        """
        body.pop("stream_options", None)
        try:
            async with asyncio.timeout(upstream.first_token_timeout_s):
                async with await _post(upstream, url, body) as response:
                    if response.status != 200:
                        await _refuse(upstream, response)
                    answer = json.loads(await response.read())
        except TimeoutError:
            raise UpstreamFailed(
                f"{upstream.name} sent no answer within {upstream.first_token_timeout_s:g} s", code="upstream_timeout"
            ) from None
        except HttpError as exc:
            raise UpstreamFailed(f"{upstream.name} is unreachable: {exc}") from None
        except ValueError:
            raise UpstreamFailed(f"{upstream.name} answered with a body that is not JSON") from None
        if not isinstance(answer, dict) or not isinstance(answer.get("choices"), list) or not answer["choices"]:
            raise UpstreamFailed(f"{upstream.name} answered without choices")
        self._take_usage(answer)
        choice = answer["choices"][0]
        text = _choice_text(choice, chat, "message")
        self._take_finish(choice)
        if text:
            yield self._event(text, choice, chat)

    def _event(self, text: str, choice: dict, chat: bool) -> TokenEvent:
        if self.request.logprobs is None:
            return TokenEvent(CLOUD_TOKEN_ID, text, Provenance.CLOUD)
        # at most the alternatives asked for: some upstreams send one where 0 were asked for
        top = self.request.logprobs
        named = tuple(
            n if len(n.top) <= top else dataclasses.replace(n, top=n.top[:top])
            for n in named_logprobs(choice.get("logprobs"), chat)
        )
        logprob = sum(n.logprob for n in named) if named else None
        return CloudTokenEvent(CLOUD_TOKEN_ID, text, Provenance.CLOUD, logprob=logprob, named=named)

    def _take_usage(self, body: dict) -> None:
        usage = body.get("usage")
        if isinstance(usage, dict):
            self.stats.prompt_tokens = _count(usage.get("prompt_tokens"))
            self.stats.completion_tokens = _count(usage.get("completion_tokens"))

    def _take_finish(self, choice: Any) -> None:
        reason = choice.get("finish_reason") if isinstance(choice, dict) else None
        if reason:
            self.stats.finish_reason = FinishReason.LENGTH if reason == "length" else FinishReason.STOP

    def _plan(self, upstream: Upstream) -> tuple[bool, dict[str, Any]]:
        """Which endpoint (chat or not) and what body: a chat as messages, a partial answer continued.

        A chat taken over mid-stream continues the partial answer as the last (assistant)
        message where the upstream can (llama.cpp's server and vLLM), else through its
        completions endpoint with the conversation in the model's own chat template.
        """
        request, sampling = self.request, self.request.sampling
        body: dict[str, Any] = {
            "model": upstream.upstream_model,
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": request.max_tokens,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "seed": sampling.seed,
        }
        if request.stop:
            body["stop"] = list(request.stop)
        partial = request.continuation
        chat, body = self._endpoint(upstream, body, partial)
        if request.logprobs is not None:  # the chat API's names, else the legacy completions' count
            body |= {"logprobs": True, "top_logprobs": request.logprobs} if chat else {"logprobs": request.logprobs}
        return chat, body

    def _endpoint(self, upstream: Upstream, body: dict[str, Any], partial: str) -> tuple[bool, dict[str, Any]]:
        """The chat endpoint for a conversation, else completions; ``body`` gets the prompt or messages."""
        request = self.request
        if not request.messages:
            body["prompt"] = request.prompt + partial
            return False, body
        if not partial:
            body["messages"] = [dict(m) for m in request.messages]
            return True, body
        if upstream.continues_final_message:
            body["messages"] = [*map(dict, request.messages), {"role": "assistant", "content": partial}]
            body |= {"continue_final_message": True, "add_generation_prompt": False}  # vLLM's names for it
            return True, body
        messages = [*request.messages, {"role": "assistant", "content": partial}]
        body["prompt"] = gguf_tokenizer(upstream.tokenizer).render_chat(messages, continue_final=True)
        return False, body

    async def _events_of(self, response: Response, chat: bool) -> AsyncGenerator[TokenEvent, None]:
        """The upstream's server-sent events as token events; its usage and finish reason into ``stats``."""
        lines = _lines_of(response)
        async for line in lines:
            if not line.startswith("data:"):
                continue  # comments (keep-alives), event names, blank separators
            data = line[5:].strip()
            if data == "[DONE]":
                await _drain(lines)
                return
            try:
                chunk = json.loads(data)
            except ValueError:
                raise UpstreamFailed(f"the upstream sent a chunk that is not JSON: {data[:200]!r}") from None
            if not isinstance(chunk, dict):
                raise UpstreamFailed("the upstream sent a chunk that is not a JSON object")
            if "error" in chunk:
                raise UpstreamFailed(f"the upstream failed mid-answer: {_message_of(chunk)}")
            self._take_usage(chunk)
            for choice in chunk.get("choices") or ():
                text = _choice_text(choice, chat)
                self._take_finish(choice)
                if text:
                    yield self._event(text, choice, chat)


async def _post(upstream: Upstream, url: str, body: dict[str, Any]) -> Response:
    """The upstream's response to ``body``, once its head is in; connect and between-chunk timeouts are the upstream's."""
    return await pool().post(
        url,
        json.dumps(body, separators=(",", ":")).encode(),
        upstream.headers(),
        connect_timeout_s=upstream.connect_timeout_s,
        read_timeout_s=upstream.idle_timeout_s,
    )


async def _lines_of(response: Response) -> AsyncIterator[str]:
    async for raw in response.lines():
        yield raw.decode("utf-8", "replace").rstrip("\r")


async def _drain(lines: AsyncIterator[str]) -> None:
    """Read what follows ``[DONE]`` (the body's end), so that the connection goes back to the pool.

    Without it every cloud request opened a new connection (and, to a real provider, a TLS
    handshake): a client closes a connection whose body was not read to its end.
    """
    try:
        async with asyncio.timeout(DRAIN_AFTER_DONE_S):
            async for _ in lines:
                pass
    except (TimeoutError, HttpError) as exc:  # the answer is whole; only this connection is lost
        log.info("an upstream's body did not end after [DONE] (%s): its connection is closed", type(exc).__name__)


def _continues(upstream: Upstream, chat: bool) -> bool:
    """Whether ``upstream`` can go on from a partial answer: any text prompt can; a chat needs a way to."""
    if not chat or upstream.continues_final_message:
        return True
    return bool(upstream.tokenizer) and gguf_tokenizer(upstream.tokenizer).template is not None


def _choice_text(choice: Any, chat: bool, part: str = "delta") -> str:
    """A choice's text: a chat's ``delta`` (a chunk) or ``message`` (a whole answer) content, else its ``text``."""
    if not isinstance(choice, dict):
        return ""
    if chat:
        holder = choice.get(part)
        text = holder.get("content") if isinstance(holder, dict) else None
    else:
        text = choice.get("text")
    return text if isinstance(text, str) else ""


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _message_of(body: Any) -> str:
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        return str(error.get("message") or error)[:MAX_ERROR_BODY]
    return str(error or body)[:MAX_ERROR_BODY]


async def _refuse(upstream: Upstream, response: Response) -> None:
    """An upstream's non-200 answer as our error: the request's fault (400) or the upstream's (502)."""
    raw = await response.read()
    try:
        message = _message_of(json.loads(raw))
    except ValueError:
        message = raw[:MAX_ERROR_BODY].decode("utf-8", "replace")
    if response.status in REQUEST_ERROR_STATUSES:
        raise InvalidRequest(f"the cloud upstream refused the request ({response.status}): {message}")
    raise UpstreamFailed(f"{upstream.name} answered {response.status}: {message}")
