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
- A client that goes away cancels the handler (http_server.py), which aborts the upstream connection:
  the worker sees the disconnect, aborts the request and frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import json
import time

from infergrid.router.errors import error_response
from infergrid.router.health import Failure
from infergrid.router.http_server import Request, Response, Stream
from infergrid.router.pool import Worker
from infergrid.router.upstream import (
    HOP_BY_HOP,
    BrokenResponse,
    ConnectError,
    Connection,
    ConnectionPool,
    ResponseHead,
    WorkerAborted,
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
        dropped = HOP_BY_HOP | {"x-request-id"} | ({"authorization"} if strip_authorization else set())
        self._dropped = frozenset(name.encode() for name in dropped)

    async def close(self) -> None:
        self.pool.close()

    def request_bytes(self, request: Request, worker: Worker, request_id: str) -> bytes:
        """The request as the worker gets it: the client's end-to-end headers byte for byte."""
        dropped = self._dropped
        body = request.body
        parts = [b"%s %s HTTP/1.1\r\nHost: %s\r\n" % (request.method.encode(), request.raw_path,
                                                          worker.authority.encode())]
        for name, value in request.raw_headers:
            if name.lower() not in dropped:
                parts.append(b"%s: %s\r\n" % (name, value))
        parts.append(b"X-Request-Id: %s\r\nContent-Length: %d\r\n\r\n" % (request_id.encode(), len(body))
                     if body else b"X-Request-Id: %s\r\n\r\n" % request_id.encode())
        parts.append(body)
        return b"".join(parts)

    async def _exchange(self, worker: Worker, data: bytes) -> tuple[Connection, ResponseHead]:
        """Send `data` and read the response head. Raises ConnectFailed (nothing sent) or BrokenResponse."""
        while True:
            try:
                conn, reused = await self.pool.acquire(worker.host, worker.port)
            except ConnectError as exc:
                raise ConnectFailed(Failure.TIMEOUT if exc.timed_out else Failure.CONNECT, str(exc)) from None
            conn.writer.write(data)
            try:
                return conn, await read_head(conn)
            except WorkerAborted:
                raise
            except BrokenResponse:
                conn.close()
                if not reused:
                    raise
            except BaseException:
                conn.close()
                raise

    async def forward(self, request: Request, stream: Stream, worker: Worker, request_id: str,
                      result: list[UpstreamResult]) -> Response | None:
        """Send the request to `worker` and relay the answer: a whole Response, or None once it was
        streamed to `stream`. Raises ConnectFailed before sending.

        `result` receives the outcome (a list, so the caller sees it even when the client disconnects).
        """
        data = self.request_bytes(request, worker, request_id)
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
                    return Response(head.status, b"", head.headers)
                if head.length is not None:
                    deadline.reschedule(asyncio.get_running_loop().time() + timeout)
                    answer = b"".join([piece async for piece in read_body(conn, head)])
                    done = True
                    result.append(UpstreamResult(outcome, None, headers_s))
                    return Response(head.status, answer, head.headers)
            done = await self._stream(stream, conn, head, result, headers_s)
            return None
        except TimeoutError:
            result.append(UpstreamResult("timeout", Failure.TIMEOUT, headers_s))
            what = "sent no response" if headers_s is None else "stopped sending"
            return error_response(504, f"the worker {what} within {timeout:g} s", "upstream_timeout",
                                  request_id=request_id)
        except WorkerAborted as exc:
            result.append(UpstreamResult("timeout", None, headers_s))
            return error_response(504, str(exc), "worker_unresponsive", request_id=request_id)
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

    async def _stream(self, stream: Stream, conn: Connection, head: ResponseHead,
                      result: list[UpstreamResult], headers_s: float) -> bool:
        """Relay a body of unknown length piece by piece; True when it was read to its end."""
        await stream.start(head.status, head.headers)
        timeout = self.upstream_timeout
        pieces = read_body(conn, head)
        try:
            while True:
                try:
                    async with asyncio.timeout(timeout):
                        piece = await anext(pieces)
                except StopAsyncIteration:
                    break
                await stream.write(piece)  # the client's pace is not the worker's timeout
        except TimeoutError:
            result.append(UpstreamResult("timeout", Failure.TIMEOUT, headers_s))
            await _write_stream_error(stream, f"the worker stopped streaming for {timeout:g} s", "upstream_timeout")
            return False
        except WorkerAborted as exc:
            result.append(UpstreamResult("timeout", None, headers_s))
            await _write_stream_error(stream, str(exc), "worker_unresponsive")
            return False
        except BrokenResponse as exc:
            result.append(UpstreamResult("upstream_error", Failure.CONNECT, headers_s))
            await _write_stream_error(stream, f"the worker failed mid-stream: {exc}", "upstream_error")
            return False
        except ConnectionResetError:
            result.append(UpstreamResult("client_disconnect", None, headers_s))
            return False
        finally:
            await pieces.aclose()
        result.append(UpstreamResult(f"{head.status // 100}xx", None, headers_s))
        await stream.finish()
        return True


async def _write_stream_error(stream: Stream, message: str, code: str) -> None:
    """An SSE stream cannot change its status: end it with an OpenAI error event."""
    kind = "timeout_error" if "timeout" in code or "unresponsive" in code else "upstream_error"
    event = {"error": {"message": message, "type": kind,
                       "param": None, "code": code}}
    try:
        await stream.write(b"data: " + json.dumps(event).encode() + b"\n\n")
        await stream.finish()
    except ConnectionResetError:
        pass
