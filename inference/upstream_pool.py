"""The cloud tier's connections to its upstreams, kept per origin: at most 64 open each, idle ones for 15 s.

``pool().post(url, body, headers, ...)`` takes an idle connection to the URL's origin (or
opens one, or waits for one to come back), sends the request and answers with the
:class:`~inference.upstream_http.Response` once its head is in. One pool per event loop.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
import weakref
from collections.abc import Mapping

from inference.upstream_http import Connection, HttpError, Response, Target, request_head, target_of

MAX_CONNECTIONS_PER_ORIGIN = 64  # beyond it, requests wait for a connection to come back
KEEPALIVE_S = 15.0  # an idle connection is closed after this long


class _Origin:
    """One origin's connections: the idle ones (the last returned on top), how many are open, who waits for one."""

    def __init__(self) -> None:
        self.idle: list[Connection] = []
        self.open = 0
        self.waiters: collections.deque[asyncio.Future[Connection | None]] = collections.deque()

    def wake(self, connection: Connection | None) -> bool:
        """Hand ``connection`` (or, with None, a free place to connect) to the first waiter; False when none waits."""
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(connection)
                return True
        return False


class Pool:
    """The connections of one event loop, idle ones kept per origin, at most ``max_per_origin`` open per origin."""

    def __init__(
        self,
        max_per_origin: int = MAX_CONNECTIONS_PER_ORIGIN,
        keepalive_s: float = KEEPALIVE_S,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self._max_per_origin = max_per_origin
        self._keepalive_s = keepalive_s
        self._origins: dict[tuple[str, str, int], _Origin] = {}
        self._tls = tls  # None: the system's trust store, on the first https request
        self.closed = False

    async def post(
        self,
        url: str,
        body: bytes,
        headers: Mapping[str, str],
        *,
        connect_timeout_s: float | None = None,
        read_timeout_s: float | None = None,
    ) -> Response:
        """POST ``body`` (JSON) to ``url``; the response once its head is in (use it with ``async with``)."""
        if self.closed:
            raise HttpError("the connection pool is closed")
        target = target_of(url)
        head = request_head(target, len(body), headers)
        connection = await self._connection(target, connect_timeout_s)
        response = Response(connection, read_timeout_s)
        try:
            connection.send(response, head + body)
            await response.until_head()
            encoding = response.headers.get("content-encoding", "identity").strip().lower()
            if encoding not in ("identity", ""):  # asked for none: a body this client cannot read
                raise HttpError(f"the upstream encoded its answer ({encoding}) though asked for identity")
        except BaseException:
            response.release()
            raise
        return response

    async def _connection(self, target: Target, connect_timeout_s: float | None) -> Connection:
        """An idle connection to the target's origin, a new one while fewer than the limit are open, else the next one back."""
        origin = self._origins.get(target.origin)
        if origin is None:
            origin = self._origins[target.origin] = _Origin()
        while True:
            while origin.idle:
                connection = origin.idle.pop()
                connection.stop_expiry()
                if connection.usable():
                    return connection
                connection.counted = False  # closing while idle, its close not yet seen: its place is free now
                origin.open -= 1
            if origin.open < self._max_per_origin:
                origin.open += 1
                try:
                    connection = await self._connect(target, connect_timeout_s)
                except BaseException:
                    self.closed_one(target.origin)
                    raise
                connection.counted = True
                return connection
            waiter: asyncio.Future[Connection | None] = asyncio.get_running_loop().create_future()
            origin.waiters.append(waiter)
            try:
                handed = await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():  # handed over as this caller left: pass it on
                    given = waiter.result()
                    if given is None:
                        origin.wake(None)
                    else:
                        self.put(given)
                raise
            if handed is not None:
                return handed

    async def _connect(self, target: Target, connect_timeout_s: float | None) -> Connection:
        loop = asyncio.get_running_loop()
        tls = self._tls_context() if target.tls else None
        try:
            async with asyncio.timeout(connect_timeout_s):
                _, connection = await loop.create_connection(
                    lambda: Connection(self, target.origin),
                    target.host,
                    target.port,
                    ssl=tls,
                    server_hostname=target.host if tls else None,
                )
        except TimeoutError:
            raise TimeoutError(f"no connection to {target.host}:{target.port} within {connect_timeout_s:g} s") from None
        except OSError as exc:  # refused, unreachable, a name that does not resolve, a TLS failure
            raise HttpError(f"cannot connect to {target.host}:{target.port}: {exc}") from None
        return connection

    def _tls_context(self) -> ssl.SSLContext:
        if self._tls is None:
            self._tls = ssl.create_default_context()
        return self._tls

    def put(self, connection: Connection) -> None:
        """A connection free for the next request: to whoever waits for one, else idle for ``keepalive_s``."""
        origin = self._origins[connection.origin]
        if self.closed:
            connection.close()
            return
        if origin.wake(connection):
            return
        origin.idle.append(connection)
        connection.expiry = asyncio.get_running_loop().call_later(self._keepalive_s, connection.close)

    def closed_one(self, key: tuple[str, str, int]) -> None:
        """A connection of ``key``'s origin is gone (or never came): its place goes to a waiter."""
        origin = self._origins[key]
        origin.open -= 1
        origin.wake(None)

    def lost(self, connection: Connection) -> None:
        """A connection closed: if it was idle it leaves the idle list; either way its place is free."""
        origin = self._origins[connection.origin]
        if connection in origin.idle:
            origin.idle.remove(connection)
            connection.stop_expiry()
        if connection.counted:  # once per connection, and never for one whose connect was abandoned
            connection.counted = False
            self.closed_one(connection.origin)

    def close(self) -> None:
        """Close every idle connection; connections in use close when their response is released."""
        self.closed = True
        for origin in self._origins.values():
            for connection in origin.idle:
                connection.stop_expiry()
                connection.close()
            origin.idle.clear()


# One pool per event loop: a connection belongs to the loop it was made on.
_pools: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Pool] = weakref.WeakKeyDictionary()


def pool() -> Pool:
    """This event loop's pool, made on its first use."""
    loop = asyncio.get_running_loop()
    found = _pools.get(loop)
    if found is None or found.closed:
        found = _pools[loop] = Pool()
    return found


def close_pool() -> None:
    """Close this loop's pool (a loop that ends: tests, a graceful shutdown)."""
    found = _pools.pop(asyncio.get_running_loop(), None)
    if found is not None:
        found.close()
