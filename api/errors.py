"""Exception handlers: every error body is `{"detail": "<sentence>", "code": "<snake_case>"}`."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import RedirectResponse, Response
from starlette.routing import Match

from core.errors import ModtagError
from core.public import ErrorBody

logger = logging.getLogger(__name__)

_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_field",
    429: "rate_limited",
    503: "not_ready",
}
_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
_LOCATIONS = {"query": "query parameter", "path": "path parameter", "header": "header", "body": "field"}


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers on `app`; the catch-all one sits in Starlette's outermost middleware."""
    app.add_exception_handler(ModtagError, _modtag_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(OperationalError, _database_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _unexpected_error)


def error_response(
    status: int, detail: str, code: str, *, headers: Mapping[str, str] | None = None, **extra: Any
) -> JSONResponse:
    """The one way an error leaves the API."""
    return JSONResponse({"detail": detail, "code": code, **extra}, status_code=status, headers=headers)


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses=` entries documenting the error body for these statuses, and the 429 and 503 any route
    that reads the database or checks a key may answer."""
    documented: dict[int | str, dict[str, Any]] = {
        status: {"model": ErrorBody, "description": HTTPStatus(status).phrase + " (see `code`)"} for status in statuses
    }
    documented.setdefault(
        429,
        {
            "model": ErrorBody,
            "description": "Too many failed key checks from this address or for this key (`too_many_failures`)",
            "headers": {"Retry-After": {"description": "Seconds to wait.", "schema": {"type": "integer"}}},
        },
    )
    documented.setdefault(
        503, {"model": ErrorBody, "description": "The database or Redis is unavailable; retry shortly"}
    )
    return documented


async def _modtag_error(_request: Request, exc: ModtagError) -> JSONResponse:
    if exc.http_status >= 500:
        logger.warning("request failed: %s", exc)
    retry_after_s = getattr(exc, "retry_after_s", None)  # TooManyFailures, api.bodies.UploadsBusy
    headers = {"Retry-After": str(retry_after_s)} if retry_after_s is not None else None
    if exc.http_status == 415:
        # Whatever of the body is still unsent would be read and thrown away: end the connection instead.
        headers = {**(headers or {}), "Connection": "close"}
    return error_response(exc.http_status, exc.message, exc.code, headers=headers)


async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = list(exc.errors())
    if not errors:
        return error_response(422, "the request is invalid", "invalid_field")
    first = errors[0]
    loc = [str(part) for part in first.get("loc", ())]
    where = _LOCATIONS.get(loc[0], "field") if loc else "field"
    name = ".".join(loc[1:]) or (loc[0] if loc else "request")
    detail = f"{where} `{name[:100]}`: {first.get('msg', 'is invalid')}"
    if len(errors) > 1:
        detail += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return error_response(422, detail, "invalid_field")


async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
    status = exc.status_code
    code = _HTTP_CODES.get(status) or _phrase_code(status)
    path = request.url.path[:200]
    headers = dict(exc.headers or {})
    if status == 404 and (other := _other_slash(request)) is not None:
        # The router's own slash redirect builds an absolute URL from the Host header; this one stays on the
        # server that was asked, whatever Host said.
        query = f"?{request.url.query}" if request.url.query else ""
        return RedirectResponse(other + query, status_code=307)
    if status == 404:
        detail = f"there is no {path}; see /docs for the API's routes"
    elif status == 405:
        headers["Allow"] = allowed = _allowed_methods(request) or headers.get("Allow", "")
        detail = f"{request.method[:16]} is not allowed on {path}" + (f"; use {allowed}" if allowed else "")
    elif isinstance(exc.detail, str) and exc.detail and exc.detail != _phrase(status):
        detail = exc.detail
    else:
        detail = f"the request failed: {_phrase(status).lower()}"
    if status == 415:
        headers["Connection"] = "close"
    return error_response(status, detail, code, headers=headers or None)


def _other_slash(request: Request) -> str | None:
    """The path with its trailing slash added or removed when that path has a route, else None."""
    path = request.url.path
    if path == "/" or path.startswith("//"):  # "//host/" as a Location would leave for another site
        return None
    other = path[:-1] if path.endswith("/") else path + "/"
    scope = {**request.scope, "path": other, "root_path": ""}
    if other.startswith("//") or not any(route.matches(scope)[0] != Match.NONE for route in request.app.router.routes):
        return None
    return other


def _allowed_methods(request: Request) -> str:
    """Every method some route serves at this path (the router names only the first route's)."""
    routes = request.app.router.routes
    return ", ".join(
        method
        for method in _METHODS
        if any(route.matches({**request.scope, "method": method})[0] == Match.FULL for route in routes)
    )


async def _database_error(_request: Request, exc: OperationalError) -> JSONResponse:
    # A database outage is not the client's fault and may pass: 503 tells clients to retry.
    logger.warning("database unavailable: %s", type(exc.orig).__name__ if exc.orig else exc)
    return error_response(503, "the database is unavailable; retry shortly", "database_unavailable")


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    # Starlette re-raises after this response is sent, so the server logs the traceback; never the client.
    logger.error("unexpected %s on %s %s", type(exc).__name__, request.method, request.url.path[:200])
    return error_response(500, "an unexpected error occurred; it has been logged", "internal_error")


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def _phrase_code(status: int) -> str:
    return "_".join(_phrase(status).lower().replace("-", " ").split())
