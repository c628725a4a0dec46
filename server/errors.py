"""OpenAI-shaped errors: every failure the server reports is `{"error": {...}}`.

Body shape, for every status:

    {"error": {"message": "...", "type": "invalid_request_error", "param": "n", "code": null}}

Raise `APIError` (or one of its helpers) anywhere under a route; `install_handlers`
turns it, pydantic's validation errors, Starlette's HTTP errors and unexpected
exceptions into this shape.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger("tandem.server")

# HTTP status -> OpenAI error `type`.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_server_error",
    503: "service_unavailable_error",
}


class APIError(Exception):
    """An error the client should see, with its HTTP status and OpenAI error fields."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status  # HTTP status code
        self.message = message  # human-readable, safe to show to the client
        self.param = param  # the offending request field, dotted ("messages.0.role")
        self.code = code  # machine-readable code ("model_not_found"), or None
        self.headers = headers or {}  # extra response headers (Retry-After)

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, param=self.param, code=self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def error_body(
    status: int, message: str, *, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    error_type = ERROR_TYPES.get(status, "invalid_request_error")
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


def not_supported(param: str, what: str | None = None) -> APIError:
    subject = what or f"`{param}`"
    return APIError(400, f"{subject} is not supported by Tandem yet", param=param)


def validation_error(exc: ValidationError | RequestValidationError) -> APIError:
    """The first pydantic error as a 400 naming the field ("messages.0.content: ...")."""
    errors = exc.errors()
    if not errors:
        return bad_request("invalid request body")
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    # Union members add their type names to the location ("prompt.str"); drop those.
    loc = [p for p in loc if not _is_type_tag(p)]
    param = ".".join(loc) or None
    msg = first.get("msg", "invalid value")
    if first.get("type") == "json_invalid":
        return bad_request(f"request body is not valid JSON: {first.get('ctx', {}).get('error')}")
    if first.get("type") == "model_attributes_type":
        return bad_request("request body must be a JSON object")
    return bad_request(f"{param}: {msg}" if param else msg, param=param)


def _is_type_tag(part: str) -> bool:
    return part in {"str", "int", "float", "bool", "list", "dict"} or part.startswith(
        ("list[", "dict[", "function-", "constrained-", "literal[")
    )


def install_handlers(app: FastAPI) -> None:
    """Route every exception to an OpenAI error body (never a bare 422 or HTML 500)."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _request_validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(exc).response()

    @app.exception_handler(ValidationError)
    async def _validation(_: Request, exc: ValidationError) -> JSONResponse:
        return validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "HTTP error"
        headers = dict(exc.headers) if exc.headers else None
        return APIError(exc.status_code, message, headers=headers).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("internal error on %s %s", request.method, request.url.path)
        return APIError(500, "internal server error").response()
