"""One exception hierarchy, rendered as RFC 9457 problem documents by one set of handlers."""

import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException

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
    status: int = 500
    code: str = "internal_error"
    detail: str = "Internal server error"

    def __init__(
        self,
        detail: str | None = None,
        *,
        code: str | None = None,
        status: int | None = None,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        self.detail = detail or self.detail
        self.code = code or self.code
        self.status = status or self.status
        self.headers = headers
        self.extra = extra
        super().__init__(self.detail)

    def to_problem(self) -> dict[str, Any]:
        return problem(self.status, self.detail, self.code, **self.extra)


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


class UpstreamError(AppError):
    """The model provider failed; status follows the kind of failure (429, 502, 503, 504)."""

    status = 502
    code = "upstream_error"
    detail = "The model provider returned an error"


class ServiceUnavailable(AppError):
    status = 503
    code = "service_unavailable"
    detail = "Service temporarily unavailable"


def conversation_not_found() -> NotFound:
    return NotFound("Conversation not found", code="conversation_not_found")


def message_not_found() -> NotFound:
    return NotFound("Message not found", code="message_not_found")


def problem(status: int, detail: str, code: str, **extra: Any) -> dict[str, Any]:
    return {
        "type": "about:blank",
        "title": HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
        "code": code,
        **extra,
    }


def problem_response(
    status: int, detail: str, code: str, headers: dict[str, str] | None = None, **extra: Any
) -> JSONResponse:
    return JSONResponse(
        problem(status, detail, code, **extra),
        status_code=status,
        media_type=PROBLEM_JSON,
        headers=headers,
    )


async def _app_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, AppError)
    return JSONResponse(
        exc.to_problem(), status_code=exc.status, media_type=PROBLEM_JSON, headers=exc.headers
    )


def _location(loc: tuple[Any, ...] | list[Any]) -> list[str | int]:
    return [part if isinstance(part, int) else str(part) for part in loc]


async def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    if any(error.get("type") == "json_invalid" for error in errors):
        return problem_response(400, "The request body is not valid JSON", "invalid_json")
    if any(error.get("type") == "model_attributes_type" for error in errors):
        return problem_response(400, "The request body must be a JSON object", "invalid_body")
    # Echoing `input` back could reflect secrets or huge payloads, so only loc and msg go out.
    details = [{"loc": _location(error["loc"]), "msg": error["msg"]} for error in errors]
    return problem_response(422, "The request is not valid", "validation_error", errors=details)


async def _http_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    status = exc.status_code
    codes = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}
    detail = exc.detail if isinstance(exc.detail, str) else HTTPStatus(status).phrase
    return problem_response(
        status, detail, codes.get(status, f"http_{status}"), headers=dict(exc.headers or {})
    )


async def _database_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, DBAPIError)
    if isinstance(exc, OperationalError | InterfaceError) or exc.connection_invalidated:
        logger.warning(
            "database unavailable on %s %s: %s",
            request.method,
            request.url.path,
            type(exc.orig).__name__,
        )
        return problem_response(
            503,
            "The database is not reachable; try again shortly",
            "database_unavailable",
            headers={"Retry-After": "1"},
        )
    raise exc


async def _too_deep(_: Request, exc: Exception) -> JSONResponse:
    return problem_response(400, "The request body is nested too deeply", "invalid_body")


async def _connection_error(request: Request, exc: Exception) -> JSONResponse:
    # Raised by database drivers that cannot connect (before SQLAlchemy wraps anything).
    logger.warning(
        "connection failed on %s %s: %s", request.method, request.url.path, type(exc).__name__
    )
    return problem_response(
        503,
        "The database is not reachable; try again shortly",
        "database_unavailable",
        headers={"Retry-After": "1"},
    )


async def _pool_exhausted(request: Request, exc: Exception) -> JSONResponse:
    logger.warning("no database connection free for %s %s", request.method, request.url.path)
    return problem_response(
        503,
        "The service is busy; try again shortly",
        "database_busy",
        headers={"Retry-After": "1"},
    )


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(AppError, _app_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(DBAPIError, _database_error)
    app.add_exception_handler(PoolTimeout, _pool_exhausted)
    app.add_exception_handler(RecursionError, _too_deep)
    app.add_exception_handler(OSError, _connection_error)
