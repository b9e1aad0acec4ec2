"""Pure ASGI middleware in front of the routes: API key, then body guard (size, content type, UTF-8).

Both answer with OpenAI error JSON before any route code runs.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Iterable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import error_body
from .protocol import IGNORED_FIELDS

# Routes that answer without an API key (probes and the Prometheus scrape).
PUBLIC_PATHS = frozenset({"/health", "/ready", "/metrics"})
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
# Oversized bodies up to this multiple of the limit are read and dropped before the 413.
DISCARD_FACTOR = 8


async def send_error(send: Send, status: int, message: str, *, param: str | None = None,
                     code: str | None = None, headers: Iterable[tuple[bytes, bytes]] = ()) -> None:
    """Send a complete OpenAI error response."""
    body = json.dumps(error_body(status, message, param=param, code=code)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value
    return None


class ApiKeyMiddleware:
    """401 unless `Authorization: Bearer <key>` (or `x-api-key: <key>`) matches; probes are exempt."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self._key = api_key.encode()

    def _is_authorized(self, scope: Scope) -> bool:
        auth = _header(scope, b"authorization")
        if auth is not None and auth[:7].lower() == b"bearer ":
            return hmac.compare_digest(auth[7:].strip(), self._key)
        other = _header(scope, b"x-api-key")
        return other is not None and hmac.compare_digest(other.strip(), self._key)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in PUBLIC_PATHS or self._is_authorized(scope):
            await self.app(scope, receive, send)
            return
        await send_error(send, 401, "Incorrect or missing API key. Send 'Authorization: Bearer <key>'.",
                         code="invalid_api_key", headers=[(b"www-authenticate", b"Bearer")])


def is_json_content_type(value: bytes) -> bool:
    """application/json or application/*+json (parameters such as charset=utf-8 allowed)."""
    media = value.split(b";", 1)[0].strip().lower()
    return media == b"application/json" or (media.startswith(b"application/") and media.endswith(b"+json"))


class BodyGuardMiddleware:
    """Reads request bodies up front: 413 over `max_body_bytes`, 400 for a non-JSON content type or
    bytes that are not UTF-8, then replays the body to the app."""

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in BODY_METHODS:
            await self.app(scope, receive, send)
            return
        content_type = _header(scope, b"content-type")
        if content_type is not None and not is_json_content_type(content_type):
            await send_error(send, 400, f"Unsupported Content-Type {content_type.decode('latin-1')!r}; "
                                        "send 'application/json'", code="invalid_content_type")
            return
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            await self._refuse_too_large(receive, send, int(declared))
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                more = message.get("more_body", False)
                await self._refuse_too_large(receive, send, size if not more else None, already_read=size)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as exc:
            await send_error(send, 400, f"Request body is not valid UTF-8 (byte {exc.start})", code="invalid_utf8")
            return
        is_replayed = False

        async def replay() -> Message:
            nonlocal is_replayed
            if not is_replayed:
                is_replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse_too_large(self, receive: Receive, send: Send, declared: int | None,
                                already_read: int = 0) -> None:
        """413. A body up to DISCARD_FACTOR x the limit is read and dropped first, so the client sees
        the answer instead of a reset connection; beyond that the connection is closed."""
        budget = DISCARD_FACTOR * self.max_body_bytes
        is_drained = declared is not None and declared == already_read
        if not is_drained and (declared is None or declared <= budget):
            size = already_read
            while size <= budget:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                size += len(message.get("body", b""))
                if not message.get("more_body", False):
                    is_drained = True
                    break
        headers = [] if is_drained else [(b"connection", b"close")]
        await send_error(send, 413, f"Request body is larger than {self.max_body_bytes} bytes",
                         code="request_too_large", headers=headers)


class IgnoredFieldsMiddleware:
    """Lists the unknown top-level request fields the models ignored in an `X-Ignored-Fields` header."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in BODY_METHODS:
            await self.app(scope, receive, send)
            return
        ignored: list[str] = []
        token = IGNORED_FIELDS.set(ignored)

        async def send_with_header(message: Message) -> None:
            if message["type"] == "http.response.start" and ignored:
                # Printable ASCII only: a field name may hold any character (h11 drops bad headers).
                value = ",".join(ignored)[:1000].encode("ascii", "backslashreplace")
                value = bytes(b for b in value if 0x20 <= b < 0x7F).strip()  # (h11: no edge whitespace)
                message = {**message, "headers": [*message.get("headers", ()), (b"x-ignored-fields", value)]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_header)
        finally:
            IGNORED_FIELDS.reset(token)
