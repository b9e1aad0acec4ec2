"""Client-disconnect handling: a request whose client left is cancelled, which aborts its engine
request and frees its KV blocks.

Non-streaming handlers run as a task raced against the ASGI `http.disconnect` message. Streaming
responses are cancelled by Starlette's StreamingResponse (it listens for the same message); the
stream generators abort their engine requests in `finally`.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from typing import Any, ParamSpec, TypeVar

from fastapi import Request
from starlette.responses import Response

P = ParamSpec("P")
R = TypeVar("R")

# nginx's "client closed request"; nobody reads it, it only shows up in the access log.
CLIENT_CLOSED_STATUS = 499


async def wait_for_disconnect(request: Request) -> None:
    """Return once the client has gone away (the request body is already consumed)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def with_cancellation(handler: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R | Response]]:
    """Decorate a route handler taking `raw_request: Request`: cancel it when the client leaves."""

    @functools.wraps(handler)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        request: Request = kwargs["raw_request"]
        work = asyncio.ensure_future(handler(*args, **kwargs))
        watcher = asyncio.ensure_future(wait_for_disconnect(request))
        try:
            done, _ = await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            work.cancel()
            watcher.cancel()
            raise
        if work in done:
            watcher.cancel()
            return work.result()
        work.cancel()
        try:
            await work
        except (asyncio.CancelledError, Exception):  # noqa: BLE001 - the client is gone either way
            pass
        return Response(status_code=CLIENT_CLOSED_STATUS)

    return wrapper
