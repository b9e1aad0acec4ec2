"""The router's HTTP/1.1 server (http_server.py) over real sockets: framing, keep-alive and pipelining,
limits, malformed input, client disconnects and the drain on shutdown."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from infergrid.router.http_server import HttpServer, Request, Response, Stream

pytestmark = pytest.mark.asyncio
MAX_BODY = 1000


class App:
    """A handler that echoes, streams, or waits, and remembers what it saw."""

    def __init__(self) -> None:
        self.seen: list[Request] = []
        self.cancelled = asyncio.Event()
        self.release = asyncio.Event()

    async def __call__(self, request: Request, stream: Stream) -> Response | None:
        self.seen.append(request)
        if request.too_large:
            return Response(413, b"too large")
        if request.path == "/stream":
            await stream.start(200, [("Content-Type", "text/event-stream")])
            for i in range(3):
                await stream.write(b"data: %d\n\n" % i)
            await stream.finish()
            return None
        if request.path == "/wait":
            try:
                await self.release.wait()
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
            return Response(200, b"released")
        if request.path == "/boom":
            raise RuntimeError("handler bug")
        return Response(200, b"%s %s %s" % (request.method.encode(), request.raw_path, request.body),
                        [("X-Seen", request.headers.get("x-test", "-"))])


@pytest_asyncio.fixture
async def served() -> AsyncIterator[tuple[App, HttpServer, int]]:
    app = App()
    server = HttpServer(app, MAX_BODY, keepalive_timeout=0.5)
    await server.start("127.0.0.1", 0)
    port = server._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield app, server, port
    await server.shutdown(1.0)


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = (await reader.readuntil(b"\r\n\r\n")).decode()
    lines = head.split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
    if "content-length" in headers:
        return status, headers, await reader.readexactly(int(headers["content-length"]))
    if headers.get("transfer-encoding") == "chunked":
        body = b""
        while (size := int((await reader.readuntil(b"\r\n")).strip(), 16)) != 0:
            body += (await reader.readexactly(size + 2))[:-2]
        await reader.readuntil(b"\r\n")
        return status, headers, body
    return status, headers, await reader.read()


async def test_keep_alive_and_pipelined_requests_answer_in_order(served: tuple[App, HttpServer, int]) -> None:
    app, _, port = served
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /a?x=1 HTTP/1.1\r\nHost: h\r\nX-Test: one\r\nContent-Length: 3\r\n\r\nabc"
                 b"GET /b HTTP/1.1\r\nHost: h\r\n\r\n")
    assert await read_response(reader) == (200, {"x-seen": "one", "content-length": "15"}, b"POST /a?x=1 abc")
    status, _, body = await read_response(reader)
    assert (status, body) == (200, b"GET /b ")
    writer.write(b"GET /c HTTP/1.1\r\nHost: h\r\n\r\n")  # the same connection stays usable
    assert (await read_response(reader))[2] == b"GET /c "
    assert [r.path for r in app.seen] == ["/a", "/b", "/c"]
    writer.close()


async def test_chunked_request_body_and_expect_continue(served: tuple[App, HttpServer, int]) -> None:
    _, _, port = served
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /e HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n")
    assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
    writer.write(b"hi")
    assert (await read_response(reader))[2] == b"POST /e hi"
    writer.write(b"POST /c HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
    assert (await read_response(reader))[2] == b"POST /c abcde"
    writer.close()


@pytest.mark.parametrize("framing", ["declared", "chunked"])
async def test_body_over_the_limit_is_flagged_and_not_kept(served: tuple[App, HttpServer, int], framing: str) -> None:
    app, _, port = served
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    big = b"x" * (MAX_BODY + 1)
    if framing == "declared":
        writer.write(b"POST /big HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n\r\n%b" % (len(big), big))
    else:
        writer.write(b"POST /big HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n%b\r\n0\r\n\r\n"
                     % (len(big), big))
    assert (await read_response(reader))[0] == 413
    assert app.seen[-1].too_large and app.seen[-1].body == b""
    writer.close()


@pytest.mark.parametrize(("raw", "status"), [
    (b"NOT-HTTP\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: h\r\nContent-Length: nope\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n", 431),
])
async def test_malformed_or_huge_heads_get_an_error_and_the_connection_closes(
        served: tuple[App, HttpServer, int], raw: bytes, status: int) -> None:
    app, _, port = served
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    got, headers, body = await asyncio.wait_for(read_response(reader), 5)
    assert got == status and headers["connection"] == "close" and b'"error"' in body
    assert await asyncio.wait_for(reader.read(), 5) == b""  # closed
    assert app.seen == []


async def test_streams_are_chunked_for_http11_and_close_delimited_for_http10(
        served: tuple[App, HttpServer, int]) -> None:
    _, _, port = served
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /stream HTTP/1.1\r\nHost: h\r\n\r\n")
    status, headers, body = await read_response(reader)
    assert headers["transfer-encoding"] == "chunked" and body == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"
    writer.close()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /stream HTTP/1.0\r\n\r\n")
    status, headers, body = await read_response(reader)
    assert headers["connection"] == "close" and body == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"


async def test_handler_error_is_a_500_and_head_has_no_body(served: tuple[App, HttpServer, int]) -> None:
    _, _, port = served
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /boom HTTP/1.1\r\nHost: h\r\n\r\n")
    status, _, body = await read_response(reader)
    assert status == 500 and b"internal router error" in body
    writer.write(b"HEAD /x HTTP/1.1\r\nHost: h\r\n\r\nGET /y HTTP/1.1\r\nHost: h\r\n\r\n")
    head = await reader.readuntil(b"\r\n\r\n")
    assert b"Content-Length: 8" in head  # what a GET would have had ("HEAD /x "), without the bytes
    assert (await read_response(reader))[2] == b"GET /y "
    writer.close()


async def test_client_disconnect_cancels_the_handler(served: tuple[App, HttpServer, int]) -> None:
    app, _, port = served
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /wait HTTP/1.1\r\nHost: h\r\n\r\n")
    await writer.drain()
    while not app.seen:
        await asyncio.sleep(0.01)
    writer.transport.abort()
    await asyncio.wait_for(app.cancelled.wait(), 5)


async def test_idle_keep_alive_connections_close(served: tuple[App, HttpServer, int]) -> None:
    _, server, port = served
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /a HTTP/1.1\r\nHost: h\r\n\r\n")
    await read_response(reader)
    assert await asyncio.wait_for(reader.read(), 3) == b""  # keepalive_timeout is 0.5 s here
    assert not server.connections


async def test_shutdown_finishes_in_flight_requests_and_closes_idle_ones(served: tuple[App, HttpServer, int]) -> None:
    app, server, port = served
    idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", port)
    idle_writer.write(b"GET /a HTTP/1.1\r\nHost: h\r\n\r\n")
    await read_response(idle_reader)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /wait HTTP/1.1\r\nHost: h\r\n\r\n")
    while len(app.seen) < 2:
        await asyncio.sleep(0.01)
    drained = asyncio.get_running_loop().create_task(server.shutdown(10.0))
    assert await asyncio.wait_for(idle_reader.read(), 3) == b""  # the idle one closes after its grace
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)  # no longer accepting
    app.release.set()
    status, headers, body = await read_response(reader)
    assert (status, body, headers["connection"]) == (200, b"released", "close")
    await asyncio.wait_for(drained, 5)
    assert not app.cancelled.is_set()


async def test_a_request_on_an_idle_connection_during_shutdown_is_answered_not_reset(
        served: tuple[App, HttpServer, int]) -> None:
    """A keep-alive client's next request may be on the wire when the drain starts: it gets its answer
    with `Connection: close` (a reset would look like a failed request to a client that cannot retry)."""
    _, server, port = served
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /a HTTP/1.1\r\nHost: h\r\n\r\n")
    await read_response(reader)
    drained = asyncio.get_running_loop().create_task(server.shutdown(10.0))
    await asyncio.sleep(0.2)  # the drain has started; the connection is still idle
    writer.write(b"GET /b HTTP/1.1\r\nHost: h\r\n\r\n")
    status, headers, body = await read_response(reader)
    assert (status, body, headers["connection"]) == (200, b"GET /b ", "close")
    assert await asyncio.wait_for(reader.read(), 3) == b""
    await asyncio.wait_for(drained, 5)
