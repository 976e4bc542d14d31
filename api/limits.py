"""Limits applied before any route runs: callers identified unread, small bodies, no stray multipart.

FastAPI reads and parses a route's JSON or form body before its dependencies run, so a key check in a route
dependency cannot protect the memory of a route that takes a body: this ASGI layer does, before anything is parsed.
- Every call to /v1 is identified here (`api.auth.identify`, from its headers and cookie alone) before a byte of its
  body is read: no key, a wrong or a revoked one is 401 (`auth_required`, `auth_invalid`, `auth_revoked`), or 429
  `too_many_failures` past the failure limit, with the body unread; the caller found is handed to the route
  (`api.auth.get_principal` reads it back), so the key is looked up once.
- Every route but the uploads (`UPLOAD_ROUTES`, which read their bodies themselves under their own caps and
  only after the key check) takes at most `max_body_bytes`: a larger Content-Length is 413 `body_too_large` at
  once, and a chunked or lying body is cut off at the cap with the same answer.
- Multipart bodies go only to the uploads: elsewhere they are 415 before Starlette spools a part to disk.
- A connection must send a request's headers within `keep_alive_timeout_s` of opening (or of its previous
  answer), whatever it trickles meanwhile, or it is closed (`HeaderDeadlineProtocol`, the server's protocol).
- Past `api_max_connections` open connections or requests in progress, a request is 503 `busy` with Retry-After
  and the connection closed (the same protocol: uvicorn's own check answers a bare text 503, and at the limit
  itself rather than past it).
- Request headers past `max_header_bytes` are 431 `headers_too_large`. The server bounds what it buffers the
  same way (`server_config`: h11's incomplete-event size), but h11 lets through headers that arrive whole in one
  read, so they are counted here too.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import re
from collections.abc import Sized
from typing import Any

import h11
from sqlalchemy.exc import OperationalError
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.config import Config
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.server import ServerState

from api.auth import DECIDED_SCOPE_KEY, Presented, identify, presented
from api.deps import Services, new_session
from api.errors import error_response
from api.middleware import HttpMiddleware
from core.errors import ModtagError
from core.principals import Principal
from core.settings import Settings

log = logging.getLogger(__name__)

# What a request refused past the connection limit is told to wait: connections free up as answers go out.
BUSY_RETRY_AFTER_S = 1
# (method, path pattern) of the routes that take files: they read and cap their own bodies after the key check.
UPLOAD_ROUTES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("POST", re.compile(r"^/v1/jobs/?$")),
    ("POST", re.compile(r"^/v1/example-sets/[^/]+/items/?$")),
    ("POST", re.compile(r"^/v1/listings/?$")),
    ("POST", re.compile(r"^/v1/banks/[^/]+/items/?$")),
    ("POST", re.compile(r"^/v1/banks/[^/]+/import/?$")),  # hash lists, capped at MODTAG_BANK_IMPORT_MAX_BYTES
    ("POST", re.compile(r"^/dashboard/banks/[^/]+/import/?$")),  # the Banks page's import form, the same cap
)


def is_upload(method: str, path: str) -> bool:
    return any(method == wanted and pattern.match(path) for wanted, pattern in UPLOAD_ROUTES)


class RequestLimitsMiddleware(HttpMiddleware):
    """The body and credential limits above (nothing is buffered here)."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        super().__init__(app)
        self.settings = settings

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = str(scope.get("path", ""))
        raw = scope.get("headers", [])
        if sum(len(name) + len(value) + 4 for name, value in raw) > self.settings.max_header_bytes:
            await _refuse(
                scope,
                send,
                431,
                f"the request headers are larger than {self.settings.max_header_bytes} bytes",
                "headers_too_large",
            )
            return
        headers = _headers(scope)
        if self.settings.auth and path.startswith("/v1/"):
            request = Request(scope)  # no receive: identifying the caller cannot read the body
            try:
                scope[DECIDED_SCOPE_KEY] = await run_in_threadpool(self._identify, request, await presented(request))
            except (ModtagError, OperationalError) as exc:
                await _answer_with_handler(scope, receive, send, exc)
                return
        if is_upload(str(scope.get("method", "")), path):
            await self.app(scope, receive, send)
            return
        cap = self.settings.max_body_bytes
        media_type = headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if media_type == "multipart/form-data":
            await _refuse(scope, send, 415, "this route takes no multipart body; send JSON", "unsupported_media_type")
            return
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > cap:
            await _refuse(scope, send, 413, _too_large(cap), "body_too_large")
            return
        await self._capped(scope, receive, send, cap)

    def _identify(self, request: Request, credentials: Presented) -> Principal:
        services: Services = request.app.state.services
        with new_session(self.settings) as session:
            return identify(request, credentials, session, self.settings, services.redis)

    async def _capped(self, scope: Scope, receive: Receive, send: Send, cap: int) -> None:
        received = 0
        over = False
        answered = False

        async def capped_receive() -> Message:
            nonlocal received, over
            if over:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > cap:
                    # The route sees a disconnect and stops reading; what it answers is replaced below.
                    over = True
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal answered
            if over:
                if not answered:
                    answered = True
                    await _refuse(scope, send, 413, _too_large(cap), "body_too_large")
                return
            await send(message)

        await self.app(scope, capped_receive, guarded_send)
        if over and not answered:
            await _refuse(scope, send, 413, _too_large(cap), "body_too_large")


class HeaderDeadlineProtocol(H11Protocol):
    """uvicorn's h11 protocol, with a deadline for each request's headers: uvicorn's keep-alive timer starts only
    after an answer and any byte cancels it, so a client trickling headers a byte at a time would hold its
    connection for ever. Here the headers must be complete `timeout_keep_alive` seconds after the connection
    opened or its previous answer went, or the connection is closed."""

    _header_deadline: asyncio.TimerHandle | None = None

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        limit, self.limit_concurrency = self.limit_concurrency, None  # uvicorn's check is replaced by ours
        if limit is not None:
            self.app = _connection_limited(self.app, limit, self.connections, self.tasks)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_deadline()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:
            self._cancel_header_deadline()  # the headers are in: the body has its own deadline (api.bodies)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self._arm_header_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_deadline()
        super().connection_lost(exc)

    def _arm_header_deadline(self) -> None:
        self._cancel_header_deadline()
        self._header_deadline = self.loop.call_later(self.timeout_keep_alive, self._headers_too_slow)

    def _cancel_header_deadline(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _headers_too_slow(self) -> None:
        self._header_deadline = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()


def _connection_limited(app: ASGIApp, limit: int, connections: Sized, tasks: Sized) -> ASGIApp:
    """`app`, answering 503 `busy` while more than `limit` connections are open or requests in progress (this
    one counted: the server adds its connection and its task before the app runs)."""

    async def limited(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and (len(connections) > limit or len(tasks) > limit):
            log.warning("connection limit reached (MODTAG_API_MAX_CONNECTIONS=%d): answered 503 busy", limit)
            detail = f"this API process serves {limit} connections at once (MODTAG_API_MAX_CONNECTIONS); try again"
            await _refuse(scope, send, 503, detail, "busy", retry_after_s=BUSY_RETRY_AFTER_S)
            return
        await app(scope, receive, send)

    return limited


def _headers(scope: Scope) -> dict[str, str]:
    return {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope.get("headers", [])}


async def _answer_with_handler(scope: Scope, receive: Receive, send: Send, exc: Exception) -> None:
    """Answer `exc` as the app's own exception handler for it would (the same body, status and headers as from a
    route), and close the connection: the request's body was never read."""
    handlers = scope["app"].exception_handlers
    handler = next(handlers[kind] for kind in type(exc).__mro__ if kind in handlers)
    response = handler(Request(scope), exc)
    if inspect.isawaitable(response):
        response = await response
    response.headers["connection"] = "close"
    await response(scope, receive, send)


def _too_large(cap: int) -> str:
    return f"the request body is larger than {cap} bytes (only image uploads may be larger)"


async def _refuse(
    scope: Scope, send: Send, status: int, detail: str, code: str, *, retry_after_s: int | None = None
) -> None:
    """Answer with the API's error body (`error_response`) from outside any route: the request never reached one."""
    headers = {} if retry_after_s is None else {"retry-after": str(retry_after_s)}
    if status in (413, 431, 503):
        headers["connection"] = "close"  # the unread body is not drained; the connection cannot be reused
    await error_response(status, detail, code, headers=headers)(scope, _nothing_to_receive, send)


async def _nothing_to_receive() -> Message:
    """What a response sent by `_refuse` would read: it never does (its body is whole)."""
    return {"type": "http.disconnect"}
