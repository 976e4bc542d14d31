"""HTTP metrics, labelled by route template (`/v1/jobs/{job_id}`), never by raw path: labels stay bounded."""

from __future__ import annotations

import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core.logs import log_context, request_id_from
from core.metrics import HTTP_DURATION, HTTP_REQUESTS

UNMATCHED = "unmatched"
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class HttpMiddleware:
    """A plain ASGI middleware (streaming bodies pass untouched) that sees HTTP requests only: `handle` them."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        await self.handle(scope, receive, send)

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


class HttpMetricsMiddleware(HttpMiddleware):
    """Counts and times every HTTP request."""

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        status = 500  # what the client gets if the app raises before answering

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            method = scope["method"] if scope["method"] in _METHODS else "other"
            route = route_template(scope)
            HTTP_REQUESTS.labels(method=method, route=route, status=str(status)).inc()
            HTTP_DURATION.labels(method=method, route=route).observe(time.perf_counter() - started)


class RequestIdMiddleware(HttpMiddleware):
    """Every request gets an id (the caller's X-Request-ID when sane), echoed in the response and bound to its log
    lines; the jobs it submits carry it to the worker."""

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        sent = next((value for name, value in scope.get("headers", []) if name.lower() == b"x-request-id"), None)
        request_id = request_id_from(sent.decode("latin-1") if sent is not None else None)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                kept = [(name, value) for name, value in message.get("headers", []) if name.lower() != b"x-request-id"]
                message = {**message, "headers": [*kept, (b"x-request-id", request_id.encode())]}
            await send(message)

        with log_context(request_id=request_id):
            await self.app(scope, receive, send_with_id)


def route_template(scope: Scope) -> str:
    """The path template of the route the router matched (it records it in the shared scope)."""
    path = getattr(scope.get("route"), "path", None)
    return path if isinstance(path, str) and path else UNMATCHED


# The dashboard needs no script, no frames and no other origin: anything injected despite escaping stays inert.
DASHBOARD_HEADERS = [
    (
        b"content-security-policy",
        b"default-src 'none'; img-src 'self'; style-src 'unsafe-inline'; form-action 'self'; "
        b"frame-ancestors 'none'; base-uri 'none'",
    ),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
    (b"cache-control", b"no-store"),
]


class DashboardHeadersMiddleware:
    """Security headers on every /dashboard response (pages hold one tenant's data: never cached, never framed)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not str(scope.get("path", "")).startswith("/dashboard"):
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                names = {name for name, _ in DASHBOARD_HEADERS}
                kept = [(name, value) for name, value in message.get("headers", []) if name.lower() not in names]
                message = {**message, "headers": kept + DASHBOARD_HEADERS}
            await send(message)

        await self.app(scope, receive, send_with_headers)
