"""Who is calling and what they may do: API keys in headers, dashboard sessions in a cookie, role checks.

Keys travel as `Authorization: Bearer <key>` or `X-API-Key: <key>`. The dashboard's sign-in form turns
a key into a session cookie (HttpOnly, SameSite=Strict, Secure in production); the cookie is accepted
on GET/HEAD anywhere (reading a thumbnail from an <img>) and on POSTs under /dashboard/, which must
also carry the session's CSRF token. API writes under /v1 need the key itself: no ambient credential
can make them. `identify` decides; for every /v1 call it runs in the ASGI layer (api/limits.py) before a
byte of the body is read, so a wrong key costs the server no more than a missing one. Refusals: 401
`auth_required` / `auth_invalid` / `auth_revoked`, 403 `forbidden`, and 429 `too_many_failures` (with
Retry-After) for a bad key from an address, or for a key prefix, that failed too often (api/failures.py; a
valid key is never refused).

`MODTAG_AUTH=false` (development only; refused in production) makes every caller an admin of the
`default` tenant. /healthz, /readyz and /metrics stay open: probes and Prometheus carry no key, so
keep the API port on an internal network (or put /metrics behind the proxy) in production.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import timedelta
from typing import Annotated

from fastapi import Depends, Request
from fastapi.routing import APIRoute
from fastapi.security import APIKeyCookie, APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from redis import Redis
from sqlmodel import Session, col, delete, select
from starlette.requests import HTTPConnection

from api.deps import ServicesDep, SessionDep, SettingsDep
from api.failures import client_address, refuse_repeated_failure
from core.auth import DEFAULT_TENANT, authenticate, principal_for
from core.errors import AuthError, Forbidden
from core.logs import add_log_fields
from core.metrics import AUTH_FAILURES
from core.principals import Permission, Principal
from core.settings import Settings
from core.tables import ApiKey, DashboardSession, Role, as_utc, utcnow

SESSION_COOKIE = "modtag_session"
# Paths anyone may call. Everything else declares a permission with `Require` (tests check both lists).
PUBLIC_PATHS = frozenset(
    {
        "/healthz",
        "/readyz",
        "/metrics",
        "/docs",
        "/docs/oauth2-redirect",
        "/docs-assets",
        "/redoc",
        "/openapi.json",
        "/dashboard",
        "/dashboard/login",
        "/dashboard/logout",
        "/dashboard/sso/login",
        "/dashboard/sso/callback",
    }
)

# Security schemes: they make /docs show an "Authorize" button and parse the headers; `identify` decides.
_bearer = HTTPBearer(auto_error=False, description="`Authorization: Bearer <key>` (from `modtag keys create`)")
_api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="The key, as a header")
_session_cookie = APIKeyCookie(name=SESSION_COOKIE, auto_error=False, description="Dashboard sign-in")


# Where RequestLimitsMiddleware leaves the caller it identified (before the body was read) for `get_principal`.
DECIDED_SCOPE_KEY = "modtag.principal"


@dataclass(frozen=True)
class Presented:
    """What a request presents to say who it is, read from its headers and cookie by the security schemes."""

    authorization: str | None  # the raw Authorization header: a non-Bearer one is refused, not ignored
    bearer: str | None
    header_key: str | None
    cookie: str | None


async def presented(request: Request) -> Presented:
    """The credentials of a request that no route has seen yet (the same parsing as the route dependencies)."""
    bearer = await _bearer(request)
    return Presented(
        authorization=request.headers.get("authorization"),
        bearer=bearer.credentials if bearer is not None else None,
        header_key=await _api_key_header(request),
        cookie=await _session_cookie(request),
    )


def identify(
    connection: HTTPConnection, credentials: Presented, session: Session, settings: Settings, redis: Redis
) -> Principal:
    """The caller, or AuthError (401) / TooManyFailures (429): the one place that decides, from headers and cookie
    alone (never the body). Header keys win over the cookie; a failed key counts toward the failure limit, and the
    key is checked before the limit, so a valid key is never refused."""
    if not settings.auth:
        return Principal(name="anonymous (auth off)", role=Role.ADMIN, tenant=DEFAULT_TENANT, via="auth-off")
    key = credentials.bearer if credentials.bearer is not None else credentials.header_key
    key_attempt = key is not None or credentials.authorization is not None
    try:
        if credentials.authorization is not None and credentials.bearer is None:
            raise AuthError("send the key as `Authorization: Bearer <key>`", code="auth_invalid")
        if key is not None:
            return _known(principal_for(authenticate(session, key)))
        if credentials.cookie is not None and _cookie_allowed(connection):
            return _known(session_principal(session, credentials.cookie))
        raise AuthError(
            "this needs an API key: send `Authorization: Bearer <key>` (or sign in at /dashboard/login)",
            code="auth_required",
        )
    except AuthError as exc:
        AUTH_FAILURES.labels(code=exc.code).inc()
        if key_attempt:
            refuse_repeated_failure(redis, client_address(connection), key, settings)
        raise


def get_principal(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    services: ServicesDep,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    header_key: Annotated[str | None, Depends(_api_key_header)],
    cookie: Annotated[str | None, Depends(_session_cookie)],
) -> Principal:
    """The caller: the one RequestLimitsMiddleware identified (every /v1 call, before its body was read), else
    `identify` now (the dashboard's pages and forms)."""
    decided = request.scope.get(DECIDED_SCOPE_KEY)
    if isinstance(decided, Principal):
        return decided
    credentials = Presented(
        authorization=request.headers.get("authorization"),
        bearer=bearer.credentials if bearer is not None else None,
        header_key=header_key,
        cookie=cookie,
    )
    return identify(request, credentials, session, settings, services.redis)


PrincipalDep = Annotated[Principal, Depends(get_principal)]


class Require:
    """Route dependency: the caller must hold `permission`. `route_permission` reads it back for the tests."""

    def __init__(self, permission: Permission) -> None:
        self.permission = permission

    def __call__(self, principal: PrincipalDep) -> Principal:
        if not principal.can(self.permission):
            AUTH_FAILURES.labels(code="forbidden").inc()
            raise Forbidden(
                f"the {principal.role.value} role may not do this (it needs {self.permission.value}); "
                "use a key with the right role",
                code="forbidden",
            )
        return principal


Submitter = Annotated[Principal, Depends(Require(Permission.SUBMIT))]
Reader = Annotated[Principal, Depends(Require(Permission.READ))]
Reviewer = Annotated[Principal, Depends(Require(Permission.REVIEW))]
Reopener = Annotated[Principal, Depends(Require(Permission.REOPEN))]
Auditor = Annotated[Principal, Depends(Require(Permission.AUDIT))]
BankEditor = Annotated[Principal, Depends(Require(Permission.BANKS))]
BankCreator = Annotated[Principal, Depends(Require(Permission.BANKS_CREATE))]
ExampleEditor = Annotated[Principal, Depends(Require(Permission.EXAMPLES))]
ExampleCreator = Annotated[Principal, Depends(Require(Permission.EXAMPLES_CREATE))]
Eraser = Annotated[Principal, Depends(Require(Permission.ERASE))]
WebhookAdmin = Annotated[Principal, Depends(Require(Permission.WEBHOOKS))]
QuotaAdmin = Annotated[Principal, Depends(Require(Permission.QUOTAS))]
LabelExporter = Annotated[Principal, Depends(Require(Permission.LABELS))]


def route_permission(route: APIRoute) -> Permission | None:
    """The permission a route requires (searched through its dependency tree), or None."""
    pending = list(route.dependant.dependencies)
    while pending:
        dependant = pending.pop()
        if isinstance(dependant.call, Require):
            return dependant.call.permission
        pending.extend(dependant.dependencies)
    return None


def start_session(session: Session, key: ApiKey, settings: Settings) -> tuple[str, str]:
    """A dashboard session for `key`: returns (cookie token, CSRF token). Only the token's hash is stored."""
    token = secrets.token_urlsafe(32)
    csrf = secrets.token_urlsafe(32)
    now = utcnow()
    session.exec(delete(DashboardSession).where(col(DashboardSession.expires_at) < now))  # type: ignore[call-overload]
    session.add(
        DashboardSession(
            id=_token_hash(token),
            key_id=key.id,
            csrf_token=csrf,
            expires_at=now + timedelta(seconds=settings.session_ttl_s),
        )
    )
    session.commit()
    return token, csrf


def end_session(session: Session, token: str) -> None:
    if 0 < len(token) <= 128:
        session.exec(delete(DashboardSession).where(col(DashboardSession.id) == _token_hash(token)))  # type: ignore[call-overload]
        session.commit()


def check_csrf(principal: Principal, submitted: str | None) -> None:
    """A cookie-authenticated POST must echo the session's CSRF token (a header-key POST needs none)."""
    if principal.via != "session":
        return
    expected = principal.csrf_token or ""
    if not submitted or not expected or not hmac.compare_digest(submitted.encode(), expected.encode()):
        AUTH_FAILURES.labels(code="csrf_invalid").inc()
        raise Forbidden("the form is stale or came from another site; reload the page and retry", code="csrf_invalid")


def cookie_is_secure(request: Request, settings: Settings) -> bool:
    # Behind a TLS-terminating proxy the app sees http; production always marks the cookie Secure.
    return settings.environment == "production" or request.url.scheme == "https"


def session_principal(session: Session, token: str) -> Principal:
    """The principal of a dashboard session cookie, or AuthError (unknown, expired, or its key revoked)."""
    if not 0 < len(token) <= 128:
        raise AuthError("the sign-in cookie is not valid; sign in again", code="auth_invalid")
    row = session.exec(
        select(DashboardSession, ApiKey)
        .join(ApiKey, col(ApiKey.id) == col(DashboardSession.key_id))
        .where(DashboardSession.id == _token_hash(token))
    ).first()
    if row is None:
        raise AuthError("the sign-in is not valid (signed out?); sign in again", code="auth_invalid")
    dashboard_session, key = row
    if key.revoked_at is not None:
        raise AuthError(f"the key {key.prefix} of this sign-in was revoked", code="auth_revoked")
    if as_utc(dashboard_session.expires_at) <= utcnow():
        raise AuthError("the sign-in expired; sign in again", code="auth_required")
    return principal_for(key, via="session", csrf_token=dashboard_session.csrf_token)


def _known(principal: Principal) -> Principal:
    add_log_fields(tenant=principal.tenant)
    return principal


def _cookie_allowed(connection: HTTPConnection) -> bool:
    method = connection.scope.get("method", "")
    return method in ("GET", "HEAD") or connection.url.path.startswith("/dashboard/")


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()
