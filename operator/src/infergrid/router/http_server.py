"""The router's client side: an HTTP/1.1 server on asyncio's Protocol API and `httptools` (the parser
uvicorn uses), with nothing per request beyond what a proxy needs.

aiohttp's server (request objects, a payload stream, response objects, header multidicts) cost more of the
router's CPU per request than the routing itself (bench/bench_router.py). Here a request is parsed into
raw header bytes plus a body that is read whole (up to the body limit) before the handler runs, and an
answer is one `transport.write` of bytes: a whole `Response`, or a head followed by chunks (`Stream`).

- Keep-alive and pipelining: requests on one connection are answered in order, one handler at a time.
- A client that goes away cancels its handler (the proxy then aborts the upstream connection, so the
  worker sees the disconnect and frees the request's KV blocks).
- Bodies over `max_body_bytes` are dropped as they arrive and answered 413; `Expect: 100-continue` is
  answered before the body is read; a malformed request gets a 400 and the connection closes.
- An idle keep-alive connection closes after `keepalive_timeout` seconds.
- Shutdown drains without resetting clients: in-flight answers finish and carry `Connection: close`;
  a keep-alive connection idle when it starts is closed only once it has been idle for
  `_DRAIN_IDLE_GRACE_S`. A client using it meanwhile (its next request may already be on the wire)
  gets an answer and `Connection: close` instead of a reset that it could not tell from a failure.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from http import HTTPStatus

import httptools

log = logging.getLogger(__name__)
_MAX_HEAD_BYTES = 64 * 1024
_DRAIN_IDLE_GRACE_S = 1.0
_REASONS = {status.value: status.phrase.encode() for status in HTTPStatus}


class Request:
    """One parsed request: method, raw target, headers as raw bytes (in order) and the whole body."""

    __slots__ = ("method", "raw_path", "path", "raw_headers", "headers", "body", "too_large", "keep_alive",
                 "http11")

    def __init__(self, method: str, raw_path: bytes, raw_headers: list[tuple[bytes, bytes]], body: bytes,
                 too_large: bool, keep_alive: bool, http11: bool) -> None:
        self.method = method
        self.raw_path = raw_path
        self.path = raw_path.split(b"?", 1)[0].decode("latin-1")
        self.raw_headers = raw_headers
        # lower-case name -> value (the last one wins), for the few headers the router reads
        self.headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in raw_headers}
        self.body = body
        self.too_large = too_large
        self.keep_alive = keep_alive
        self.http11 = http11


class Response:
    """A whole answer: status, headers and body (Content-Length is added when it is written)."""

    __slots__ = ("status", "headers", "body")

    def __init__(self, status: int, body: bytes = b"", headers: list[tuple[str, str]] | None = None,
                 content_type: str | None = None) -> None:
        self.status = status
        self.body = body
        self.headers = headers if headers is not None else []
        if content_type is not None:
            self.headers.append(("Content-Type", content_type))


def _head(status: int, headers: list[tuple[str, str]], framing: str) -> bytes:
    lines = [f"HTTP/1.1 {status} "]
    lines.append(_REASONS.get(status, b"Unknown").decode())
    lines.append("\r\n")
    for name, value in headers:
        lines.append(f"{name}: {value}\r\n")
    lines.append(framing)
    return "".join(lines).encode("latin-1", "replace")


class Stream:
    """An answer written as it is produced: the head at once, then each piece as one chunk."""

    __slots__ = ("_conn", "_chunked", "started", "finished")

    def __init__(self, conn: HttpConnection, request: Request) -> None:
        self._conn = conn
        self._chunked = request.http11
        self.started = self.finished = False

    async def start(self, status: int, headers: list[tuple[str, str]]) -> None:
        framing = "Transfer-Encoding: chunked\r\n\r\n" if self._chunked else "Connection: close\r\n\r\n"
        self.started = True
        await self._conn.send(_head(status, headers, framing))

    async def write(self, piece: bytes) -> None:
        """Send one piece (waiting while the client reads slower than the worker writes).
        Raises ConnectionResetError once the client has gone."""
        if piece:
            await self._conn.send(b"%x\r\n%b\r\n" % (len(piece), piece) if self._chunked else piece)

    async def finish(self) -> None:
        self.finished = True
        if self._chunked:
            await self._conn.send(b"0\r\n\r\n")
        else:
            self._conn.close()


Handler = Callable[[Request, Stream], Awaitable[Response | None]]


class HttpConnection(asyncio.Protocol):
    """One client connection: parse requests, run the handler for each in turn, write the answers."""

    def __init__(self, handler: Handler, max_body_bytes: int, keepalive_timeout: float,
                 connections: set[HttpConnection]) -> None:
        self._handler = handler
        self._connections = connections
        self.draining = False  # shutting down: answer what is in flight, then close
        self._max_body = max_body_bytes
        self._keepalive_timeout = keepalive_timeout
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._pending: deque[Request] = deque()
        self._task: asyncio.Task[None] | None = None
        self._idle_timer: asyncio.TimerHandle | None = None
        self._writable: asyncio.Future[None] | None = None
        self._closed = False
        self.idle_since = 0.0  # loop time when it last became idle (no request being answered)
        self._reset()

    def _reset(self) -> None:
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._head_bytes = 0
        self._body: list[bytes] = []
        self._body_size = 0
        self._too_large = False

    # ------------------------------------------------------------------------------- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        self._connections.add(self)
        self._arm_idle_timer()

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._refuse(400, "protocol upgrades are not supported")
        except httptools.HttpParserError as exc:  # a callback's exception arrives wrapped in one
            if self._head_bytes > _MAX_HEAD_BYTES:
                self._refuse(431, f"request head exceeds {_MAX_HEAD_BYTES} bytes")
            else:
                self._refuse(400, f"malformed HTTP request: {exc}")

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._connections.discard(self)
        if self._task is not None and not self._task.done():
            self._task.cancel()
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)  # a writer waiting to send sees `_closed` and stops

    def pause_writing(self) -> None:
        if self._writable is None or self._writable.done():
            self._writable = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)

    # ------------------------------------------------------------------------------- httptools callbacks
    def on_message_begin(self) -> None:
        self._reset()
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._head_bytes += len(url)
        if self._head_bytes > _MAX_HEAD_BYTES:
            raise _HeadTooLarge

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))
        self._head_bytes += len(name) + len(value)
        if self._head_bytes > _MAX_HEAD_BYTES:
            raise _HeadTooLarge

    def on_headers_complete(self) -> None:
        for name, value in self._headers:
            lname = name.lower()
            if lname == b"content-length" and value.strip().isdigit() and int(value) > self._max_body:
                self._too_large = True
            elif lname == b"expect" and value.strip().lower() == b"100-continue" and not self._too_large:
                self.send_now(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        self._body_size += len(body)
        if self._body_size > self._max_body:
            self._too_large = True
            self._body.clear()
        elif not self._too_large:
            self._body.append(body)

    def on_message_complete(self) -> None:
        parser = self._parser
        request = Request(parser.get_method().decode("latin-1"), self._url, self._headers,
                          b"".join(self._body), self._too_large, parser.should_keep_alive(),
                          parser.get_http_version() == "1.1")
        self._reset()
        self._pending.append(request)
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._serve())
        elif len(self._pending) > 8 and self._transport is not None:
            self._transport.pause_reading()  # a client pipelining far ahead waits for its answers

    # ------------------------------------------------------------------------------- serving
    async def _serve(self) -> None:
        """Answer the queued requests in order (one handler at a time per connection)."""
        while self._pending and not self._closed:
            request = self._pending.popleft()
            stream = Stream(self, request)
            try:
                response = await self._handler(request, stream)
            except asyncio.CancelledError:
                self.close()
                raise
            except ConnectionResetError:
                self.close()
                break
            except Exception:
                log.exception("handler failed for %s %s", request.method, request.path)
                if stream.started:
                    self.close()
                    break
                response = Response(500, b'{"error": {"message": "internal router error", "type": '
                                         b'"server_error", "param": null, "code": null}}', [],
                                    "application/json")
            if response is not None:
                self._write_response(request, response)
            elif not stream.finished:
                self.close()  # a stream the handler left unfinished cannot be framed: end the connection
            if not request.keep_alive or self.draining:
                self.close()
                break
            if self._transport is not None and len(self._pending) <= 8:
                self._transport.resume_reading()
        self._task = None
        self._arm_idle_timer()

    def _write_response(self, request: Request, response: Response) -> None:
        body = response.body
        framing = f"Content-Length: {len(body)}\r\n"
        if not request.keep_alive or self.draining:
            framing += "Connection: close\r\n"
        head = _head(response.status, response.headers, framing + "\r\n")
        self.send_now(head if request.method == "HEAD" else head + body)

    async def send(self, data: bytes) -> None:
        """Write, then wait while the transport's buffer is over its high-water mark."""
        if self._closed or self._transport is None or self._transport.is_closing():
            raise ConnectionResetError("the client closed the connection")
        self._transport.write(data)
        if self._writable is not None and not self._writable.done():
            await self._writable
            if self._closed:
                raise ConnectionResetError("the client closed the connection")

    def send_now(self, data: bytes) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)

    def _refuse(self, status: int, message: str) -> None:
        body = (b'{"error": {"message": "%b", "type": "invalid_request_error", "param": null, "code": null}}'
                % message.replace('"', "'").encode("latin-1", "replace"))
        self.send_now(_head(status, [("Content-Type", "application/json")],
                            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n") + body)
        self.close()

    def close(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()

    @property
    def idle(self) -> bool:
        return self._task is None

    def _arm_idle_timer(self) -> None:
        if self._closed or self._task is not None:
            return
        self.idle_since = asyncio.get_running_loop().time()
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        self._idle_timer = asyncio.get_running_loop().call_later(self._keepalive_timeout, self.close)


class _HeadTooLarge(Exception):
    pass


class HttpServer:
    """The listening socket and its connections; `shutdown` drains in-flight requests."""

    def __init__(self, handler: Handler, max_body_bytes: int, keepalive_timeout: float = 75.0) -> None:
        self._handler = handler
        self._max_body = max_body_bytes
        self._keepalive_timeout = keepalive_timeout
        self.connections: set[HttpConnection] = set()
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> None:
        """Listen on HOST:PORT."""
        self._server = await asyncio.get_running_loop().create_server(
            lambda: HttpConnection(self._handler, self._max_body, self._keepalive_timeout, self.connections),
            host, port, backlog=1024, reuse_address=True)

    async def shutdown(self, timeout: float) -> None:
        """Stop accepting; let in-flight requests finish (each connection closes after its current
        answer) and close connections idle for `_DRAIN_IDLE_GRACE_S` (module docstring), for up to
        `timeout` seconds; then close what is left."""
        if self._server is not None:
            self._server.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        for conn in list(self.connections):
            conn.draining = True
        while self.connections and loop.time() < deadline:
            now = loop.time()
            for conn in list(self.connections):
                if conn.idle and now - conn.idle_since >= _DRAIN_IDLE_GRACE_S:
                    conn.close()
            await asyncio.sleep(0.05)
        for conn in list(self.connections):
            conn.close()
