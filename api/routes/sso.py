"""Single sign-on for the dashboard: `/dashboard/sso/login` sends the browser to the identity provider,
`/dashboard/sso/callback` brings it back signed in (a session as the key form makes, api/auth.py).

The protocol is api/sso.py; who the person is in modtag (tenant, role, their key row, the audit entry) is
core/sso.py. Every refusal is the sign-in page with a sentence saying what to do, never a 500.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from api import sso
from api.auth import SESSION_COOKIE, cookie_is_secure, start_session
from api.deps import ServicesDep, SessionDep, SettingsDep
from api.failures import client_address, count_sso_start, forgive_sso_start
from api.pages import render
from api.routes.dashboard import DEFAULT_PAGE, login_page, safe_next
from core import sso as identities
from core.errors import ModtagError, TooManyFailures
from core.metrics import AUTH_FAILURES

log = logging.getLogger(__name__)

router = APIRouter(prefix="/dashboard/sso", tags=["dashboard"], include_in_schema=False)

STATE_COOKIE = "modtag_sso_state"
_STATE_PATH = "/dashboard/sso"
# The callback's parameters come from the provider through the browser: anything longer is not a real answer,
# and is refused with the sign-in page rather than a validation error.
MAX_STATE_CHARS, MAX_CODE_CHARS = 512, 4096


@router.get("/login", response_class=RedirectResponse)
def sso_login(
    request: Request,
    settings: SettingsDep,
    services: ServicesDep,
    next: Annotated[str, Query(max_length=1024)] = DEFAULT_PAGE,
) -> Response:
    """The "Sign in with ..." button: off to the identity provider with a fresh state, nonce and PKCE challenge."""
    next_path = safe_next(next)
    if settings.oidc_issuer is None:
        return login_page(
            request, settings, next_path, "Single sign-on is not set up here; sign in with a key.", status=404
        )
    address = client_address(request)
    try:
        count_sso_start(services.redis, address, settings)
    except ModtagError as exc:
        return _refused(request, settings, next_path, exc)
    try:
        url, state = sso.start(settings, services.redis, _redirect_uri(request, settings), next_path)
    except ModtagError as exc:
        forgive_sso_start(services.redis, address)  # no flow was left waiting (an unreachable provider, say)
        return _refused(request, settings, next_path, exc)
    response = RedirectResponse(url, status_code=303)
    # Lax, not Strict: the provider's redirect back is a navigation from another site, and must carry it.
    response.set_cookie(
        STATE_COOKIE, state, max_age=sso.FLOW_TTL_S, path=_STATE_PATH, httponly=True, samesite="lax",
        secure=cookie_is_secure(request, settings),
    )  # fmt: skip
    return response


@router.get("/callback", response_class=HTMLResponse)
def sso_callback(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    services: ServicesDep,
    state: str = "",
    code: str = "",
    error: str = "",
    error_description: str = "",
) -> Response:
    """Where the identity provider sends the browser back: check the state, exchange the code, start a session."""
    expected = request.cookies.get(STATE_COOKIE, "")
    next_path = DEFAULT_PAGE
    if settings.oidc_issuer is None:
        return _refused(
            request, settings, next_path, sso.SsoFailed("single sign-on is not set up here; sign in with a key")
        )
    ours = bool(state) and len(state) <= MAX_STATE_CHARS and bool(expected) and _same(state, expected)
    if error:  # the provider's own refusal (some leave the state out of it): say what it said, sign nothing in
        if ours:
            with contextlib.suppress(ModtagError):
                sso.take_flow(services.redis, state)
        said = f"{error}: {error_description}" if error_description else error
        refusal = sso.SsoFailed(f"the identity provider did not sign you in ({_printable(said)[:200]})")
        return _refused(request, settings, next_path, refusal, flow_spent=ours)
    if not ours:
        # Not this browser's flow: its own pending sign-in (if any) is left alone, its cookie kept.
        mismatch = sso.SsoFailed(
            "this sign-in was not started in this browser, or it expired; press the sign-in button again"
        )
        return _refused(request, settings, next_path, mismatch)
    try:
        flow = sso.take_flow(services.redis, state)
        next_path = safe_next(flow.next_path)
        if not code or len(code) > MAX_CODE_CHARS:
            raise sso.SsoFailed("the identity provider sent no sign-in code; press the sign-in button again")
        claims, issuer = sso.finish(settings, flow, code)
        identity = identities.identity_from_claims(claims, issuer, settings)
        key = identities.sign_in(session, identity)
    except ModtagError as exc:
        return _refused(request, settings, next_path, exc, flow_spent=True)
    forgive_sso_start(services.redis, client_address(request))
    token, _ = start_session(session, key, settings)
    log.info("single sign-on: %s signed in as %s of tenant %s", key.prefix, key.role, key.tenant)
    # A page that moves on by itself, not a redirect: the session cookie is SameSite=Strict, and a browser does
    # not send it on a redirect that continues the provider's cross-site navigation.
    response = render(request, "signed_in.html", None, next_path=next_path)
    response.set_cookie(
        SESSION_COOKIE, token, max_age=settings.session_ttl_s, path="/", httponly=True, samesite="strict",
        secure=cookie_is_secure(request, settings),
    )  # fmt: skip
    response.delete_cookie(STATE_COOKIE, path=_STATE_PATH)
    return response


def _refused(
    request: Request, settings: SettingsDep, next_path: str, exc: ModtagError, *, flow_spent: bool = False
) -> Response:
    """The sign-in page saying what went wrong (with the key form still there)."""
    AUTH_FAILURES.labels(code=exc.code).inc()
    response = login_page(
        request, settings, next_path, exc.message[:1].upper() + exc.message[1:] + ".", status=exc.http_status
    )
    if flow_spent:
        response.delete_cookie(STATE_COOKIE, path=_STATE_PATH)
    if isinstance(exc, TooManyFailures):
        response.headers["Retry-After"] = str(exc.retry_after_s)
    return response


def _redirect_uri(request: Request, settings: SettingsDep) -> str:
    return settings.oidc_redirect_url or str(request.url_for("sso_callback"))


def _same(presented: str, expected: str) -> bool:
    return hmac.compare_digest(presented.encode("utf-8", "replace"), expected.encode("utf-8", "replace"))


def _printable(text: str) -> str:
    return "".join(char for char in text if char.isprintable())
