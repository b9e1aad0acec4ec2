"""HTTP forwarding to one worker over a pooled keep-alive client.

- Bodies and responses pass through as bytes (no re-serialisation, no decompression); a response with
  a Content-Length is read whole, anything else (SSE streams) is written to the client chunk by chunk
  as it arrives.
- `--upstream-timeout` bounds the wait for the response headers and for each next chunk: a wedged
  worker (stopped process, socket open) ends the request with a 504 (or, mid-stream, an SSE error
  event) instead of hanging.
- Only a failure to connect raises `ConnectFailed` (the request never left the router, so it may be
  retried on another worker); anything later is answered, never retried.
- A client that goes away cancels the handler (handler_cancellation), which closes the upstream
  connection: the worker sees the disconnect, aborts the request and frees its KV blocks.
"""

from __future__ import annotations

import json
import time

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from infergrid.router.errors import error_response
from infergrid.router.health import Failure

# Headers that describe one hop, not the message (RFC 9110 7.6.1), plus what aiohttp sets itself.
_HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
                         "trailer", "transfer-encoding", "upgrade", "host", "content-length"})


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
    def __init__(self, upstream_timeout: float, connect_timeout: float, max_connections: int,
                 strip_authorization: bool) -> None:
        self.upstream_timeout = upstream_timeout
        self.timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout, sock_read=upstream_timeout)
        self.strip_authorization = strip_authorization
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            # keepalive below uvicorn's 5 s so the router never reuses a connection the worker is closing.
            connector = aiohttp.TCPConnector(limit=self._max_connections, limit_per_host=0, keepalive_timeout=4.0,
                                             enable_cleanup_closed=False, ttl_dns_cache=None)
            self._session = aiohttp.ClientSession(connector=connector, timeout=self.timeout, auto_decompress=False,
                                                  skip_auto_headers=("User-Agent", "Accept-Encoding"))
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    def upstream_headers(self, request: web.Request, request_id: str) -> CIMultiDict[str]:
        headers: CIMultiDict[str] = CIMultiDict()
        for name, value in request.headers.items():
            lname = name.lower()
            if lname in _HOP_BY_HOP or (self.strip_authorization and lname == "authorization"):
                continue
            headers.add(name, value)
        headers["X-Request-Id"] = request_id
        return headers

    async def forward(self, request: web.Request, base_url: str, body: bytes, request_id: str,
                      result: list[UpstreamResult]) -> web.StreamResponse:
        """Send the request to `base_url` and relay the answer. Raises ConnectFailed before sending.

        `result` receives the outcome (a list, so the caller sees it even when the client disconnects).
        """
        started = time.perf_counter()
        try:
            upstream = await self.session().request(
                request.method, base_url + request.raw_path,
                data=body if body else None, headers=self.upstream_headers(request, request_id),
                allow_redirects=False)
        except aiohttp.ClientConnectorError as exc:
            raise ConnectFailed(Failure.CONNECT, str(exc)) from None
        except aiohttp.ConnectionTimeoutError as exc:
            raise ConnectFailed(Failure.TIMEOUT, f"connect timeout: {exc}") from None
        except aiohttp.ServerTimeoutError:
            result.append(UpstreamResult("timeout", Failure.TIMEOUT))
            return error_response(504, f"the worker sent no response within {self.upstream_timeout:g} s",
                                  "upstream_timeout", request_id=request_id)
        except aiohttp.ClientError as exc:
            result.append(UpstreamResult("upstream_error", Failure.CONNECT))
            return error_response(502, f"the worker failed before answering: {exc.__class__.__name__}",
                                  "upstream_error", request_id=request_id)
        headers_s = time.perf_counter() - started
        try:
            return await self._relay(request, upstream, request_id, result, headers_s)
        finally:
            upstream.release()  # back to the pool when fully read, else the connection is closed

    async def _relay(self, request: web.Request, upstream: aiohttp.ClientResponse, request_id: str,
                     result: list[UpstreamResult], headers_s: float) -> web.StreamResponse:
        headers = CIMultiDict((k, v) for k, v in upstream.headers.items() if k.lower() not in _HOP_BY_HOP)
        headers["X-Request-Id"] = request_id
        outcome = f"{upstream.status // 100}xx"
        if upstream.content_length is not None:
            try:
                body = await upstream.read()
            except aiohttp.ServerTimeoutError:
                result.append(UpstreamResult("timeout", Failure.TIMEOUT, headers_s))
                return error_response(504, f"the worker stopped sending for {self.upstream_timeout:g} s",
                                      "upstream_timeout", request_id=request_id)
            except aiohttp.ClientError as exc:
                result.append(UpstreamResult("upstream_error", Failure.CONNECT, headers_s))
                return error_response(502, f"the worker failed mid-response: {exc.__class__.__name__}",
                                      "upstream_error", request_id=request_id)
            result.append(UpstreamResult(outcome, None, headers_s))
            return web.Response(status=upstream.status, body=body, headers=headers)
        response = web.StreamResponse(status=upstream.status, headers=headers)
        await response.prepare(request)
        try:
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
        except aiohttp.ServerTimeoutError:
            result.append(UpstreamResult("timeout", Failure.TIMEOUT, headers_s))
            await _write_stream_error(response, f"the worker stopped streaming for {self.upstream_timeout:g} s",
                                      "upstream_timeout")
            return response
        except aiohttp.ClientPayloadError as exc:
            result.append(UpstreamResult("upstream_error", Failure.CONNECT, headers_s))
            await _write_stream_error(response, f"the worker failed mid-stream: {exc.__class__.__name__}",
                                      "upstream_error")
            return response
        except (ConnectionResetError, aiohttp.ClientConnectionResetError):
            result.append(UpstreamResult("client_disconnect", None, headers_s))
            return response
        result.append(UpstreamResult(outcome, None, headers_s))
        await response.write_eof()
        return response


async def _write_stream_error(response: web.StreamResponse, message: str, code: str) -> None:
    """An SSE stream cannot change its status: end it with an OpenAI error event."""
    event = {"error": {"message": message, "type": "timeout_error" if "timeout" in code else "upstream_error",
                       "param": None, "code": code}}
    try:
        await response.write(b"data: " + json.dumps(event).encode() + b"\n\n")
        await response.write_eof()
    except (ConnectionResetError, aiohttp.ClientConnectionResetError):
        pass
