"""OpenAI-shaped error responses (`{"error": {"message", "type", "param", "code"}}`)."""

from __future__ import annotations

import json

from infergrid.router.http_server import Response

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          413: "invalid_request_error", 502: "upstream_error", 503: "service_unavailable",
          504: "timeout_error"}


def error_body(status: int, message: str, code: str | None = None) -> bytes:
    return json.dumps({"error": {"message": message, "type": _TYPES.get(status, "server_error"),
                                 "param": None, "code": code}}).encode()


def error_response(status: int, message: str, code: str | None = None, *, request_id: str | None = None,
                   retry_after: int | None = None) -> Response:
    headers = []
    if request_id is not None:
        headers.append(("X-Request-Id", request_id))
    if retry_after is not None:
        headers.append(("Retry-After", str(retry_after)))
    return Response(status, error_body(status, message, code), headers, "application/json")
