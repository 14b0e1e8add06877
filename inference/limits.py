"""Requests and tokens per minute, per tenant and per API key: token buckets, in memory or shared through Redis.

Each limit is a bucket that holds a minute's allowance and refills continuously (a limit
of 600 requests a minute lets a burst of 600 through, then one every 100 ms). A request
takes one request and ``prompt + max_tokens`` tokens from its tenant's buckets and, where
its key has limits of its own, from its key's; what it did not use is given back when it
settles. Past a limit: 429 ``rate_limit_exceeded`` with ``Retry-After`` (when enough will
have refilled). Every API response reports the tighter bucket in OpenAI's headers
(``x-ratelimit-limit-requests``, ``-remaining-requests``, ``-reset-requests`` and the
``-tokens`` trio).

With ``REDIS_URL`` set the buckets live in Redis (one Lua script per request, atomic), so
N web processes share a tenant's limit instead of multiplying it; else in this process.
A Redis that cannot be reached does not stop traffic: the process falls back to its own
buckets for a while and logs it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import Any

from django.conf import settings

from inference.errors import GatewayError, InvalidRequest, RateLimited
from inference.redis_clients import RedisFallback, redis_client

log = logging.getLogger(__name__)

REDIS_KEY_TTL_S = 120  # a bucket untouched this long is full again: Redis may forget it


@dataclass(frozen=True)
class Limits:
    """One level's limits (a tenant's, or a key's own); None: no limit of its own at this level."""

    max_streams: int | None = None
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None


def tenant_limits(tenant) -> Limits:
    """A tenant's limits: its own fields, else the platform's defaults."""
    return Limits(
        _or(tenant.max_streams, settings.TANDEM_MAX_STREAMS_PER_TENANT),
        _or(tenant.requests_per_minute, settings.TANDEM_REQUESTS_PER_MINUTE),
        _or(tenant.tokens_per_minute, settings.TANDEM_TOKENS_PER_MINUTE),
    )


def default_limits() -> Limits:
    """The platform's defaults (a tenant with no limits of its own)."""
    return Limits(
        settings.TANDEM_MAX_STREAMS_PER_TENANT, settings.TANDEM_REQUESTS_PER_MINUTE, settings.TANDEM_TOKENS_PER_MINUTE
    )


def key_limits(key) -> Limits | None:
    """A key's own limits (inside its tenant's); None when it has none."""
    own = Limits(key.max_streams, key.requests_per_minute, key.tokens_per_minute)
    return None if own == Limits() else own


def _or(value: int | None, default: int) -> int:
    return default if value is None else value


@dataclass(frozen=True)
class Bucket:
    """A bucket's state after a take: what the headers say."""

    limit: int
    remaining: int
    reset_s: float  # until it is full again


@dataclass(frozen=True)
class RateState:
    requests: Bucket
    tokens: Bucket

    def headers(self) -> dict[str, str]:
        return {
            "x-ratelimit-limit-requests": str(self.requests.limit),
            "x-ratelimit-remaining-requests": str(self.requests.remaining),
            "x-ratelimit-reset-requests": duration(self.requests.reset_s),
            "x-ratelimit-limit-tokens": str(self.tokens.limit),
            "x-ratelimit-remaining-tokens": str(self.tokens.remaining),
            "x-ratelimit-reset-tokens": duration(self.tokens.reset_s),
        }


def duration(seconds: float) -> str:
    """OpenAI's reset format: ``0s``, ``120ms``, ``7s``, ``1m30s``."""
    if seconds <= 0:
        return "0s"
    if seconds < 1:
        return f"{max(1, round(seconds * 1000))}ms"
    whole = math.ceil(seconds)
    minutes, secs = divmod(whole, 60)
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


# the buckets ------------------------------------------------------------------------------------
class LocalBuckets:
    """Token buckets in this process's memory."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._levels: dict[str, tuple[float, float]] = {}  # key -> (level, when)

    def take(self, takes: list[tuple[str, int, float]], now: float) -> tuple[bool, list[float]]:
        """Take ``amount`` from each ``(key, capacity, amount)`` bucket, all or none; their levels after."""
        with self._lock:
            levels = [self._level(key, capacity, now) for key, capacity, _ in takes]
            ok = all(level >= amount for level, (_, _, amount) in zip(levels, takes, strict=True))
            if ok:
                levels = [level - amount for level, (_, _, amount) in zip(levels, takes, strict=True)]
                for (key, _, _), level in zip(takes, levels, strict=True):
                    self._levels[key] = (level, now)
            return ok, levels

    def give(self, gives: list[tuple[str, int, float]], now: float) -> None:
        with self._lock:
            for key, capacity, amount in gives:
                self._levels[key] = (min(capacity, self._level(key, capacity, now) + amount), now)

    def _level(self, key: str, capacity: int, now: float) -> float:
        level, when = self._levels.get(key, (float(capacity), now))
        return min(float(capacity), level + (now - when) * capacity / 60.0)


# KEYS: bucket keys; ARGV: now, then (capacity, amount) per key, then mode (1 take all-or-none, 0 give)
_REDIS_SCRIPT = """
local now = tonumber(ARGV[1])
local mode = tonumber(ARGV[#ARGV])
local levels = {}
local ok = 1
for i, key in ipairs(KEYS) do
  local capacity = tonumber(ARGV[2 * i])
  local state = redis.call('HMGET', key, 'level', 'when')
  local level = tonumber(state[1]) or capacity
  local when = tonumber(state[2]) or now
  level = math.min(capacity, level + math.max(0, now - when) * capacity / 60.0)
  levels[i] = level
  if mode == 1 and level < tonumber(ARGV[2 * i + 1]) then ok = 0 end
end
if ok == 1 then
  for i, key in ipairs(KEYS) do
    local capacity = tonumber(ARGV[2 * i])
    local amount = tonumber(ARGV[2 * i + 1])
    if mode == 1 then levels[i] = levels[i] - amount else levels[i] = math.min(capacity, levels[i] + amount) end
    redis.call('HSET', key, 'level', tostring(levels[i]), 'when', tostring(now))
    redis.call('EXPIRE', key, __TTL__)
  end
end
local out = {ok}
for i = 1, #levels do out[i + 1] = tostring(levels[i]) end
return out
""".replace("__TTL__", str(REDIS_KEY_TTL_S))


class RedisBuckets:
    """The same buckets in Redis, shared by every process that uses the same ``REDIS_URL``."""

    def __init__(self, url: str) -> None:
        self.url = url

    def _client(self) -> Any:
        return redis_client(self.url)

    async def run(self, entries: list[tuple[str, int, float]], now: float, take: bool) -> tuple[bool, list[float]]:
        client = self._client()
        args: list[float | int] = [now]
        for _, capacity, amount in entries:
            args += [capacity, amount]
        args.append(1 if take else 0)
        out = await client.eval(_REDIS_SCRIPT, len(entries), *[key for key, _, _ in entries], *args)  # type: ignore[attr-defined]
        return bool(int(out[0])), [float(v) for v in out[1:]]


class Limiter:
    """The process's rate limiter: Redis when configured and reachable, else local buckets."""

    def __init__(self) -> None:
        self.local = LocalBuckets()
        self._redis: RedisBuckets | None = None
        self._fallback = RedisFallback("rate limits", "counting in this process")
        self._pending: set[asyncio.Future] = set()  # give-backs on their way to Redis

    def _shared(self) -> RedisBuckets | None:
        url = self._fallback.url(settings.TANDEM_RATE_LIMIT_REDIS_URL)
        if url is None:
            return None
        if self._redis is None or self._redis.url != url:
            self._redis = RedisBuckets(url)
        return self._redis

    async def _run(self, entries: list[tuple[str, int, float]], take: bool) -> tuple[bool, list[float]]:
        now = time.time()  # wall clock: processes share it through Redis
        shared = self._shared()
        if shared is not None:
            try:
                return await shared.run(entries, now, take)
            except Exception as exc:  # noqa: BLE001 - an unreachable Redis must not stop traffic
                self._fallback.failed(exc)
        if take:
            return self.local.take(entries, now)
        self.local.give(entries, now)
        return True, []

    async def admit(self, principal, tokens: int) -> RateState:
        """Take one request and ``tokens`` from the principal's buckets, or raise RateLimited (429, Retry-After)."""
        entries = _entries(principal, 1, tokens)
        ok, levels = await self._run(entries, take=True)
        if not ok:
            raise _refusal(entries, levels)
        return _state(entries, levels)

    async def state(self, principal) -> RateState:
        """The principal's buckets now, taking nothing (for the headers of a response that took nothing)."""
        entries = _entries(principal, 0, 0)
        _, levels = await self._run(entries, take=True)
        return _state(entries, levels)

    async def give_back(self, principal, tokens: int) -> None:
        """Tokens held at admission that the request did not use."""
        if tokens > 0:
            await self._run(_token_entries(principal, tokens), take=False)

    def give_back_soon(self, principal, tokens: int) -> None:
        """``give_back`` from synchronous code on the event loop (settlement): at once here, soon in Redis."""
        if tokens <= 0:
            return
        if self._shared() is None:
            self.local.give(_token_entries(principal, tokens), time.time())
            return
        task = asyncio.ensure_future(self.give_back(principal, tokens))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    def reset(self) -> None:
        """Forget every local bucket (tests)."""
        self.local = LocalBuckets()


def _entries(principal, requests: int, tokens: int) -> list[tuple[str, int, float]]:
    """(bucket key, capacity, amount) for the tenant's buckets, then the key's own where it has limits."""
    levels = [(f"t{principal.tenant_id}", principal.limits or default_limits())]
    if principal.key_limits is not None:
        levels.append((f"k{principal.api_key_id}", principal.key_limits))
    entries = []
    for owner, limits in levels:
        if limits.requests_per_minute is not None:
            entries.append((f"tandem:rl:{owner}:rpm", limits.requests_per_minute, float(requests)))
        if limits.tokens_per_minute is not None:
            entries.append((f"tandem:rl:{owner}:tpm", limits.tokens_per_minute, float(tokens)))
    return entries


def _token_entries(principal, tokens: int) -> list[tuple[str, int, float]]:
    """The principal's tokens-per-minute buckets only, with ``tokens`` to give back to each."""
    return [e for e in _entries(principal, 0, tokens) if e[0].endswith(":tpm")]


def _state(entries: list[tuple[str, int, float]], levels: list[float]) -> RateState:
    """The tighter request bucket and the tighter token bucket."""

    def tightest(suffix: str) -> Bucket:
        buckets = [
            Bucket(capacity, max(0, math.floor(level)), (capacity - level) * 60.0 / capacity if capacity else 0.0)
            for (key, capacity, _), level in zip(entries, levels, strict=True)
            if key.endswith(suffix)
        ]
        return min(buckets, key=lambda b: (b.remaining, -b.reset_s))

    return RateState(tightest(":rpm"), tightest(":tpm"))


def _refusal(entries: list[tuple[str, int, float]], levels: list[float]) -> GatewayError:
    short = [
        (key, capacity, amount, level)
        for (key, capacity, amount), level in zip(entries, levels, strict=True)
        if level < amount
    ]
    never = [e for e in short if e[2] > e[1]]  # it would never fit: waiting does not help
    key, capacity, amount, level = never[0] if never else max(short, key=lambda e: (e[2] - e[3]) / max(e[1], 1))
    whose = "this API key" if ":k" in key else "this tenant"
    what = "requests" if key.endswith(":rpm") else "tokens"
    if never:
        return InvalidRequest(
            f"this request needs {amount:.0f} tokens (prompt + max_tokens) but {whose} may use {capacity} a "
            "minute; lower max_tokens or shorten the prompt",
            param="max_tokens",
            code="tokens_exceed_limit",
        )
    wait = (amount - level) * 60.0 / capacity
    return RateLimited(
        f"{whose} is past its {what} per minute ({capacity}); retry in {math.ceil(wait)} s",
        code=f"{what}_per_minute_exceeded",
        retry_after=max(1, math.ceil(wait)),
    )


limiter = Limiter()
