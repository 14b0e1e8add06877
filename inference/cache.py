"""The exact result cache: an identical deterministic request of the same tenant is answered from the answer stored.

What makes two requests identical (``cache_key``): the tenant, the model and its versions
(the verifier's and the draft's content hashes, and the engines that serve them), the
routing policy version, the rendered prompt and every sampling parameter. A new model,
engine or policy version makes old entries unreachable; they expire on their own.

What is cached (``cacheable``): greedy requests (``temperature`` 0) unless the tenant's
policy opts in to sampled ones; never a request in which the router found personal data
unless the policy opts in; never one that asks for logprobs; only answers the edge or
speculative tier generated in one leg that completed (a cloud answer, a failover, an
escalation are not stored). Entries live ``cache_ttl_s`` of the policy (its retention;
0 turns the cache off), and a tenant's owner can forget them all (``forget_tenant``).

Identical requests in flight at once share one generation (``InFlight``): the followers wait
for the leader's answer and replay it at the cache rate (route reason ``collapsed``).

A hit streams like a generation (``ReplayEngine``: the stored tokens through the same stop
and length rules), takes no engine slot, and is charged the tier's cache rate from the
price book (``Price.cache_per_mtok``); its ledger row says ``source="exact_cache"``, the tier
whose answer it replays, and the saving against generating it again.

Storage: Redis (``TANDEM_CACHE_REDIS_URL``, by default ``REDIS_URL``), shared by every web
process, or this process's memory (an LRU of ``TANDEM_CACHE_MAX_ENTRIES``). Keys are
per tenant: one tenant's request can never read another's entry.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Generator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from django.conf import settings

from inference.redis_clients import RedisFallback, redis_client
from inference.semantic_cache import semantic_cache
from speculative.completion import CompletionRequest, TokenStream, build_request
from speculative.types import Provenance, TokenEvent
from tenants.tiers import Tier

log = logging.getLogger(__name__)

KEY_PREFIX = "tandem:cache:v1"
CACHED_TIERS = (Tier.EDGE, Tier.SPECULATIVE)


@dataclass(frozen=True)
class CachedAnswer:
    """One stored answer: the tokens a tier generated (with their provenance) and what generating them took."""

    tier: str
    token_ids: tuple[int, ...]
    provenance: tuple[str, ...]
    drafted_tokens: str  # Decimal as text: what the generation drafted, for the saving
    gpu_ms: str
    finish_reason: str
    created: float

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> CachedAnswer:
        data = json.loads(text)
        data["token_ids"] = tuple(data["token_ids"])
        data["provenance"] = tuple(data["provenance"])
        return cls(**data)


def cacheable(call, policy, pii: bool) -> bool:
    """Whether ``call`` may be answered from, and stored in, the exact cache under ``policy``."""
    if policy.cache_ttl_s <= 0 or call.logprobs is not None or call.continue_from:
        return False
    if call.temperature != 0 and not policy.cache_sampled:
        return False
    return not pii or policy.cache_pii


def cache_key(tenant_id: int, call, entry, policy) -> str:
    """The tenant's key for ``call``: everything that decides its answer, hashed."""
    material = [*key_material(call, entry, policy), call.prompt]
    digest = hashlib.sha256(json.dumps(material, ensure_ascii=False).encode()).hexdigest()
    return f"{KEY_PREFIX}:t{tenant_id}:{digest}"


def key_material(call, entry, policy) -> list:
    """Everything but the prompt that decides ``call``'s answer (the semantic cache's bucket is this)."""
    return [
        entry.name,
        entry.verifier_version,
        entry.draft_version,
        type(entry.speculative).__name__,
        type(entry.edge).__name__,
        policy.version,
        call.max_tokens,
        repr(call.temperature),
        repr(call.top_p),
        call.top_k,
        call.seed,
        list(call.stop),
        call.requested_tier,
    ]


# storage --------------------------------------------------------------------------------------------
class LocalStore:
    """Entries in this process's memory, least recently used first out."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, tuple[float, str]] = OrderedDict()

    async def get(self, key: str) -> str | None:
        with self._lock:
            found = self._entries.get(key)
            if found is None:
                return None
            expires, value = found
            if expires <= time.monotonic():
                del self._entries[key]
                return None
            self._entries.move_to_end(key)
            return value

    async def put(self, key: str, value: str, ttl_s: int) -> None:
        with self._lock:
            self._entries[key] = (time.monotonic() + ttl_s, value)
            self._entries.move_to_end(key)
            while len(self._entries) > settings.TANDEM_CACHE_MAX_ENTRIES:
                self._entries.popitem(last=False)

    async def forget(self, prefix: str) -> int:
        with self._lock:
            keys = [k for k in self._entries if k.startswith(prefix)]
            for k in keys:
                del self._entries[k]
            return len(keys)


class RedisStore:
    """Entries in Redis (``SET ... EX``), shared by every process with the same URL."""

    def __init__(self, url: str) -> None:
        self.url = url

    def _client(self) -> Any:
        return redis_client(self.url)

    async def get(self, key: str) -> str | None:
        value = await self._client().get(key)  # type: ignore[attr-defined]
        return value.decode() if value is not None else None

    async def put(self, key: str, value: str, ttl_s: int) -> None:
        await self._client().set(key, value, ex=ttl_s)  # type: ignore[attr-defined]

    async def forget(self, prefix: str) -> int:
        client = self._client()
        count = 0
        async for key in client.scan_iter(match=f"{prefix}*", count=500):  # type: ignore[attr-defined]
            deleted = await client.delete(key)  # type: ignore[attr-defined]
            count += deleted if b":sem:" not in key else 0  # a semantic index over entries is not an entry
        return count


class ExactCache:
    """The process's exact cache: Redis when configured and reachable, else local memory."""

    def __init__(self) -> None:
        self.local = LocalStore()
        self._redis: RedisStore | None = None
        self._fallback = RedisFallback("result cache", "this process's memory")

    def _store(self) -> LocalStore | RedisStore:
        url = self._fallback.url(settings.TANDEM_CACHE_REDIS_URL)
        if url is None:
            return self.local
        if self._redis is None or self._redis.url != url:
            self._redis = RedisStore(url)
        return self._redis

    async def get(self, key: str) -> CachedAnswer | None:
        store = self._store()
        try:
            value = await store.get(key)
        except Exception as exc:  # noqa: BLE001 - a cache that cannot be read is a miss, never a failed request
            self._fallback.failed(exc)
            return None
        if value is None:
            return None
        try:
            return CachedAnswer.from_json(value)
        except (ValueError, TypeError, KeyError):
            log.warning("result cache: an unreadable entry was ignored")
            return None

    async def put(self, key: str, answer: CachedAnswer, ttl_s: int) -> None:
        store = self._store()
        try:
            await store.put(key, answer.to_json(), ttl_s)
        except Exception as exc:  # noqa: BLE001 - not storing an answer loses nothing but a later hit
            self._fallback.failed(exc)

    async def forget_tenant(self, tenant_id: int) -> int:
        """Drop every entry of the tenant, and the semantic index over them (in Redis and in this process); how many there were."""
        prefix = f"{KEY_PREFIX}:t{tenant_id}:"
        count = await self.local.forget(prefix)
        await semantic_cache.local.forget(prefix)  # its buckets live under the same prefix (Redis: the scan below)
        store = self._store()
        if store is not self.local:
            try:
                count += await store.forget(prefix)
            except Exception as exc:  # noqa: BLE001
                self._fallback.failed(exc)
                raise
        return count

    def reset(self) -> None:
        """Forget everything in this process (tests)."""
        self.local = LocalStore()


exact_cache = ExactCache()


class InFlight:
    """Request collapsing: the cacheable requests generating now, by cache key (this process).

    The first request with a key leads: it generates. An identical one arriving while it
    does follows: it waits for the leader's answer to be stored, then replays it at the
    cache rate (one generation for all of them). A leader that ends without storing (an
    error, a cancel, personal data found) releases its followers, which then generate.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._leaders: dict[str, concurrent.futures.Future] = {}

    def lead_or_follow(self, key: str) -> tuple[concurrent.futures.Future, bool]:
        """The key's future, and whether the caller leads (it must ``done`` it) or follows (it awaits it)."""
        with self._lock:
            leader = self._leaders.get(key)
            if leader is not None:
                return leader, False
            leader = self._leaders[key] = concurrent.futures.Future()
            return leader, True

    def done(self, key: str, leader: concurrent.futures.Future) -> None:
        """The leader's answer is stored (or will not be): its followers go on."""
        with self._lock:
            if self._leaders.get(key) is leader:
                del self._leaders[key]
        if not leader.done():
            leader.set_result(None)

    def leading(self) -> int:
        with self._lock:
            return len(self._leaders)

    def reset(self) -> None:
        with self._lock:
            leaders, self._leaders = list(self._leaders.values()), {}
        for leader in leaders:
            if not leader.done():
                leader.set_result(None)


in_flight = InFlight()


# replaying ----------------------------------------------------------------------------------------------
class ReplayCompletion(TokenStream):
    """A stored answer's tokens, emitted through the same stop and length rules as a generation's."""

    def __init__(self, engine: ReplayEngine, request: CompletionRequest):
        self._answer = engine.answer
        super().__init__(engine.tokenizer, engine.eos_token_id, request)

    def _run(self) -> Generator[TokenEvent, None, None]:
        for token, provenance in zip(self._answer.token_ids, self._answer.provenance, strict=True):
            yield from self._emit((token,), 0, provenance=Provenance(provenance))
            if self.stats.finish_reason is not None:
                return


class ReplayEngine:
    """An engine that plays back one stored answer (a cache hit): no model, no GPU, no draft."""

    def __init__(self, answer: CachedAnswer, tokenizer, context_length: int):
        self.answer = answer
        self.tokenizer = tokenizer
        self.eos_token_id = getattr(tokenizer, "eos_token_id", None)
        self.context_length = context_length

    def request(self, prompt: str | Sequence[int], **kwargs) -> CompletionRequest:
        return build_request(self.tokenizer, self.context_length, prompt, **kwargs)

    def stream(self, prompt: str | Sequence[int], **kwargs) -> ReplayCompletion:
        return ReplayCompletion(self, self.request(prompt, **kwargs))
