"""Keep-alive HTTP/1.1 connections to workers, and just enough response parsing to relay an answer.

The router's hot path used aiohttp's client, whose per-request machinery (URL objects, tracing, cookie
jar, timers, a full response parser) cost more CPU than everything else the router does. Here a request
is one `write` of bytes the proxy already built, and a response is its head (status, headers, framing)
plus its body read by Content-Length, chunk by chunk (`Transfer-Encoding: chunked`, how SSE streams
arrive), or to the end of the connection.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

# Headers that describe one hop, not the message (RFC 9110 7.6.1); the proxy sets its own framing.
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
                        "trailer", "transfer-encoding", "upgrade", "host", "content-length", "expect"})
_KEEPALIVE_S = 4.0  # below uvicorn's 5 s, so the router never reuses a connection the worker is closing
_MAX_IDLE_PER_WORKER = 64


class ConnectError(Exception):
    """No connection could be opened: nothing was sent."""

    def __init__(self, detail: str, timed_out: bool) -> None:
        super().__init__(detail)
        self.timed_out = timed_out


class BrokenResponse(Exception):
    """The worker closed or reset the connection, or sent something that is not an HTTP response."""


class WorkerAborted(BrokenResponse):
    """The router cut the connection because the worker stopped answering (pool.py `on_wedged`)."""


class Connection:
    """One TCP connection to a worker."""

    __slots__ = ("reader", "writer", "idle_since", "aborted", "_busy")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 busy: set[Connection]) -> None:
        self.reader, self.writer = reader, writer
        self.idle_since = 0.0
        self.aborted: str | None = None  # why the router cut it mid-request (a wedged worker)
        self._busy = busy  # the worker's connections carrying a request
        busy.add(self)

    def close(self) -> None:
        self._busy.discard(self)
        self.writer.transport.abort()  # no graceful close: the worker must see the disconnect now


class ResponseHead:
    """Status, end-to-end headers (hop-by-hop ones dropped) and how the body is framed."""

    __slots__ = ("status", "headers", "length", "chunked", "keep_alive")

    def __init__(self, raw: bytes) -> None:
        lines = raw.decode("latin-1").split("\r\n")
        try:
            version, status, *_ = lines[0].split(" ", 2)
            self.status = int(status)
        except ValueError:
            raise BrokenResponse(f"bad status line {lines[0][:80]!r}") from None
        self.headers: list[tuple[str, str]] = []
        self.length: int | None = None
        self.chunked = False
        self.keep_alive = version == "HTTP/1.1"
        for line in lines[1:]:
            if not line:
                continue
            name, _, value = line.partition(":")
            value = value.strip()
            lname = name.lower()
            if lname not in HOP_BY_HOP:
                self.headers.append((name, value))
            elif lname == "content-length":
                try:
                    self.length = int(value)
                except ValueError:
                    raise BrokenResponse(f"bad Content-Length {value[:40]!r}") from None
            elif lname == "transfer-encoding":
                self.chunked = "chunked" in value.lower()
            elif lname == "connection":
                self.keep_alive = "close" not in value.lower()
        if self.chunked:
            self.length = None
        elif self.length is None:
            self.keep_alive = False  # the body ends when the connection does

    def has_no_body(self, method: str) -> bool:
        return method == "HEAD" or self.status in (204, 304) or self.status < 200


async def read_head(conn: Connection) -> ResponseHead:
    try:
        return ResponseHead(await conn.reader.readuntil(b"\r\n\r\n"))
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError) as exc:
        if conn.aborted:
            raise WorkerAborted(conn.aborted) from None
        raise BrokenResponse(f"no response head: {exc.__class__.__name__}") from None


async def read_body(conn: Connection, head: ResponseHead) -> AsyncIterator[bytes]:
    """The body's pieces as they arrive (one per chunk when chunked)."""
    reader = conn.reader
    try:
        if head.chunked:
            while True:
                size_line = await reader.readuntil(b"\r\n")
                size = int(size_line.split(b";", 1)[0], 16)
                if size == 0:
                    while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers
                        pass
                    return
                chunk = await reader.readexactly(size + 2)
                yield chunk[:-2]
        elif head.length is not None:
            if head.length:
                yield await reader.readexactly(head.length)
        else:
            while chunk := await reader.read(65536):
                yield chunk
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, ValueError) as exc:
        if conn.aborted:
            raise WorkerAborted(conn.aborted) from None
        raise BrokenResponse(f"response body cut short: {exc.__class__.__name__}") from None


class ConnectionPool:
    """Idle keep-alive connections per worker (HOST, PORT); a connection is reused only when idle."""

    def __init__(self, connect_timeout: float) -> None:
        self.connect_timeout = connect_timeout
        self._idle: dict[tuple[str, int], list[Connection]] = {}
        self._busy: dict[tuple[str, int], set[Connection]] = {}
        self._swept = time.monotonic()

    async def acquire(self, host: str, port: int) -> tuple[Connection, bool]:
        """An idle connection (and True), or a new one (and False). Raises ConnectError."""
        idle = self._idle.get((host, port))
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if now - conn.idle_since < _KEEPALIVE_S and not conn.reader.at_eof() \
                    and not conn.writer.transport.is_closing():
                conn._busy = self._busy.setdefault((host, port), set())
                conn._busy.add(conn)
                return conn, True
            conn.close()
        try:
            async with asyncio.timeout(self.connect_timeout):
                reader, writer = await asyncio.open_connection(host, port)
        except TimeoutError:
            raise ConnectError(f"connect to {host}:{port} timed out after {self.connect_timeout:g} s",
                               timed_out=True) from None
        except OSError as exc:
            raise ConnectError(f"cannot connect to {host}:{port}: {exc.strerror or exc}", timed_out=False) from None
        return Connection(reader, writer, self._busy.setdefault((host, port), set())), False

    def release(self, host: str, port: int, conn: Connection) -> None:
        """Give back a connection whose response was read to its end."""
        now = time.monotonic()
        conn._busy.discard(conn)
        if now - self._swept > _KEEPALIVE_S:
            self._sweep(now)
        idle = self._idle.setdefault((host, port), [])
        if len(idle) >= _MAX_IDLE_PER_WORKER:
            conn.close()
            return
        conn.idle_since = now
        idle.append(conn)

    def abort_busy(self, host: str, port: int, reason: str) -> int:
        """Cut every connection to HOST:PORT that carries a request (its readers then fail with
        BrokenResponse, and `Connection.aborted` says why). Returns how many were cut."""
        busy = list(self._busy.get((host, port), ()))
        for conn in busy:
            conn.aborted = reason
            conn.close()
        return len(busy)

    def _sweep(self, now: float) -> None:
        """Close connections idle past the keep-alive time (those of removed workers are never acquired)."""
        self._swept = now
        for key, idle in list(self._idle.items()):
            keep = [conn for conn in idle if now - conn.idle_since < _KEEPALIVE_S]
            for conn in idle:
                if now - conn.idle_since >= _KEEPALIVE_S:
                    conn.close()
            if keep:
                self._idle[key] = keep
            else:
                del self._idle[key]
        for key, busy in list(self._busy.items()):
            if not busy:
                del self._busy[key]

    def close(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()
