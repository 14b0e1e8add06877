"""The cloud tier's HTTP client against servers written here byte by byte: bodies, keep-alive, failures, TLS, limits."""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import Awaitable, Callable

import pytest
import pytest_asyncio

from inference.upstream_http import HttpError, target_of
from inference.upstream_pool import Pool

pytestmark = pytest.mark.asyncio

BODY = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()
Answer = Callable[[asyncio.StreamWriter, dict], Awaitable[None]]


class RawServer:
    """A loopback server that reads each request (head and Content-Length body) and lets ``answer`` write bytes."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.connections = 0
        self.open = 0
        self.requests: list[dict] = []
        self.closed = asyncio.Event()  # set whenever a connection ends
        self.server: asyncio.Server | None = None

    async def start(self, tls: ssl.SSLContext | None = None) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=tls)
        port = self.server.sockets[0].getsockname()[1]
        return f"{'https' if tls else 'http'}://{'localhost' if tls else '127.0.0.1'}:{port}/v1/chat/completions"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open += 1
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
                body = await reader.readexactly(int(headers.get("Content-Length", "0")))
                request = {"line": lines[0], "headers": headers, "body": body, "reader": reader}
                self.requests.append(request)
                await self.answer(writer, request)
                if writer.is_closing():
                    return
        finally:
            self.open -= 1
            writer.close()
            self.closed.set()

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


@pytest_asyncio.fixture
async def serve():
    servers: list[RawServer] = []

    async def start(answer: Answer, tls: ssl.SSLContext | None = None) -> tuple[RawServer, str]:
        server = RawServer(answer)
        servers.append(server)
        return server, await server.start(tls)

    yield start
    for server in servers:
        await server.stop()


def whole(body: bytes, status: int = 200, extra: bytes = b"") -> Answer:
    async def answer(writer: asyncio.StreamWriter, request: dict) -> None:
        head = b"HTTP/1.1 %d OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n" % (status, len(body))
        writer.write(head + extra + b"\r\n" + body)
        await writer.drain()

    return answer


async def test_a_body_with_a_length_is_read_whole_and_its_connection_reused(serve):
    server, url = await serve(whole(b'{"ok": true}'))
    pool = Pool()
    for _ in range(3):
        async with await pool.post(url, BODY, {"Authorization": "Bearer k"}) as response:
            assert (response.status, await response.read()) == (200, b'{"ok": true}')
            assert response.headers["content-type"] == "application/json"
    assert server.connections == 1
    request = server.requests[0]
    assert request["line"] == "POST /v1/chat/completions HTTP/1.1"
    assert request["body"] == BODY
    assert request["headers"]["Authorization"] == "Bearer k"
    assert request["headers"]["Host"] == url.split("/")[2]
    assert request["headers"]["Accept-Encoding"] == "identity"
    pool.close()


async def test_a_chunked_event_stream_is_read_line_by_line_across_chunk_and_packet_boundaries(serve):
    events = [b'data: {"n": 1}\n\n', b'data: {"n": 2}\n\n', b"data: [DONE]\n\n"]
    wire = b"".join(events)

    async def answer(writer: asyncio.StreamWriter, request: dict) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        for piece in (wire[:7], wire[7:20], wire[20:]):  # lines cut mid-way by the chunks
            writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            await writer.drain()
            await asyncio.sleep(0)
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    server, url = await serve(answer)
    pool = Pool()
    for _ in range(2):
        async with await pool.post(url, BODY, {}) as response:
            lines = [line async for line in response.lines()]
        assert lines == [b'data: {"n": 1}', b"", b'data: {"n": 2}', b"", b"data: [DONE]", b""]
    assert server.connections == 1  # the chunked body's end was seen: the connection was kept
    pool.close()


def then_close(raw: bytes) -> Answer:
    """An answer of these bytes, after which the server closes the connection."""

    async def answer(writer: asyncio.StreamWriter, request: dict) -> None:
        writer.write(raw)
        await writer.drain()
        writer.close()

    return answer


async def test_a_body_that_ends_with_the_connection_is_whole_and_the_connection_not_kept(serve):
    server, url = await serve(then_close(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + b"x" * 5000))
    pool = Pool()
    for _ in range(2):
        async with await pool.post(url, BODY, {}) as response:
            assert await response.read() == b"x" * 5000
    assert server.connections == 2
    pool.close()


async def test_no_server_is_an_http_error():
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    with pytest.raises(HttpError, match="cannot connect"):
        await Pool().post(f"http://127.0.0.1:{port}/v1", BODY, {})


async def test_a_server_that_never_answers_is_a_timeout_and_its_connection_is_dropped(serve):
    async def answer(writer: asyncio.StreamWriter, request: dict) -> None:
        await request["reader"].read()  # no answer: waits until the client gives up and closes

    server, url = await serve(answer)
    with pytest.raises(TimeoutError):
        await Pool().post(url, BODY, {}, read_timeout_s=0.05)
    await asyncio.wait_for(server.closed.wait(), 5)


async def test_a_body_cut_off_is_an_http_error(serve):
    _, url = await serve(then_close(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"y" * 10))
    async with await Pool().post(url, BODY, {}) as response:
        with pytest.raises(HttpError, match="closed before the answer ended"):
            await response.read()


async def test_an_answer_that_is_not_http_is_an_http_error(serve):
    async def answer(writer: asyncio.StreamWriter, request: dict) -> None:
        writer.write(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")
        await writer.drain()

    _, url = await serve(answer)
    with pytest.raises(HttpError, match="not HTTP"):
        await Pool().post(url, BODY, {})


async def test_a_response_left_before_its_end_closes_its_connection(serve):
    server, url = await serve(whole(b"z" * 100))
    pool = Pool()
    async with await pool.post(url, BODY, {}) as response:
        assert response.status == 200  # the body is never read
    async with await pool.post(url, BODY, {}) as response:
        assert await response.read() == b"z" * 100
    assert server.connections == 2
    pool.close()


async def test_an_error_status_is_an_answer_with_its_body(serve):
    _, url = await serve(whole(b'{"error": {"message": "no such model"}}', status=404))
    async with await Pool().post(url, BODY, {}) as response:
        assert response.status == 404
        assert json.loads(await response.read())["error"]["message"] == "no such model"


async def test_a_compressed_answer_though_identity_was_asked_is_an_http_error(serve):
    _, url = await serve(whole(b"\x1f\x8b compressed", extra=b"Content-Encoding: gzip\r\n"))
    with pytest.raises(HttpError, match="encoded its answer"):
        await Pool().post(url, BODY, {})


async def test_a_header_with_a_line_break_is_refused_before_anything_is_sent(serve):
    server, url = await serve(whole(b"{}"))
    with pytest.raises(HttpError, match="line break"):
        await Pool().post(url, BODY, {"Authorization": "Bearer k\r\nX-Evil: 1"})
    assert server.connections == 0


async def test_a_connection_the_server_closed_while_idle_is_not_reused(serve):
    async def answer(writer: asyncio.StreamWriter, request: dict) -> None:
        await whole(b"{}")(writer, request)
        writer.close()  # keeps nothing alive, but says nothing about it

    server, url = await serve(answer)
    pool = Pool()
    async with await pool.post(url, BODY, {}) as response:
        await response.read()
    await asyncio.wait_for(server.closed.wait(), 5)
    await asyncio.sleep(0.01)  # the client's side sees the close on its next turn of the loop
    async with await pool.post(url, BODY, {}) as response:
        assert await response.read() == b"{}"
    assert server.connections == 2
    pool.close()


async def test_idle_connections_are_closed_after_the_keepalive(serve):
    server, url = await serve(whole(b"{}"))
    pool = Pool(keepalive_s=0.05)
    async with await pool.post(url, BODY, {}) as response:
        await response.read()
    await asyncio.wait_for(server.closed.wait(), 5)
    assert server.open == 0


async def test_at_most_max_per_origin_connections_are_open_and_the_rest_wait(serve):
    gate = asyncio.Event()
    most = 0

    async def answer(writer: asyncio.StreamWriter, request: dict) -> None:
        nonlocal most
        most = max(most, server.open)
        await gate.wait()
        await whole(b"{}")(writer, request)

    server, url = await serve(answer)
    pool = Pool(max_per_origin=2)

    async def one() -> bytes:
        async with await pool.post(url, BODY, {}) as response:
            return await response.read()

    calls = [asyncio.create_task(one()) for _ in range(5)]
    while len(server.requests) < 2:
        await asyncio.sleep(0.005)
    gate.set()
    assert await asyncio.gather(*calls) == [b"{}"] * 5
    assert most == 2 and server.connections == 2
    pool.close()


async def test_a_caller_that_leaves_while_waiting_for_a_connection_takes_nothing_with_it(serve):
    server, url = await serve(whole(b"{}"))
    pool = Pool(max_per_origin=1)
    first = await pool.post(url, BODY, {})
    leaving = asyncio.create_task(pool.post(url, BODY, {}))
    staying = asyncio.create_task(pool.post(url, BODY, {}))
    await asyncio.sleep(0.01)
    leaving.cancel()
    async with first:
        await first.read()
    async with await staying as response:
        assert await response.read() == b"{}"
    with pytest.raises(asyncio.CancelledError):
        await leaving
    assert server.connections == 1
    pool.close()


async def test_a_large_body_comes_whole_through_the_read_ahead_limit(serve):
    big = bytes(range(256)) * 8192  # 2 MiB, eight times the read-ahead

    async def answer(writer: asyncio.StreamWriter, request: dict) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(big))
        for i in range(0, len(big), 65536):
            writer.write(big[i : i + 65536])
            await writer.drain()

    _, url = await serve(answer)
    pool = Pool()
    received = bytearray()
    async with await pool.post(url, BODY, {}) as response:
        async for chunk in response.chunks():
            received += chunk
            await asyncio.sleep(0)  # a slow reader
    assert bytes(received) == big
    pool.close()


async def test_a_large_body_read_whole_is_not_stalled_by_the_read_ahead_limit(serve):
    big = b"z" * (3 << 20)  # twelve times the read-ahead: a whole read must keep the socket reading
    _, url = await serve(whole(big))
    pool = Pool()
    async with await pool.post(url, BODY, {}, read_timeout_s=5) as response:
        assert await response.read() == big
    pool.close()


async def test_https_with_the_pools_trust(serve):
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(server_tls)
    client_tls = ssl.create_default_context()
    ca.configure_trust(client_tls)
    _, url = await serve(whole(b'{"tls": true}'), tls=server_tls)
    pool = Pool(tls=client_tls)
    async with await pool.post(url, BODY, {}) as response:
        assert await response.read() == b'{"tls": true}'
    with pytest.raises(HttpError, match="cannot connect"):  # the system's trust store does not know the test CA
        await Pool().post(url, BODY, {})
    pool.close()


@pytest.mark.filterwarnings("ignore::pytest.PytestWarning")  # the module's asyncio mark on a plain test
def test_urls_are_parsed_once_into_what_the_request_needs():
    target = target_of("https://bücher.example/v1/a b?x=1")
    assert (target.host, target.port, target.tls) == ("bücher.example", 443, True)
    assert target.host_header == b"xn--bcher-kva.example"
    assert target.path == b"/v1/a%20b?x=1"
    with pytest.raises(HttpError, match="credentials"):
        target_of("http://user:secret@host/v1")
    with pytest.raises(HttpError, match="not an http"):
        target_of("ftp://host/v1")


@pytest.mark.filterwarnings("ignore::pytest.PytestWarning")  # the module's asyncio mark on a plain test
def test_the_client_works_on_uvloop_as_the_platform_serves_it():
    uvloop = pytest.importorskip("uvloop")

    async def exchange() -> tuple[bytes, int]:
        server = RawServer(whole(b'{"loop": "uv"}'))
        url = await server.start()
        pool = Pool()
        try:
            for _ in range(2):
                async with await pool.post(url, BODY, {}) as response:
                    body = await response.read()
            return body, server.connections
        finally:
            pool.close()
            await server.stop()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        assert runner.run(exchange()) == (b'{"loop": "uv"}', 1)
