"""Single sign-on for the dashboard over plain HTTP against a real OpenID Connect provider process
(`oidc-provider-mock`), on SQLite and PostgreSQL: the sign-in lands with the mapped tenant and role, is audited,
and every way it can go wrong is a page saying what to do (never a 500, never a default role or tenant).
The browser test (tests/e2e/test_dashboard_browser.py) walks the same sign-in in Chromium.
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import redis
from sqlmodel import col, select

from api.app import create_app
from core.db import session_scope
from core.sso import identity_prefix
from core.tables import ApiKey, AuditEntry, DashboardSession
from modtag.servers import free_port
from tests.support.api import Api, api_settings, serve
from tests.support.dashboard import csrf_of, signed_in
from tests.support.oidc import CLIENT_ID, OidcProvider, oidc_provider

pytestmark = pytest.mark.timeout(120)

ROLE_CLAIM, TENANT_CLAIM = "groups", "org"
ROLE_MAP = "modtag-moderators=review,modtag-admins=admin,modtag-uploaders=submit"


@pytest.fixture(scope="module")
def provider(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OidcProvider]:
    with oidc_provider(tmp_path_factory.mktemp("oidc")) as running:
        yield running


@pytest.fixture(scope="module")
def api_overrides(provider: OidcProvider) -> dict[str, Any]:
    return provider.settings(oidc_role_claim=ROLE_CLAIM, oidc_tenant_claim=TENANT_CLAIM, oidc_roles=ROLE_MAP)


def browser(api: Api) -> httpx.Client:
    """A cookie-keeping client without a key, as a browser is."""
    return httpx.Client(base_url=api.base_url, timeout=30)


def start(client: httpx.Client, next_path: str = "/dashboard/review") -> httpx.Response:
    response = client.get("/dashboard/sso/login", params={"next": next_path}, follow_redirects=False)
    assert response.status_code == 303, response.text[:500]
    return response


def through_provider(api: Api, provider: OidcProvider, client: httpx.Client, subject: str) -> httpx.Response:
    """Press the sign-in button, sign in at the provider as `subject`, come back: the callback's answer."""
    authorize = start(client).headers["location"]
    back = provider.sign_in_as(client, authorize, subject)
    assert back.status_code == 302, back.text[:500]
    assert back.headers["location"].startswith(f"{api.base_url}/dashboard/sso/callback?")
    return client.get(back.headers["location"])


def alert(page: httpx.Response) -> str:
    match = re.search(r'role="alert">(.*?)</div>', page.text, re.S)
    assert match, page.text[:1000]
    return match.group(1)


def test_the_login_page_offers_single_sign_on(api: Api) -> None:
    with browser(api) as client:
        page = client.get("/dashboard/login", params={"next": "/dashboard/review"})
    assert 'href="/dashboard/sso/login?next=/dashboard/review"' in page.text
    assert "Sign in with Test IdP" in page.text


def test_signing_in_lands_on_the_dashboard_with_the_mapped_tenant_and_role(api: Api, provider: OidcProvider) -> None:
    provider.set_user(
        "mia", {"name": "Mia Moderator", TENANT_CLAIM: "acme", ROLE_CLAIM: ["staff", "modtag-moderators"]}
    )
    with browser(api) as client:
        authorize = start(client).headers["location"]
        query = parse_qs(urlsplit(authorize).query)
        assert authorize.startswith(f"{provider.issuer}/oauth2/authorize?")
        assert query["client_id"] == [CLIENT_ID] and query["response_type"] == ["code"]
        assert query["code_challenge_method"] == ["S256"] and len(query["code_challenge"][0]) == 43
        assert query["nonce"][0] and query["state"][0] and "openid" in query["scope"][0].split()
        state_cookie = client.cookies.get("modtag_sso_state")
        assert state_cookie == query["state"][0]

        back = provider.sign_in_as(client, authorize, "mia")
        landed = client.get(back.headers["location"])
        assert landed.status_code == 200, landed.text[:500]
        assert '<meta http-equiv="refresh" content="0; url=/dashboard/review">' in landed.text
        cookie = landed.headers["set-cookie"]
        assert "modtag_session=" in cookie and "HttpOnly" in cookie and "samesite=strict" in cookie.lower()
        assert "modtag_sso_state" not in client.cookies  # the flow's cookie is spent

        review = client.get("/dashboard/review")
        assert review.status_code == 200, review.text[:500]
        assert "Mia Moderator (sso) · review · tenant acme" in review.text
        assert client.get("/dashboard/audit").status_code == 403  # a reviewer, not an admin
        # The session is the dashboard's only: the /v1 API still wants a key for writes.
        assert client.post("/v1/jobs", files={"image": ("a.png", b"x", "image/png")}).status_code == 401

        replay = client.get(back.headers["location"])  # the same callback again: the flow was taken once
        assert replay.status_code == 400 and "not started in this browser" in alert(replay)

    with session_scope(api.db_url) as session:
        key = session.exec(select(ApiKey).where(ApiKey.prefix == identity_prefix(provider.issuer, "mia"))).one()
        assert (key.tenant, key.role, key.revoked_at) == ("acme", "review", None)
        entry = session.exec(
            select(AuditEntry).where(AuditEntry.action == "session.signed_in", AuditEntry.target_id == key.id)
        ).one()
        assert entry.tenant == "acme" and entry.actor_name == "Mia Moderator (sso)"
        assert entry.after == {
            "via": "oidc",
            "issuer": provider.issuer,
            "subject": "mia",
            "tenant": "acme",
            "role": "review",
        }


def test_signing_out_ends_the_providers_session_too(api: Api, provider: OidcProvider) -> None:
    """RP-initiated logout: modtag's session ends at once, then the browser goes to the provider's
    end_session_endpoint (naming the client and where to come back), which sends it back to the sign-in page."""
    provider.set_user("uma", {TENANT_CLAIM: "acme", ROLE_CLAIM: "modtag-moderators"})
    endpoint = httpx.get(f"{provider.issuer}/.well-known/openid-configuration").json()["end_session_endpoint"]
    with browser(api) as client:
        assert through_provider(api, provider, client, "uma").status_code == 200
        token = csrf_of(client.get("/dashboard/review"))
        out = client.post("/dashboard/logout", data={"csrf_token": token}, follow_redirects=False)
        # A page that moves on by itself, not a 303: the dashboard's CSP (form-action 'self') stops a browser from
        # following a form's redirect to another origin (tests/e2e/test_dashboard_browser.py signs out in Chromium).
        refresh = re.search(r'http-equiv="refresh" content="0; url=([^"]+)"', out.text)
        assert out.status_code == 200 and refresh, out.text
        provider_url = html.unescape(refresh[1])
        assert provider_url.startswith(endpoint + "?"), provider_url
        query = parse_qs(urlsplit(provider_url).query)
        assert query == {"client_id": [CLIENT_ID], "post_logout_redirect_uri": [f"{api.base_url}/dashboard/login"]}
        assert client.get("/dashboard/review").status_code == 401  # modtag's own session ended first
        confirm = client.get(provider_url)
        assert confirm.status_code == 200 and f"{api.base_url}/dashboard/login" in confirm.text
        back = client.post(
            f"{provider.issuer}/oauth2/end_session/confirm",
            data={"redirect_uri": query["post_logout_redirect_uri"][0]},
            follow_redirects=False,
        )
        assert back.headers["location"] == f"{api.base_url}/dashboard/login"

        # A forged sign-out (another site's form) is refused before it reaches either session.
        assert through_provider(api, provider, client, "uma").status_code == 200
        out = client.post("/dashboard/logout", data={"csrf_token": "forged"}, follow_redirects=False)
        assert out.status_code == 403 and out.json()["code"] == "csrf_invalid"
        assert client.get("/dashboard/review").status_code == 200
    # A sign-in with a key signs out of modtag only.
    with signed_in(api.base_url, api.key) as keyed:
        token = csrf_of(keyed.get("/dashboard/review"))
        out = keyed.post("/dashboard/logout", data={"csrf_token": token}, follow_redirects=False)
        assert out.headers["location"] == "/dashboard/login"


def test_a_new_role_at_the_provider_ends_the_old_sessions(api: Api, provider: OidcProvider) -> None:
    provider.set_user("ola", {TENANT_CLAIM: "acme", ROLE_CLAIM: "modtag-admins"})
    with browser(api) as admin_browser, browser(api) as later:
        assert through_provider(api, provider, admin_browser, "ola").status_code == 200
        assert admin_browser.get("/dashboard/audit").status_code == 200
        provider.set_user("ola", {TENANT_CLAIM: "acme", ROLE_CLAIM: "modtag-uploaders"})
        assert through_provider(api, provider, later, "ola").status_code == 200
        assert "ola (sso) · submit · tenant acme" in later.get("/dashboard/flagged").text
        assert admin_browser.get("/dashboard/audit").status_code == 401  # the admin session ended with its role
    with session_scope(api.db_url) as session:
        rows = session.exec(select(ApiKey).where(ApiKey.prefix == identity_prefix(provider.issuer, "ola"))).all()
        assert sorted((row.role, row.revoked_at is None) for row in rows) == [("admin", False), ("submit", True)]
        live = [row.id for row in rows if row.revoked_at is None]
        assert len(session.exec(select(DashboardSession).where(col(DashboardSession.key_id).in_(live))).all()) == 1


# Every shape of a bad claim is in tests/unit/test_sso_claims.py; these go through the provider end to end.
@pytest.mark.parametrize(
    ("claims", "code_words"),
    [
        ({ROLE_CLAIM: "modtag-moderators"}, f"no `{TENANT_CLAIM}` claim"),
        ({TENANT_CLAIM: "acme", ROLE_CLAIM: ["admin", "root"]}, "names no modtag role"),  # raw names are not mapped
        ({TENANT_CLAIM: "a" * 5000, ROLE_CLAIM: "modtag-admins"}, "is not a modtag tenant"),
    ],
    ids=["no-tenant", "unknown-role", "huge-tenant"],
)
def test_a_missing_or_unknown_claim_is_refused_with_a_page(
    api: Api, provider: OidcProvider, claims: dict[str, Any], code_words: str
) -> None:
    subject = f"claims-{abs(hash(code_words + str(claims)[:40])) % 10**8}"
    provider.set_user(subject, claims)
    with browser(api) as client:
        page = through_provider(api, provider, client, subject)
        assert page.status_code == 403, page.text[:500]
        assert code_words in alert(page) and "administrator" in alert(page)
        assert "modtag_session" not in client.cookies
        assert client.get("/dashboard/flagged").status_code == 401
    with session_scope(api.db_url) as session:
        assert (
            session.exec(select(ApiKey).where(ApiKey.prefix == identity_prefix(provider.issuer, subject))).first()
            is None
        )


def test_a_bad_or_missing_state_is_refused(api: Api, provider: OidcProvider) -> None:
    provider.set_user("sam", {TENANT_CLAIM: "acme", ROLE_CLAIM: "modtag-admins"})
    with browser(api) as client:
        authorize = start(client).headers["location"]
        back = provider.sign_in_as(client, authorize, "sam").headers["location"]
        query = parse_qs(urlsplit(back).query)
        code, state = query["code"][0], query["state"][0]
        for params in (
            {"code": code},  # no state
            {"code": code, "state": "forged"},
            {"code": code, "state": state + "x"},
            {"code": code, "state": "\x00" * 600},
            {"code": code, "state": "s" * 20_000},
        ):
            page = client.get("/dashboard/sso/callback", params=params)
            assert page.status_code in (400, 431), (params.get("state", "")[:20], page.text[:300])
            assert page.status_code == 431 or "not started in this browser" in alert(page)
        # The state of this browser's flow, but in another browser (no cookie): refused too.
        with browser(api) as other:
            page = other.get("/dashboard/sso/callback", params={"code": code, "state": state})
            assert page.status_code == 400 and "not started in this browser" in alert(page)
        # None of that spent the real flow, which still completes once.
        assert client.get(back).status_code == 200
        assert "tenant acme" in client.get("/dashboard/flagged").text


def test_the_provider_saying_no_is_a_page(api: Api, provider: OidcProvider) -> None:
    with browser(api) as client:
        authorize = start(client).headers["location"]
        client.get(authorize)
        denied = client.post(authorize, data={"action": "deny"}, follow_redirects=False)
        assert denied.status_code == 302
        page = client.get(denied.headers["location"])
        assert page.status_code == 400 and "did not sign you in (access_denied" in alert(page)
        # A forged code with a real state: the provider refuses it at the token endpoint.
        authorize = start(client).headers["location"]
        state = parse_qs(urlsplit(authorize).query)["state"][0]
        page = client.get("/dashboard/sso/callback", params={"code": "forged-code", "state": state})
        assert page.status_code == 400 and "refused the sign-in code" in alert(page)


def test_an_unreachable_provider_is_a_page_not_a_500(tmp_path: Path, redis_server: Any) -> None:
    """A provider nobody listens for, on the sign-in button; one that went away mid-sign-in, on the way back."""
    nobody = f"http://127.0.0.1:{free_port()}"
    settings = api_settings(
        tmp_path / "none", f"sqlite:///{tmp_path / 'none.db'}", redis_server.url,
        oidc_issuer=nobody, oidc_client_id=CLIENT_ID, oidc_client_secret="s", oidc_timeout_s=2,
        auth_max_failures=2,
    )  # fmt: skip
    counter = redis.Redis.from_url(redis_server.url)
    counter.delete("modtag:authfail:sso:127.0.0.1")
    with serve(create_app(settings)) as base_url, httpx.Client(base_url=base_url, timeout=30) as client:
        for _ in range(3):  # a sign-in that could not start leaves no flow, so it never counts towards the 429
            page = client.get("/dashboard/sso/login", follow_redirects=False)
            assert page.status_code == 503, page.text[:500]
        assert f"the identity provider at {nobody} cannot be reached" in alert(page).lower()
        assert 'id="key"' in page.text  # the key form is still there
    assert int(counter.get("modtag:authfail:sso:127.0.0.1") or 0) == 0
    counter.close()

    with oidc_provider(tmp_path) as going:
        going.set_user("vic", {TENANT_CLAIM: "acme", ROLE_CLAIM: "admin"})
        settings = api_settings(
            tmp_path / "gone", f"sqlite:///{tmp_path / 'none.db'}", redis_server.url,
            **going.settings(oidc_timeout_s=2),
        )  # fmt: skip
        with serve(create_app(settings)) as base_url, httpx.Client(base_url=base_url, timeout=30) as client:
            authorize = client.get("/dashboard/sso/login", follow_redirects=False).headers["location"]
            back = going.sign_in_as(client, authorize, "vic").headers["location"]
            going.stop()
            page = client.get(back)
            assert page.status_code == 503, page.text[:500]
            assert "cannot be reached" in alert(page) and 'id="key"' in page.text


def test_without_settings_there_is_no_single_sign_on(tmp_path: Path, redis_server: Any) -> None:
    settings = api_settings(tmp_path, f"sqlite:///{tmp_path / 'modtag.db'}", redis_server.url)
    with serve(create_app(settings)) as base_url, httpx.Client(base_url=base_url, timeout=30) as client:
        assert "Sign in with" not in client.get("/dashboard/login").text
        assert client.get("/dashboard/sso/login").status_code == 404
        assert client.get("/dashboard/sso/callback", params={"code": "c", "state": "s"}).status_code == 400


def test_sign_ins_started_and_never_finished_are_limited_per_address(
    tmp_path: Path, redis_server: Any, provider: OidcProvider
) -> None:
    """Each press of the button holds a flow in Redis for ten minutes: one address may leave at most
    MODTAG_AUTH_MAX_FAILURES unfinished in the window, and a finished sign-in gives its place back."""
    provider.set_user("kim", {TENANT_CLAIM: "acme", ROLE_CLAIM: "modtag-moderators"})
    settings = api_settings(
        tmp_path, f"sqlite:///{tmp_path / 'modtag.db'}", redis_server.url, auth_max_failures=3,
        **provider.settings(oidc_role_claim=ROLE_CLAIM, oidc_tenant_claim=TENANT_CLAIM, oidc_roles=ROLE_MAP),
    )  # fmt: skip
    counter = redis.Redis.from_url(redis_server.url)
    counter.delete("modtag:authfail:sso:127.0.0.1")  # other tests of this module started flows from here too
    try:
        with serve(create_app(settings)) as base_url, httpx.Client(base_url=base_url, timeout=30) as client:
            login = "/dashboard/sso/login"
            authorize = [client.get(login, follow_redirects=False).headers["location"] for _ in range(3)]
            refused = client.get(login, follow_redirects=False)
            assert refused.status_code == 429, refused.text[:500]
            assert 0 < int(refused.headers["Retry-After"]) <= settings.auth_failure_window_s
            assert "started from this address and not finished" in alert(refused) and 'id="key"' in refused.text
            assert int(counter.get("modtag:authfail:sso:127.0.0.1") or 0) == 3  # a refusal holds no flow

            # The last flow (this browser's state cookie) completes: its place is free again, once.
            back = provider.sign_in_as(client, authorize[-1], "kim").headers["location"]
            assert client.get(back).status_code == 200
            assert "tenant acme" in client.get("/dashboard/flagged").text
            assert client.get(login, follow_redirects=False).status_code == 303
            assert client.get(login, follow_redirects=False).status_code == 429
    finally:
        counter.delete("modtag:authfail:sso:127.0.0.1")
        counter.close()
