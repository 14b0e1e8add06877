"""The cloud tier's HTTP client: HTTP/1.1 on asyncio protocols and httptools' parser; here a request and its answer.

:mod:`inference.upstream_pool` keeps the connections per origin; its ``post(url, body,
headers, ...)`` sends one JSON request and answers with a :class:`Response`
as soon as its status line and headers are in; its body is read whole (``read``) or as it
arrives (``lines``, for server-sent events), and leaving ``async with response`` hands the
connection back for the next request, or closes it when the answer was not read to its end.

Why not aiohttp, which it replaced (httpx before it): the cloud relay's own cost is what
Tandem competes on, and aiohttp's client request path (its request and response objects,
header multidicts, payload writers, timers) cost 0.38 ms of CPU a call against this
module's 0.13 ms on the same loopback upstream, alternating in one process (measured
2026-12-02; the README's performance section has the relay's figures). The parsing, the
part worth a library, is httptools' (llhttp, the parser uvicorn serves the platform with).

What it speaks: POST over http or https (the loop's TLS, the system's trust store), bodies
with a Content-Length, chunked, or ending with the connection, keep-alive. What it leaves
out, because an OpenAI-compatible API server needs none of it: redirects, proxies,
cookies, compression (it asks for ``identity``), HTTP/2, and retries (a POST is not
repeated behind the caller's back; the caller fails over to its next upstream).
"""

from __future__ import annotations

import asyncio
import collections
import functools
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, cast
from urllib.parse import quote, urlsplit

import httptools

if TYPE_CHECKING:
    from inference.upstream_pool import Pool

MAX_BUFFERED = 1 << 18  # bytes read ahead of the consumer before the socket is paused
MAX_LINE = 1 << 20  # a server-sent event line longer than this is not an answer


_URL_SAFE = "/?&=%:@!$'()*+,;~"  # what may stand in a request target as it is: the rest is percent-encoded


class HttpError(Exception):
    """The exchange failed: no connection, a reset, an answer cut off or not HTTP. Timeouts raise ``TimeoutError``."""


@dataclass(frozen=True)
class Target:
    """Where a URL points: the pool's key for its origin, how to connect, and the request line's parts."""

    origin: tuple[str, str, int]
    host: str
    port: int
    tls: bool
    path: bytes  # the request target: path and query
    host_header: bytes


@functools.lru_cache(maxsize=256)  # a handful of upstream URLs, parsed once each
def target_of(url: str) -> Target:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise HttpError(f"not an http(s) URL: {url!r}")
    if parts.username is not None:  # the key goes in its environment variable, never in a URL
        raise HttpError("an upstream URL with credentials in it is not used")
    tls = parts.scheme == "https"
    try:
        port = parts.port or (443 if tls else 80)
    except ValueError as exc:  # a port that is not a number, or out of range
        raise HttpError(f"bad port in {url!r}: {exc}") from None
    path = quote((parts.path or "/") + (f"?{parts.query}" if parts.query else ""), safe=_URL_SAFE)
    return Target(
        origin=(parts.scheme, parts.hostname, port),
        host=parts.hostname,
        port=port,
        tls=tls,
        path=path.encode("ascii"),
        host_header=_host_header(parts.hostname, parts.port, parts.netloc),
    )


def _host_header(hostname: str, port: int | None, netloc: str) -> bytes:
    """The Host header: the URL's host and port as written, a non-ASCII name in its IDNA form."""
    if netloc.isascii():
        return netloc.encode("ascii")
    return hostname.encode("idna") + (b":%d" % port if port else b"")


def request_head(target: Target, body_length: int, headers: Mapping[str, str]) -> bytes:
    """The request line and headers. A header with a line break in it is refused, never sent (header injection)."""
    lines = [
        b"POST " + target.path + b" HTTP/1.1",
        b"Host: " + target.host_header,
        b"Content-Type: application/json",
        b"Content-Length: " + str(body_length).encode(),
        b"Accept-Encoding: identity",
        b"User-Agent: tandem",
    ]
    for name, value in headers.items():
        line = f"{name}: {value}"
        if "\r" in line or "\n" in line:
            raise HttpError(f"the header {name!r} has a line break in it")
        lines.append(line.encode("latin-1"))
    lines.append(b"\r\n")
    return b"\r\n".join(lines)


class Response:
    """One answer: ``status`` and ``headers`` (lower-case names) once ``post`` returns, the body as it arrives."""

    def __init__(self, connection: Connection, read_timeout_s: float | None) -> None:
        self.status = 0
        self.headers: dict[str, str] = {}
        self._connection = connection
        self._read_timeout_s = read_timeout_s
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._head_done = False
        self._complete = False
        self._keep_alive = False
        self._length_known = False  # a Content-Length or chunked: else the body ends with the connection
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._released = False

    # --- the connection's side ---

    def _head_complete(self, status: int, keep_alive: bool) -> None:
        self.status, self._keep_alive, self._head_done = status, keep_alive, True
        self._length_known = "content-length" in self.headers or "chunked" in self.headers.get("transfer-encoding", "")
        self._wake()

    def _feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered > MAX_BUFFERED:
            self._connection.pause_reading()
        self._wake()

    def _finish(self) -> None:
        self._complete = True
        self._wake()

    def _lost(self, exc: BaseException | None) -> None:
        if self._complete:
            return
        if self._head_done and not self._length_known:  # a body that ends with the connection has ended
            self._keep_alive = False
            self._finish()
            return
        self._fail(HttpError(f"the connection closed before the answer ended{f': {exc}' if exc else ''}"))

    def _fail(self, error: BaseException) -> None:
        if self._error is None and not self._complete:
            self._error = error
            self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # --- the caller's side ---

    async def _wait(self) -> None:
        """Until the connection brings something: bytes, the end, or an error. ``TimeoutError`` after the read timeout."""
        if self._error is not None:
            raise self._error
        loop = asyncio.get_running_loop()
        self._waiter = waiter = loop.create_future()
        timer = None if self._read_timeout_s is None else loop.call_later(self._read_timeout_s, self._timed_out, waiter)
        try:
            await waiter
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()
        if self._error is not None:
            raise self._error

    def _timed_out(self, waiter: asyncio.Future[None]) -> None:
        if not waiter.done():
            waiter.set_exception(TimeoutError(f"no data from the upstream within {self._read_timeout_s:g} s"))

    async def until_head(self) -> None:
        """Until the status line and headers are in (the pool's ``post`` returns then)."""
        while not self._head_done:
            await self._wait()

    def _take(self) -> bytes:
        data = self._chunks.popleft()
        self._buffered -= len(data)
        if self._buffered <= MAX_BUFFERED // 2:
            self._connection.resume_reading()
        return data

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body's bytes as they arrive."""
        while True:
            if self._chunks:
                yield self._take()
            elif self._complete:
                return
            else:
                await self._wait()

    async def read(self) -> bytes:
        """The whole body (taken as it comes: a body past the read-ahead limit must not pause its own socket)."""
        parts: list[bytes] = []
        while True:
            while self._chunks:
                parts.append(self._take())
            if self._complete:
                return parts[0] if len(parts) == 1 else b"".join(parts)
            await self._wait()

    async def lines(self) -> AsyncIterator[bytes]:
        """The body split at ``\\n`` (without it): a server-sent event stream's lines."""
        tail = b""
        async for chunk in self.chunks():
            if tail:
                chunk = tail + chunk
            *complete, tail = chunk.split(b"\n")
            for line in complete:
                yield line
            if len(tail) > MAX_LINE:
                raise HttpError(f"the upstream sent a line longer than {MAX_LINE} bytes")
        if tail:
            yield tail

    def release(self) -> None:
        """The connection back to its pool when the answer was read to its end, else closed. Idempotent."""
        if self._released:
            return
        self._released = True
        reusable = self._complete and self._error is None and self._keep_alive and not self._chunks
        self._connection.done(reusable)

    async def __aenter__(self) -> Response:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


class Connection(asyncio.Protocol):
    """One keep-alive connection: the protocol asyncio drives, and httptools' parser's callbacks."""

    def __init__(self, pool: Pool, origin: tuple[str, str, int]) -> None:
        self._pool, self.origin = pool, origin
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._response: Response | None = None
        self._reusable = True  # false once the connection did something a reused one must not
        self._paused = False
        self.closed = False
        self.counted = False  # in its origin's count of open connections (from its connect until its close)
        self.expiry: asyncio.TimerHandle | None = None

    def send(self, response: Response, data: bytes) -> None:
        assert self._transport is not None and self._response is None
        self._response = response
        self._transport.write(data)

    def done(self, reusable: bool) -> None:
        """The response is finished with: keep the connection for the next one, or close it."""
        self._response = None
        if reusable and self._reusable and self.usable():
            self.resume_reading()
            self._pool.put(self)
        else:
            self.close()  # its place is freed when asyncio reports it closed (connection_lost)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def stop_expiry(self) -> None:
        if self.expiry is not None:
            self.expiry.cancel()
            self.expiry = None

    def usable(self) -> bool:
        return not self.closed and self._transport is not None and not self._transport.is_closing()

    def pause_reading(self) -> None:
        if not self._paused and self._transport is not None:
            self._paused = True
            self._transport.pause_reading()

    def resume_reading(self) -> None:
        if self._paused and self._transport is not None:
            self._paused = False
            self._transport.resume_reading()

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's transports are not asyncio.Transport instances

    def data_received(self, data: bytes) -> None:
        response = self._response
        if response is None:  # bytes nobody asked for: this connection cannot be trusted with the next request
            self._reusable = False
            self.close()
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._reusable = False
            response._fail(HttpError(f"the upstream's answer is not HTTP/1.1: {exc}"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._pool.lost(self)
        if self._response is not None:
            self._response._lost(exc)

    # httptools' callbacks

    def on_message_begin(self) -> None:
        if self._response is None or self._response._head_done:  # a second answer to one request
            self._reusable = False

    def on_header(self, name: bytes, value: bytes) -> None:
        assert self._response is not None
        headers = self._response.headers
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text

    def on_headers_complete(self) -> None:
        assert self._response is not None
        status = self._parser.get_status_code()
        if 100 <= status < 200:  # an interim answer (we send no Expect): the real one follows
            self._response.headers.clear()
            return
        self._response._head_complete(status, self._parser.should_keep_alive())

    def on_body(self, body: bytes) -> None:
        assert self._response is not None
        self._response._feed(body)

    def on_message_complete(self) -> None:
        response = self._response
        if response is not None and response._head_done:
            response._finish()
