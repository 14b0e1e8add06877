"""The server's coalescing transport: a turn's writes leave in one write, in order, and nothing is lost at a close."""

from __future__ import annotations

import asyncio
import socket
import threading

import pytest
import uvicorn

from config.http_writes import CoalescingHttpToolsProtocol, CoalescingTransport


class RecordingTransport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = self.aborted = self.eof = False
        self.closing = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def is_closing(self) -> bool:
        return self.closing

    def get_write_buffer_size(self) -> int:
        return 0

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True

    def write_eof(self) -> None:
        self.eof = True

    def get_extra_info(self, name: str, default: object = None) -> object:
        return {"peername": ("127.0.0.1", 1)}.get(name, default)


@pytest.mark.asyncio
async def test_writes_of_one_turn_leave_together_and_the_next_turns_apart():
    inner = RecordingTransport()
    transport = CoalescingTransport(inner, asyncio.get_running_loop())  # type: ignore[arg-type]
    transport.write(b"HTTP/1.1 200 OK\r\n\r\n")
    transport.write(bytearray(b"body"))
    assert inner.writes == [] and transport.get_write_buffer_size() == 23
    await asyncio.sleep(0)
    assert inner.writes == [b"HTTP/1.1 200 OK\r\n\r\nbody"]
    transport.write(b"chunk")
    await asyncio.sleep(0)
    assert inner.writes[1:] == [b"chunk"]


@pytest.mark.asyncio
async def test_close_and_eof_send_what_is_kept_first_and_abort_drops_it():
    inner = RecordingTransport()
    transport = CoalescingTransport(inner, asyncio.get_running_loop())  # type: ignore[arg-type]
    transport.write(b"last words")
    transport.close()
    assert inner.writes == [b"last words"] and inner.closed
    transport.write(b"tail")
    transport.write_eof()
    assert inner.writes[-1] == b"tail" and inner.eof
    transport.write(b"dropped")
    transport.abort()
    await asyncio.sleep(0)
    assert inner.writes[-1] == b"tail" and inner.aborted


@pytest.mark.asyncio
async def test_nothing_is_written_to_a_transport_that_is_closing():
    inner = RecordingTransport()
    transport = CoalescingTransport(inner, asyncio.get_running_loop())  # type: ignore[arg-type]
    transport.write(b"too late")
    inner.closing = True
    await asyncio.sleep(0)
    assert inner.writes == []
    assert transport.get_extra_info("peername") == ("127.0.0.1", 1)  # the rest is the wrapped transport's


async def app(scope, receive, send):
    assert scope["type"] == "http"
    await receive()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"5")]})
    await send({"type": "http.response.body", "body": b"hello"})
    SENT_BY_THEN.append(len(WRITES))  # still in the view's turn of the loop: what had reached the socket


SENT_BY_THEN: list[int] = []


WRITES: list[bytes] = []  # what reached the socket's transport, write by write


class CountingTransport:
    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport

    def write(self, data: bytes) -> None:
        WRITES.append(bytes(data))
        self._transport.write(data)

    def __getattr__(self, name: str):
        return getattr(self._transport, name)


class CountedProtocol(CoalescingHttpToolsProtocol):
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(CountingTransport(transport))  # type: ignore[arg-type]


def test_through_uvicorn_a_response_head_and_body_leave_in_one_write_as_soon_as_it_is_complete():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = uvicorn.Config(app, port=port, http=CountedProtocol, lifespan="off", log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        client = None
        for _ in range(250):
            try:
                client = socket.create_connection(("127.0.0.1", port), timeout=5)
                break
            except ConnectionRefusedError:
                threading.Event().wait(0.02)
        assert client is not None, "the server did not start"
        with client:
            for _ in range(2):  # keep-alive: the second answer too
                client.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                received = b""
                while not received.endswith(b"hello"):
                    received += client.recv(65536)
                assert received.startswith(b"HTTP/1.1 200 OK\r\n")
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    assert len(WRITES) == 2 and all(w.startswith(b"HTTP/1.1 200 OK") and w.endswith(b"hello") for w in WRITES)
    # a complete response leaves at once, not after every other ready view of the loop's turn has run
    assert SENT_BY_THEN == [1, 2]
