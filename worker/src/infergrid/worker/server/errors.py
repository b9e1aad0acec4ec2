"""OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}` for every failure.

Bad input is always a 4xx (validation errors are 400 with `param` naming the field, never FastAPI's
bare 422); only genuine server faults are 5xx.
"""

from __future__ import annotations

import json
import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)

# pydantic inserts the chosen union member / validator name into error locations (e.g.
# ("prompt", "list[int]", 0)); these segments are not field names and are dropped from `param`.
_TYPE_TAGS = {"str", "int", "float", "bool", "none", "list", "dict", "json-or-python"}


class APIError(Exception):
    """An error answered as OpenAI error JSON with the given HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or default_error_type(status)
        self.param = param
        self.code = code
        self.headers = headers


def default_error_type(status: int) -> str:
    """The OpenAI `type` for a status code."""
    if status == 429:
        return "rate_limit_error"
    if status == 503:
        return "service_unavailable_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


def bad_request(message: str, param: str | None = None, code: str | None = "invalid_value") -> APIError:
    """A 400 invalid_request_error."""
    return APIError(400, message, param=param, code=code)


def error_body(status: int, message: str, type: str | None = None, param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """The JSON object of an OpenAI error."""
    return {"error": {"message": message, "type": type or default_error_type(status), "param": param,
                      "code": code}}


class AsciiJSONResponse(JSONResponse):
    """JSON with non-ASCII escaped: error messages may quote client input (even lone surrogates)."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def error_response(err: APIError) -> JSONResponse:
    """An APIError as a JSON response."""
    return AsciiJSONResponse(error_body(err.status, err.message, err.type, err.param, err.code),
                             status_code=err.status, headers=err.headers)


def param_from_loc(loc: tuple[Any, ...] | list[Any]) -> str | None:
    """("body", "messages", 0, "content", "str") -> "messages[0].content"; None for the body itself."""
    parts = list(loc)
    if parts and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:]
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
            continue
        text = str(part)
        if text in _TYPE_TAGS or "[" in text or "-" in text or "(" in text:
            break
        out += f".{text}" if out else text
    return out or None


def validation_error(exc: RequestValidationError) -> APIError:
    """Turn FastAPI's validation error (first problem) into a 400 with `param` set."""
    errors = exc.errors()
    if not errors:
        return bad_request("invalid request")
    first = errors[0]
    kind = first.get("type", "")
    if kind == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        return bad_request(f"Malformed JSON body: {detail}".rstrip(": "), code="invalid_json")
    loc = tuple(first.get("loc", ()))
    param = param_from_loc(loc)
    message = str(first.get("msg", "invalid value"))
    if kind == "missing":
        if param is None:
            return bad_request("Request body is required (a JSON object)", code="missing_body")
        return bad_request(f"Missing required parameter: '{param}'", param, code="missing_required_parameter")
    if kind == "extra_forbidden":
        return bad_request(f"Unrecognized request argument supplied: {param}", param,
                           code="unknown_parameter")
    if param is None:
        return bad_request(f"Request body must be a JSON object: {message}", code="invalid_body")
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    return bad_request(f"Invalid value for '{param}': {message}{more}", param)


def install_error_handlers(app: FastAPI) -> None:
    """Register handlers so every error leaves as OpenAI error JSON."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        status = exc.status_code
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = "error"
        message = exc.detail if isinstance(exc.detail, str) and exc.detail else phrase
        code = {404: "not_found", 405: "method_not_allowed"}.get(status)
        if status == 400:
            code = "invalid_body"
        return error_response(APIError(status, message, code=code, headers=exc.headers))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error: %s", exc)
        return error_response(APIError(500, "Internal server error", code="internal_error"))
