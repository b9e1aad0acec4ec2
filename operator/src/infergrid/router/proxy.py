"""HTTP forwarding to one worker over pooled keep-alive connections (`upstream.py`).

- The request goes out as the client's method, path, end-to-end headers and body bytes (plus Host,
  X-Request-Id and Content-Length); the response comes back as bytes (no re-serialisation, no
  decompression). A response with a Content-Length is read whole, anything else (SSE streams) is
  written to the client piece by piece as it arrives.
- `--upstream-timeout` bounds the wait for the response head and for each next piece (not the time the
  client takes to read): a wedged worker (stopped process, socket open) ends the request with a 504
  (or, mid-stream, an SSE error event) instead of hanging.
- Only a failure to connect raises `ConnectFailed` (the request never left the router, so it may be
  retried on another worker); anything later is answered, never retried. A reused keep-alive
  connection that the worker had closed is replaced by a fresh one once.
- A client that goes away cancels the handler (handler_cancellation), which aborts the upstream
  connection: the worker sees the disconnect, aborts the request and frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import json
import time

from aiohttp import web

from infergrid.router.errors import error_response
from infergrid.router.health import Failure
from infergrid.router.pool import Worker
from infergrid.router.upstream import (
    HOP_BY_HOP,
    BrokenResponse,
    ConnectError,
    Connection,
    ConnectionPool,
    ResponseHead,
    read_body,
    read_head,
)


class ConnectFailed(Exception):
    """The worker could not be reached: nothing was sent (safe to retry elsewhere)."""

    def __init__(self, failure: Failure, detail: str) -> None:
        super().__init__(detail)
        self.failure = failure


class UpstreamResult:
    """What happened on the worker: the outcome label, and a failure to report (None if healthy)."""

    __slots__ = ("outcome", "failure", "headers_s")

    def __init__(self, outcome: str, failure: Failure | None = None, headers_s: float | None = None) -> None:
        self.outcome, self.failure, self.headers_s = outcome, failure, headers_s


class Proxy:
    def __init__(self, upstream_timeout: float, connect_timeout: float, strip_authorization: bool) -> None:
        self.upstream_timeout = upstream_timeout
        self.pool = ConnectionPool(connect_timeout)
        self._dropped = HOP_BY_HOP | {"x-request-id"} | ({"authorization"} if strip_authorization else set())

    async def close(self) -> None:
        self.pool.close()

    def request_bytes(self, request: web.BaseRequest, worker: Worker, body: bytes, request_id: str) -> bytes:
        dropped = self._dropped
        lines = [f"{request.method} {request.raw_path} HTTP/1.1\r\nHost: {worker.authority}\r\n"]
        lines += [f"{name}: {value}\r\n" for name, value in request.headers.items() if name.lower() not in dropped]
        lines.append(f"X-Request-Id: {request_id}\r\nContent-Length: {len(body)}\r\n\r\n"
                     if body else f"X-Request-Id: {request_id}\r\n\r\n")
        return "".join(lines).encode("utf-8", "surrogateescape") + body

    async def _exchange(self, worker: Worker, data: bytes) -> tuple[Connection, ResponseHead]:
        """Send `data` and read the response head. Raises ConnectFailed (nothing sent) or BrokenResponse."""
        while True:
            try:
                conn, reused = await self.pool.acquire(worker.host, worker.port)
            except ConnectError as exc:
                raise ConnectFailed(Failure.TIMEOUT if exc.timed_out else Failure.CONNECT, str(exc)) from None
            conn.writer.write(data)
            try:
                return conn, await read_head(conn.reader)
            except BrokenResponse:
                conn.close()
                if not reused:
                    raise
            except BaseException:
                conn.close()
                raise

    async def forward(self, request: web.BaseRequest, worker: Worker, body: bytes, request_id: str,
                      result: list[UpstreamResult]) -> web.StreamResponse:
        """Send the request to `worker` and relay the answer. Raises ConnectFailed before sending.

        `result` receives the outcome (a list, so the caller sees it even when the client disconnects).
        """
        data = self.request_bytes(request, worker, body, request_id)
        timeout = self.upstream_timeout
        started = time.perf_counter()
        headers_s: float | None = None
        conn: Connection | None = None
        done = False
        try:
            async with asyncio.timeout(timeout) as deadline:
                conn, head = await self._exchange(worker, data)
                headers_s = time.perf_counter() - started
                head.headers.append(("X-Request-Id", request_id))
                outcome = f"{head.status // 100}xx"
                if head.has_no_body(request.method):
                    done = True
                    result.append(UpstreamResult(outcome, None, headers_s))
                    return web.Response(status=head.status, headers=head.headers)
                if head.length is not None:
                    deadline.reschedule(asyncio.get_running_loop().time() + timeout)
                    answer = b"".join([piece async for piece in read_body(conn.reader, head)])
                    done = True
                    result.append(UpstreamResult(outcome, None, headers_s))
                    return web.Response(status=head.status, body=answer, headers=head.headers)
            response, done = await self._stream(request, conn, head, result, headers_s)
            return response
        except TimeoutError:
            result.append(UpstreamResult("timeout", Failure.TIMEOUT, headers_s))
            what = "sent no response" if headers_s is None else "stopped sending"
            return error_response(504, f"the worker {what} within {timeout:g} s", "upstream_timeout",
                                  request_id=request_id)
        except BrokenResponse as exc:
            result.append(UpstreamResult("upstream_error", Failure.CONNECT, headers_s))
            what = "before answering" if headers_s is None else "mid-response"
            return error_response(502, f"the worker failed {what}: {exc}", "upstream_error", request_id=request_id)
        finally:
            if conn is not None:
                if done and head.keep_alive:
                    self.pool.release(worker.host, worker.port, conn)
                else:
                    conn.close()

    async def _stream(self, request: web.BaseRequest, conn: Connection, head: ResponseHead,
                      result: list[UpstreamResult], headers_s: float) -> tuple[web.StreamResponse, bool]:
        """Relay a body of unknown length piece by piece; True when it was read to its end."""
        response = web.StreamResponse(status=head.status, headers=head.headers)
        await response.prepare(request)
        timeout = self.upstream_timeout
        pieces = read_body(conn.reader, head)
        try:
            while True:
                try:
                    async with asyncio.timeout(timeout):
                        piece = await anext(pieces)
                except StopAsyncIteration:
                    break
                await response.write(piece)  # the client's pace is not the worker's timeout
        except TimeoutError:
            result.append(UpstreamResult("timeout", Failure.TIMEOUT, headers_s))
            await _write_stream_error(response, f"the worker stopped streaming for {timeout:g} s", "upstream_timeout")
            return response, False
        except BrokenResponse as exc:
            result.append(UpstreamResult("upstream_error", Failure.CONNECT, headers_s))
            await _write_stream_error(response, f"the worker failed mid-stream: {exc}", "upstream_error")
            return response, False
        except ConnectionResetError:
            result.append(UpstreamResult("client_disconnect", None, headers_s))
            return response, False
        finally:
            await pieces.aclose()
        result.append(UpstreamResult(f"{head.status // 100}xx", None, headers_s))
        await response.write_eof()
        return response, True


async def _write_stream_error(response: web.StreamResponse, message: str, code: str) -> None:
    """An SSE stream cannot change its status: end it with an OpenAI error event."""
    event = {"error": {"message": message, "type": "timeout_error" if "timeout" in code else "upstream_error",
                       "param": None, "code": code}}
    try:
        await response.write(b"data: " + json.dumps(event).encode() + b"\n\n")
        await response.write_eof()
    except ConnectionResetError:
        pass
