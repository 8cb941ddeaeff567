"""The one mapping from errors to answers: RFC 9457 problem details (`application/problem+json`)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from sqlalchemy.exc import DBAPIError
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.db import connection_lost
from app.errors import (
    PROBLEM_MEDIA_TYPE,
    PROBLEM_TYPE_PREFIX,
    RETRY_AFTER_SECONDS,
    AppError,
    FieldError,
    InvalidInput,
    Problem,
)

logger = logging.getLogger(__name__)


def problem_response(
    instance: str,
    *,
    status: int,
    code: str,
    detail: str,
    type_: str | None = None,
    headers: Mapping[str, str] | None = None,
    **extensions: Any,
) -> JSONResponse:
    """A problem-details answer; also for middleware, which answers before any route (`instance`:
    the request path)."""
    body = Problem(
        type=type_ or f"{PROBLEM_TYPE_PREFIX}{code}",
        title=HTTPStatus(status).phrase,
        status=status,
        detail=detail,
        instance=instance,
        code=code,
        **{k: v for k, v in extensions.items() if v is not None},
    )
    return JSONResponse(
        body.model_dump(mode="json", exclude_none=True),
        status_code=status,
        media_type=PROBLEM_MEDIA_TYPE,
        headers=headers,
    )


def error_response(request: Request, exc: AppError) -> JSONResponse:
    """The answer to a domain error; also for middleware, which answers outside the exception handlers."""
    extensions: dict[str, Any] = {}
    if exc.extension is not None and exc.details:
        extensions[exc.extension] = exc.details
    return problem_response(
        request.url.path,
        status=exc.status_code,
        code=exc.code,
        detail=exc.message,
        headers=exc.headers(),
        **extensions,
    )


async def _app_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, AppError)
    return error_response(request, exc)


def _location(loc: Sequence[Any]) -> str:
    return ".".join(str(part) for part in loc)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = [
        FieldError(
            loc=[p if isinstance(p, int) else str(p) for p in e.get("loc", ())],
            msg=str(e.get("msg", "")),
            type=str(e.get("type", "")),
        )
        for e in exc.errors()
    ]
    summary = "; ".join(f"{_location(e.loc)}: {e.msg}" for e in errors) or "invalid request"
    return problem_response(
        request.url.path, status=422, code=InvalidInput.code, detail=summary, errors=errors
    )


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    # Starlette's own errors: no route (404), a method the route does not take (405, with Allow).
    assert isinstance(exc, StarletteHTTPException)
    status = exc.status_code
    code = {404: "not_found", 405: "method_not_allowed"}.get(status, f"http_{status}")
    detail = exc.detail if isinstance(exc.detail, str) else HTTPStatus(status).phrase
    headers = dict(exc.headers or {})
    if status == 405:
        # Starlette names only the methods of the one route that matched; the path may have more.
        headers["Allow"] = ", ".join(_allowed_methods(request))
    return problem_response(
        request.url.path, status=status, code=code, detail=detail, type_="about:blank", headers=headers
    )


def _allowed_methods(request: Request) -> list[str]:
    path = request.scope["path"]
    return sorted(
        {
            method
            for route in request.app.routes
            if isinstance(route, APIRoute) and route.path_regex.match(path)
            for method in route.methods or ()
        }
    )


async def _database_error(request: Request, exc: Exception) -> JSONResponse:
    # A database that went away (restart, failover, network) is a wait-and-retry, not a bug.
    if not connection_lost(exc):
        return await _unexpected(request, exc)
    logger.warning("database unavailable: %s", exc.__class__.__name__)
    return problem_response(
        request.url.path,
        status=503,
        code="database_unavailable",
        detail="the database is not reachable; try again shortly",
        headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
    )


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    # A bug: logged with its traceback; the client gets no internals.
    logger.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return problem_response(
        request.url.path, status=500, code="internal", detail="internal error; see the service log"
    )


def install_error_handlers(app: FastAPI) -> None:
    """Map every error the API can raise to a problem-details answer."""
    app.add_exception_handler(AppError, _app_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(DBAPIError, _database_error)
    app.add_exception_handler(Exception, _unexpected)
