"""Server-sent events: the event-stream response, and helpers to prime and merge engine streams."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import anyio
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from .errors import APIError, error_body

logger = logging.getLogger(__name__)

SSE_DONE = "data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse_event(data: dict[str, Any]) -> str:
    """One `data:` event."""
    return f"data: {json.dumps(data, ensure_ascii=False, allow_nan=False, separators=(',', ':'))}\n\n"


def sse_error(err: Exception) -> str:
    """An error event for a stream whose 200 header is already sent."""
    if isinstance(err, APIError):
        return sse_event(error_body(err.status, err.message, err.type, err.param, err.code))
    logger.error("stream failed", exc_info=err)
    return sse_event(error_body(500, "Internal server error", code="internal_error"))


async def aclose_quietly(stream: Any) -> None:
    """Close an async generator, ignoring generators that are running or already closed."""
    aclose = getattr(stream, "aclose", None)
    if aclose is None:
        return
    with anyio.CancelScope(shield=True):
        try:
            await aclose()
        except RuntimeError:
            logger.debug("could not close stream", exc_info=True)


class EventStreamResponse(StreamingResponse):
    """A text/event-stream response that always runs `on_close` when it ends, however it ends
    (finished, client gone before or during the body, server shutdown)."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], Awaitable[None]]) -> None:
        super().__init__(content, media_type="text/event-stream", headers=SSE_HEADERS)
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await aclose_quietly(self.body_iterator)
                await self._on_close()


async def prepend(first: Any, rest: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """`first`, then the rest of the iterator (closing it when the consumer stops)."""
    try:
        yield first
        async for item in rest:
            yield item
    finally:
        await aclose_quietly(rest)


async def _first(stream: AsyncIterator[Any]) -> Any:
    try:
        return await anext(stream)
    except StopAsyncIteration:
        raise APIError(500, "engine returned no output", code="internal_error") from None


async def prime(streams: Sequence[AsyncIterator[Any]]) -> list[AsyncIterator[Any]]:
    """Wait (concurrently) for each stream's first item, so that add-time errors surface before a
    200 is sent, and return streams that replay it. On failure every stream is closed."""
    tasks = [asyncio.ensure_future(_first(s)) for s in streams]
    try:
        firsts = await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        with anyio.CancelScope(shield=True):
            await asyncio.gather(*tasks, return_exceptions=True)
            for stream in streams:
                await aclose_quietly(stream)
        raise
    return [prepend(first, stream) for first, stream in zip(firsts, streams, strict=True)]


async def merge_streams(streams: Sequence[AsyncIterator[Any]]) -> AsyncIterator[tuple[int, Any]]:
    """Interleave several async iterators as (stream index, item) in arrival order.

    When the consumer stops (or one stream fails) the other streams are cancelled and closed.
    """
    if len(streams) == 1:
        async for item in streams[0]:
            yield 0, item
        return
    queue: asyncio.Queue[tuple[int, Any, Exception | None, bool]] = asyncio.Queue()

    async def pump(i: int, stream: AsyncIterator[Any]) -> None:
        try:
            async for item in stream:
                await queue.put((i, item, None, False))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - forwarded to the consumer
            await queue.put((i, None, exc, True))
            return
        await queue.put((i, None, None, True))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item, exc, is_end = await queue.get()
            if is_end:
                remaining -= 1
                if exc is not None:
                    raise exc
                continue
            yield i, item
    finally:
        for t in tasks:
            t.cancel()
        with anyio.CancelScope(shield=True):
            await asyncio.gather(*tasks, return_exceptions=True)
