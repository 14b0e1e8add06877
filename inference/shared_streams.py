"""Streams at once per tenant and API key across every web process that shares a Redis.

The fair queue (``inference.queueing``) counts a tenant's running streams in its own
process; with N processes behind a load balancer a tenant limited to 8 streams could run
8N. With ``TANDEM_RATE_LIMIT_REDIS_URL`` (``REDIS_URL`` by default) set, a request first
**claims** a place among its tenant's (and its key's) streams in Redis, then takes its
engine slot in this process's queue; the claim goes when the stream settles.

Each owner (``t<tenant id>``, ``k<key id>``) is a sorted set: member = the stream's claim
id, score = when the claim lapses. Claiming is one Lua script, all-or-none across the
owners, after dropping lapsed claims. A process renews its live claims every
``CLAIM_TTL_S / 3`` from a thread of its own, so a process that dies leaves claims that
lapse within ``CLAIM_TTL_S`` instead of holding its tenants' places forever.

A tenant at its limit elsewhere **waits** (holding nothing here, not even an engine
slot), trying again with back-off until its class's queue deadline, as it would wait in
the local queue: then 503 ``queue_timeout`` with ``Retry-After``. A Redis that cannot be
reached does not stop traffic: the process counts alone (the local queue's limits) and
says so in the log.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from django.conf import settings

from inference.errors import Overloaded
from inference.redis_clients import RedisFallback, redis_client

log = logging.getLogger(__name__)

CLAIM_TTL_S = 60.0  # a claim not renewed for this long lapses (its process died)
RETRY_FIRST_S = 0.02
RETRY_MAX_S = 0.5
KEY_PREFIX = "tandem:streams:"

# KEYS: the owners' sets. ARGV: now, lapse (when a new claim lapses), member, then each owner's limit.
# Returns 0 and adds the claim to every set, or the 1-based index of the first owner at its limit.
_CLAIM_SCRIPT = """
local now = tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  if redis.call('ZCARD', key) >= tonumber(ARGV[3 + i]) then return i end
end
for _, key in ipairs(KEYS) do
  redis.call('ZADD', key, ARGV[2], ARGV[3])
  redis.call('PEXPIRE', key, math.ceil((tonumber(ARGV[2]) - now) * 2000))
end
return 0
"""

Owners = Sequence[tuple[str, int]]  # ("t12", its limit), ("k7", its limit)


class Claim:
    """A place among its owners' streams, in Redis; ``release()`` (idempotent) gives it up."""

    def __init__(self, counter: SharedStreams, url: str, member: str, keys: list[str]) -> None:
        self._counter, self.url, self.member, self.keys = counter, url, member, keys
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._counter._release(self)


class SharedStreams:
    """This process's claims on the shared stream counts, and the thread that keeps them alive."""

    def __init__(self, ttl_s: float = CLAIM_TTL_S) -> None:
        self.ttl_s = ttl_s
        self._fallback = RedisFallback("streams at once", "counting this process's streams only")
        self._lock = threading.Lock()
        self._live: dict[str, Claim] = {}
        self._renewer: threading.Thread | None = None
        self._pending: set[asyncio.Future] = set()  # releases on their way to Redis

    def url(self) -> str | None:
        return self._fallback.url(settings.TANDEM_RATE_LIMIT_REDIS_URL)

    async def claim(self, owners: Owners, deadline_s: float, on_wait: Callable[[], None] | None = None) -> Claim | None:
        """A claim for one more stream of every owner, waiting while one is at its limit; None without Redis.

        Raises ``Overloaded`` (503 ``queue_timeout``, ``Retry-After``) when no place frees within ``deadline_s``.
        """
        url = self.url()
        if url is None or not owners:
            return None
        keys = [KEY_PREFIX + owner for owner, _ in owners]
        member = f"{time.time():.0f}-{secrets.token_hex(8)}"
        deadline = time.monotonic() + deadline_s
        pause = RETRY_FIRST_S
        told = False
        while True:
            try:
                full = await self._try(url, keys, member, [limit for _, limit in owners])
            except Exception as exc:  # noqa: BLE001 - an unreachable Redis must not stop traffic
                self._fallback.failed(exc)
                return None
            if full == 0:
                claim = Claim(self, url, member, keys)
                with self._lock:
                    self._live[member] = claim
                self._start_renewer()
                return claim
            if not told and on_wait is not None:
                on_wait()
                told = True
            if time.monotonic() + pause > deadline:
                owner, limit = owners[full - 1]
                raise Overloaded(
                    f"{'this tenant' if owner.startswith('t') else 'this API key'} already runs its limit of "
                    f"{limit} streams at once (across the platform's servers), and none ended within this "
                    f"request's {deadline_s:g} s deadline; retry later",
                    retry_after=max(1, round(pause * 4)),
                    code="queue_timeout",
                )
            await asyncio.sleep(pause)
            pause = min(pause * 2, RETRY_MAX_S)

    async def _try(self, url: str, keys: list[str], member: str, limits: list[int]) -> int:
        now = time.time()  # wall clock: processes share it through Redis
        client = redis_client(url)
        args = [now, now + self.ttl_s, member, *limits]
        return int(await client.eval(_CLAIM_SCRIPT, len(keys), *keys, *args))

    def _release(self, claim: Claim) -> None:
        with self._lock:
            self._live.pop(claim.member, None)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is None:  # settled off the loop (a thread): a client of its own
            self._remove_sync(claim)
            return
        task = loop.create_task(self._remove(claim))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _remove(self, claim: Claim) -> None:
        try:
            client = redis_client(claim.url)
            async with client.pipeline(transaction=False) as pipe:
                for key in claim.keys:
                    pipe.zrem(key, claim.member)
                await pipe.execute()
        except Exception as exc:  # noqa: BLE001 - the claim lapses on its own within the TTL
            self._fallback.failed(exc)

    def _remove_sync(self, claim: Claim) -> None:
        try:
            client = _sync_client(claim.url)
            pipe = client.pipeline(transaction=False)
            for key in claim.keys:
                pipe.zrem(key, claim.member)
            pipe.execute()
        except Exception as exc:  # noqa: BLE001 - the claim lapses on its own within the TTL
            self._fallback.failed(exc)

    # keeping live claims alive ------------------------------------------------------------------------
    def _start_renewer(self) -> None:
        with self._lock:
            if self._renewer is not None and self._renewer.is_alive():
                return
            self._renewer = threading.Thread(target=self._renew_forever, name="stream-claims", daemon=True)
            self._renewer.start()

    def _renew_forever(self) -> None:
        while True:
            time.sleep(self.ttl_s / 3)
            self.renew()

    def renew(self) -> int:
        """Push the lapse of every live claim of this process a TTL ahead; return how many."""
        with self._lock:
            live = list(self._live.values())
        if not live:
            return 0
        lapse = time.time() + self.ttl_s
        try:
            by_url: dict[str, Any] = {}
            for claim in live:
                pipe = by_url.get(claim.url)
                if pipe is None:
                    pipe = by_url[claim.url] = _sync_client(claim.url).pipeline(transaction=False)
                for key in claim.keys:
                    pipe.zadd(key, {claim.member: lapse}, xx=True)  # XX: a released claim is not brought back
                    pipe.pexpire(key, int(self.ttl_s * 2000))  # the set outlives its last live claim
            for pipe in by_url.values():
                pipe.execute()
        except Exception as exc:  # noqa: BLE001 - tried again next round; a lapsed claim only frees a place early
            self._fallback.failed(exc)
        return len(live)

    def live(self) -> int:
        with self._lock:
            return len(self._live)


_sync_clients: dict[str, Any] = {}


def _sync_client(url: str) -> Any:
    import redis

    client = _sync_clients.get(url)
    if client is None:
        client = _sync_clients[url] = redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)
    return client


shared_streams = SharedStreams()
