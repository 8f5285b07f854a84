"""One exception hierarchy, rendered as RFC 9457 problem documents by one set of handlers."""

import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException

from chatbot.db import is_unreachable
from chatbot.sanitize import clean_text

logger = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"


class Problem(BaseModel):
    """The body of every error response (RFC 9457), with a stable machine-readable `code`."""

    model_config = ConfigDict(extra="allow")

    type: str = "about:blank"
    title: str
    status: int
    detail: str
    code: str


_PROBLEM_SCHEMA = Problem.model_json_schema()


def problem_responses(descriptions: dict[int, str]) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` entries for errors answered as problem documents."""
    return {
        status: {
            "description": description,
            "content": {PROBLEM_JSON: {"schema": _PROBLEM_SCHEMA}},
        }
        for status, description in descriptions.items()
    }


API_ERRORS = problem_responses(
    {
        400: "The body is not valid JSON or holds forbidden characters",
        401: "Missing or invalid credentials",
        404: "Not found, or not yours",
        413: "The body is larger than the configured limit",
        422: "The request is not valid",
        429: "Too many requests; see Retry-After",
        503: "The database is not reachable; see Retry-After",
    }
)
"""Errors any authenticated route can answer with."""


class AppError(Exception):
    """The base of every error the service answers with a problem document. Each subclass names
    one kind of failure: its status and its stable `code` are class attributes, never spelled
    at a call site; `detail` may say more about this occurrence."""

    status: int = 500
    code: str = "internal_error"
    detail: str = "Internal server error"

    def __init__(
        self, detail: str | None = None, *, headers: dict[str, str] | None = None, **extra: Any
    ) -> None:
        self.detail = detail or self.detail
        self.headers = headers
        self.extra = extra
        super().__init__(self.detail)

    def to_problem(self) -> dict[str, Any]:
        return problem(self.status, self.detail, self.code, **self.extra)

    def stored(self) -> dict[str, Any]:
        """What a reply row keeps in `error` of the failure that ended it."""
        return {"code": self.code, "detail": clean_text(self.detail), "status": self.status}


class BadRequest(AppError):
    status = 400
    code = "bad_request"
    detail = "Bad request"


class Unauthorized(AppError):
    status = 401
    code = "unauthorized"
    detail = "Missing or invalid credentials"


class NotFound(AppError):
    status = 404
    code = "not_found"
    detail = "Not found"


class Conflict(AppError):
    status = 409
    code = "conflict"
    detail = "Conflict"


class Unprocessable(AppError):
    """A request well formed but not valid, as schema validation answers it."""

    status = 422
    code = "validation_error"
    detail = "The request is not valid"


class TooManyRequests(AppError):
    status = 429
    code = "rate_limited"
    detail = "Too many requests"


class UpstreamError(AppError):
    """The model provider failed; subclasses say how (429, 502, 503, 504)."""

    status = 502
    code = "upstream_error"
    detail = "The model provider returned an error"


class ServiceUnavailable(AppError):
    status = 503
    code = "service_unavailable"
    detail = "Service temporarily unavailable"


class ConversationNotFound(NotFound):
    code = "conversation_not_found"
    detail = "Conversation not found"


class MessageNotFound(NotFound):
    code = "message_not_found"
    detail = "Message not found"


class InvalidCursor(BadRequest):
    code = "invalid_cursor"
    detail = "The cursor is not valid"


class RepeatedParameter(BadRequest):
    code = "repeated_parameter"


class InvalidJson(BadRequest):
    code = "invalid_json"
    detail = "The request body is not valid JSON"


class InvalidBody(BadRequest):
    code = "invalid_body"
    detail = "The request body must be a JSON object"


class PayloadTooLarge(AppError):
    status = 413
    code = "payload_too_large"
    detail = "The request body is too large"


class DatabaseUnavailable(ServiceUnavailable):
    code = "database_unavailable"
    detail = "The database is not reachable; try again shortly"


class DatabaseBusy(ServiceUnavailable):
    code = "database_busy"
    detail = "The service is busy; try again shortly"


def problem(status: int, detail: str, code: str, **extra: Any) -> dict[str, Any]:
    return {
        "type": "about:blank",
        "title": HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
        "code": code,
        **extra,
    }


def error_response(error: AppError) -> JSONResponse:
    return JSONResponse(
        error.to_problem(), status_code=error.status, media_type=PROBLEM_JSON, headers=error.headers
    )


_RETRY_SOON = {"Retry-After": "1"}


async def _app_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, AppError)
    return error_response(exc)


def _location(loc: tuple[Any, ...] | list[Any]) -> list[str | int]:
    return [part if isinstance(part, int) else str(part) for part in loc]


async def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    if any(error.get("type") == "json_invalid" for error in errors):
        return error_response(InvalidJson())
    if any(error.get("type") == "model_attributes_type" for error in errors):
        return error_response(InvalidBody())
    # Echoing `input` back could reflect secrets or huge payloads, so only loc and msg go out.
    details = [{"loc": _location(error["loc"]), "msg": error["msg"]} for error in errors]
    return error_response(Unprocessable(errors=details))


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}


async def _http_error(_: Request, exc: Exception) -> JSONResponse:
    """Starlette's own errors (an unknown route, a wrong method): their status is the data."""
    assert isinstance(exc, StarletteHTTPException)
    status = exc.status_code
    detail = exc.detail if isinstance(exc.detail, str) else HTTPStatus(status).phrase
    return JSONResponse(
        problem(status, detail, _HTTP_CODES.get(status, f"http_{status}")),
        status_code=status,
        media_type=PROBLEM_JSON,
        headers=dict(exc.headers or {}),
    )


async def _database_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, DBAPIError)
    if is_unreachable(exc):
        logger.warning(
            "database unavailable on %s %s: %s",
            request.method,
            request.url.path,
            type(exc.orig).__name__,
        )
        return error_response(DatabaseUnavailable(headers=_RETRY_SOON))
    raise exc


async def _too_deep(_: Request, exc: Exception) -> JSONResponse:
    return error_response(InvalidBody("The request body is nested too deeply"))


async def _connection_error(request: Request, exc: Exception) -> JSONResponse:
    # Raised by database drivers that cannot connect (before SQLAlchemy wraps anything).
    logger.warning(
        "connection failed on %s %s: %s", request.method, request.url.path, type(exc).__name__
    )
    return error_response(DatabaseUnavailable(headers=_RETRY_SOON))


async def _pool_exhausted(request: Request, exc: Exception) -> JSONResponse:
    logger.warning("no database connection free for %s %s", request.method, request.url.path)
    return error_response(DatabaseBusy(headers=_RETRY_SOON))


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(AppError, _app_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(DBAPIError, _database_error)
    app.add_exception_handler(PoolTimeout, _pool_exhausted)
    app.add_exception_handler(RecursionError, _too_deep)
    app.add_exception_handler(OSError, _connection_error)
