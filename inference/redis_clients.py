"""Async Redis clients for the gateway's shared state (rate-limit buckets, the result cache): one per URL and event loop.

An asyncio client belongs to the loop it was made on (the web server's, a batch worker's),
so each loop gets its own. Short timeouts: a Redis that does not answer must not hold a
request up; the callers fall back to this process's memory and log it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any

log = logging.getLogger(__name__)

TIMEOUT_S = 0.5
RETRY_S = 5.0  # after a Redis failure, a process works alone this long before trying Redis again

_clients: dict[tuple[str, asyncio.AbstractEventLoop], Any] = {}
_lock = threading.Lock()


def redis_client(url: str) -> Any:
    """This event loop's client for ``url`` (``redis.asyncio``), made on first use."""
    import redis.asyncio as aioredis

    key = (url, asyncio.get_running_loop())
    client = _clients.get(key)
    if client is None:
        with _lock:
            client = _clients.get(key)
            if client is None:
                client = _clients[key] = aioredis.from_url(
                    url, socket_timeout=TIMEOUT_S, socket_connect_timeout=TIMEOUT_S
                )
    return client


class RedisFallback:
    """Whether to use Redis now: after a failure a process works alone for ``RETRY_S`` (and says so), then tries again."""

    def __init__(self, what: str, alone: str) -> None:
        self._what, self._alone = what, alone  # for the log line: "rate limits", "counting in this process"
        self._down_until = 0.0

    def url(self, configured: str) -> str | None:
        """``configured`` while Redis may be used; None when none is configured or it failed moments ago."""
        return configured if configured and time.monotonic() >= self._down_until else None

    def failed(self, exc: Exception) -> None:
        self._down_until = time.monotonic() + RETRY_S
        log.warning("%s: Redis unreachable (%s); %s for %.0f s", self._what, exc, self._alone, RETRY_S)
