"""The platform server's HTTP protocol: uvicorn's httptools protocol, its writes of one loop turn sent together.

uvicorn writes a response's status line and headers as soon as the app sends
``http.response.start``, and its body with the next message: two ``send(2)`` calls, two
TCP segments and two wake-ups of the client for every answer, even one whose head and
body the app sends back to back (Django does, for every non-streaming response). On a
loopback socket, and more so on a virtual machine, each ``send(2)`` carries the cost of
waking the reader up; profiled under the relay benchmark, the server's socket writes were
a tenth of its CPU per request.

:class:`CoalescingTransport` keeps what is written during one turn of the event loop and
sends it with one ``write`` at the end of that turn (``call_soon``). A head and a body sent
back to back leave as one segment; a streamed answer's chunks, each sent on its own turn,
still leave one by one, as early as before. Closing sends what is kept first. Everything
else a transport does is the wrapped transport's.

A response that is complete leaves at once (:meth:`CoalescingHttpToolsProtocol.on_response_complete`),
not at the end of the turn: where many answers end together (sessions that started together
finish on one decode step), every view of the turn ran before the first reply left, and each
client waited for all of them (demo pair, 16 sessions: 16 replies written together ~8 ms after
the last step, each view's own work done by 1.8-8 ms).
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class CoalescingTransport:
    """A transport whose writes within one turn of the event loop go out in one write of the transport it wraps."""

    __slots__ = ("_transport", "_loop", "_pending", "_scheduled")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []
        self._scheduled = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        self._pending.append(bytes(data))
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._flush)

    def writelines(self, lines: Any) -> None:
        for data in lines:
            self.write(data)

    def flush(self) -> None:
        """Send what this turn has written so far now (the turn's scheduled flush then finds less, or nothing)."""
        pending = self._pending
        if not pending:
            return
        data = pending[0] if len(pending) == 1 else b"".join(pending)
        pending.clear()
        if not self._transport.is_closing():  # the peer left: what was kept has nowhere to go
            self._transport.write(data)

    def _flush(self) -> None:
        self._scheduled = False
        self.flush()

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + sum(map(len, self._pending))

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def abort(self) -> None:
        self._pending.clear()
        self._transport.abort()

    def __getattr__(self, name: str) -> Any:  # is_closing, get_extra_info, pause_reading, set_protocol...
        return getattr(self._transport, name)


class CoalescingHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol on a :class:`CoalescingTransport` (a websocket upgrade keeps it too)."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(CoalescingTransport(transport, self.loop))  # type: ignore[arg-type]

    def on_response_complete(self) -> None:
        """The response's last bytes are written: they leave now, with whatever of it the turn kept."""
        transport: CoalescingTransport = self.transport  # type: ignore[assignment]  # (``connection_made``'s)
        transport.flush()
        super().on_response_complete()
