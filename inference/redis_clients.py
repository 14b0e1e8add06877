"""Async Redis clients for the gateway's shared state (rate-limit buckets, the result cache): one per URL and event loop.

An asyncio client belongs to the loop it was made on (the web server's, a batch worker's),
so each loop gets its own. Short timeouts: a Redis that does not answer must not hold a
request up; the callers fall back to this process's memory and log it.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

TIMEOUT_S = 0.5

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
