"""OpenID Connect for the dashboard's sign-in, through authlib: discovery, the authorization code flow with state,
nonce and PKCE (S256), the code exchange and the ID token's checks (signature against the provider's keys,
issuer, audience, expiry, nonce).

A flow's secrets (nonce, PKCE verifier, where to go next) wait in Redis under the state for FLOW_TTL_S, taken once;
the browser holds only the state, in a cookie that binds the flow to it. Everything the provider is asked
is bounded by MODTAG_OIDC_TIMEOUT_S; an unreachable or misbehaving provider is `sso_unavailable` (503), a
sign-in that cannot be trusted `sso_failed` (400) or `sso_token_invalid` (401): pages, never a 500.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import httpx
import httpx2
from authlib.common.errors import AuthlibBaseError
from authlib.integrations.httpx_client import OAuth2Client
from authlib.oidc.core import CodeIDToken
from joserfc import jwt
from joserfc.errors import BadSignatureError, InvalidKeyIdError, JoseError
from joserfc.jwk import KeySet
from joserfc.jws import JWSRegistry
from redis import Redis, RedisError

from core.errors import ModtagError
from core.settings import Settings

log = logging.getLogger(__name__)

# authlib's client runs on httpx2 (the fork it prefers, locked beside httpx): its errors are not httpx's.
_CLIENT_UNREACHABLE = (httpx.TransportError, httpx2.TransportError)
_CLIENT_FAILED = (httpx.HTTPError, httpx2.HTTPError)

FLOW_TTL_S = 600  # from the sign-in button to the provider's answer: a person typing a password and a second factor
METADATA_TTL_S = 3600  # discovery and keys are re-read hourly (and the keys at once for an unknown key id)
ID_TOKEN_LEEWAY_S = 60
_FLOW_KEY = "modtag:sso:flow:"


class SsoUnavailable(ModtagError, code="sso_unavailable", http_status=503):
    """The identity provider (or the flow store) cannot be reached or answered nonsense: try again later."""


class SsoFailed(ModtagError, code="sso_failed", http_status=400):
    """The sign-in cannot be completed as it stands (expired, started in another browser, refused): start again."""


@dataclass(frozen=True)
class Flow:
    """What the callback needs to finish a sign-in that this browser started."""

    nonce: str
    code_verifier: str
    next_path: str
    redirect_uri: str


def start(settings: Settings, redis: Redis, redirect_uri: str, next_path: str) -> tuple[str, str]:
    """A new flow: returns (the provider's authorization URL to send the browser to, the state for its cookie)."""
    metadata = discover(settings)
    state, nonce, verifier = (secrets.token_urlsafe(32) for _ in range(3))
    flow = Flow(nonce=nonce, code_verifier=verifier, next_path=next_path, redirect_uri=redirect_uri)
    try:
        redis.set(_flow_key(state), json.dumps(flow.__dict__), ex=FLOW_TTL_S)
    except RedisError as exc:
        raise SsoUnavailable("sign-in is unavailable for a moment (modtag's Redis is down); try again soon") from exc
    with _client(settings, redirect_uri) as client:
        url, _ = client.create_authorization_url(
            metadata["authorization_endpoint"], state=state, code_verifier=verifier, nonce=nonce
        )
    return str(url), state


def take_flow(redis: Redis, state: str) -> Flow:
    """The flow `state` names, once: a second callback with the same state finds nothing."""
    try:
        with redis.pipeline(transaction=True) as pipe:
            pipe.get(_flow_key(state))
            pipe.delete(_flow_key(state))
            raw, _ = pipe.execute()
    except RedisError as exc:
        raise SsoUnavailable("sign-in is unavailable for a moment (modtag's Redis is down); try again soon") from exc
    if raw is None:
        raise SsoFailed("this sign-in expired or was already used; start again")
    return Flow(**json.loads(raw))


def finish(settings: Settings, flow: Flow, code: str) -> tuple[dict[str, Any], str]:
    """Exchange the code, check the ID token; returns (its claims, with userinfo's where they lack a mapped one;
    the provider's issuer)."""
    metadata = discover(settings)
    issuer = str(metadata["issuer"])
    with _client(settings, flow.redirect_uri, metadata) as client:
        try:
            token = client.fetch_token(metadata["token_endpoint"], code=code, code_verifier=flow.code_verifier)
        except _CLIENT_UNREACHABLE as exc:
            raise _unreachable(settings, exc) from exc
        except (AuthlibBaseError, *_CLIENT_FAILED, ValueError) as exc:
            log.warning("single sign-on: the token endpoint refused the code: %s", str(exc)[:300])
            raise SsoFailed("the identity provider refused the sign-in code; start again") from exc
        id_token = token.get("id_token")
        if not isinstance(id_token, str):
            raise SsoFailed("the identity provider sent no ID token; is the `openid` scope allowed for modtag?")
        claims = _checked_claims(settings, metadata, id_token, flow.nonce, str(token.get("access_token") or ""))
        wanted = (settings.oidc_tenant_claim, settings.oidc_role_claim)
        if any(name not in claims for name in wanted) and metadata.get("userinfo_endpoint"):
            claims = {**_userinfo(settings, client, str(metadata["userinfo_endpoint"]), claims), **claims}
    return claims, issuer


def end_session_url(settings: Settings, after: str) -> str | None:
    """Where a browser whose single sign-on session modtag just ended goes next, so that the provider ends its own
    session too (OpenID Connect RP-initiated logout; `after` is where the provider sends it back, to be registered
    there as a post-logout redirect URI). None (sign out of modtag alone) when the provider names no
    `end_session_endpoint` or cannot be reached.

    The request names the client, not the ID token (modtag keeps none): a provider may ask the person to confirm."""
    try:
        endpoint = discover(settings).get("end_session_endpoint")
    except ModtagError:
        return None
    if not isinstance(endpoint, str) or not endpoint.startswith(("https://", "http://")):
        return None
    query = urlencode({"client_id": settings.oidc_client_id or "", "post_logout_redirect_uri": after})
    return f"{endpoint}{'&' if '?' in endpoint else '?'}{query}"


def discover(settings: Settings) -> dict[str, Any]:
    """The provider's metadata (cached METADATA_TTL_S), or SsoUnavailable."""
    issuer = settings.oidc_issuer
    if issuer is None:
        raise SsoFailed("single sign-on is not set up here; sign in with an API key")
    url = issuer.rstrip("/") + "/.well-known/openid-configuration"
    metadata = _cached(url, lambda: _fetch_json(settings, url))
    missing = [
        name for name in ("issuer", "authorization_endpoint", "token_endpoint", "jwks_uri") if not metadata.get(name)
    ]
    if missing or str(metadata["issuer"]).rstrip("/") != issuer.rstrip("/"):
        _forget(url)
        log.warning(
            "single sign-on: discovery at %s is unusable (missing %s, issuer %r)", url, missing, metadata.get("issuer")
        )
        raise SsoUnavailable(f"the identity provider at {issuer} does not describe itself as expected; tell an admin")
    return metadata


# --- helpers ---------------------------------------------------------------------------------------


def _checked_claims(
    settings: Settings, metadata: dict[str, Any], id_token: str, nonce: str, access_token: str
) -> dict[str, Any]:
    algorithms = metadata.get("id_token_signing_alg_values_supported") or ["RS256"]
    registry = JWSRegistry(algorithms=[alg for alg in algorithms if alg != "none"], strict_check_header=False)
    jwks_uri = str(metadata["jwks_uri"])
    try:
        try:
            decoded = jwt.decode(id_token, _keys(settings, jwks_uri), registry=registry)
        except (InvalidKeyIdError, BadSignatureError):  # the provider may have rotated its keys since they were read
            _forget(jwks_uri)
            decoded = jwt.decode(id_token, _keys(settings, jwks_uri), registry=registry)
        claims = CodeIDToken(
            decoded.claims,
            decoded.header,
            {
                "iss": {"essential": True, "values": [metadata["issuer"]]},
                "aud": {"essential": True, "values": [settings.oidc_client_id]},
            },
            {"nonce": nonce, "client_id": settings.oidc_client_id, "access_token": access_token},
        )
        claims.validate(leeway=ID_TOKEN_LEEWAY_S)
    except (JoseError, ValueError, TypeError, KeyError) as exc:
        log.warning("single sign-on: ID token refused: %s", str(exc)[:300])
        raise ModtagError(
            "the identity provider's ID token did not check out (signature, issuer, audience, expiry or nonce); "
            "start again, and tell an admin if it keeps happening",
            code="sso_token_invalid",
            http_status=401,
        ) from exc
    return dict(claims)


def _keys(settings: Settings, jwks_uri: str) -> KeySet:
    document: Any = _cached(jwks_uri, lambda: _fetch_json(settings, jwks_uri))
    return KeySet.import_key_set(document)


def _userinfo(settings: Settings, client: OAuth2Client, url: str, claims: dict[str, Any]) -> dict[str, Any]:
    try:
        response = client.get(url, timeout=settings.oidc_timeout_s)
        response.raise_for_status()
        info = response.json()
    except _CLIENT_UNREACHABLE as exc:
        raise _unreachable(settings, exc) from exc
    except (*_CLIENT_FAILED, ValueError) as exc:
        raise SsoUnavailable("the identity provider's userinfo endpoint failed; try again soon") from exc
    if not isinstance(info, dict) or info.get("sub") != claims.get("sub"):
        raise SsoFailed("the identity provider's userinfo names another subject than the ID token; start again")
    return info


def _client(settings: Settings, redirect_uri: str, metadata: dict[str, Any] | None = None) -> OAuth2Client:
    methods = (metadata or {}).get("token_endpoint_auth_methods_supported") or ["client_secret_basic"]
    secret = settings.oidc_client_secret.get_secret_value() if settings.oidc_client_secret else None
    return OAuth2Client(
        client_id=settings.oidc_client_id,
        client_secret=secret,
        token_endpoint_auth_method="client_secret_basic" if "client_secret_basic" in methods else "client_secret_post",
        scope=settings.oidc_scopes,
        redirect_uri=redirect_uri,
        code_challenge_method="S256",
        timeout=settings.oidc_timeout_s,
    )


def _fetch_json(settings: Settings, url: str) -> dict[str, Any]:
    try:
        response = httpx.get(url, timeout=settings.oidc_timeout_s, follow_redirects=False)
    except httpx.HTTPError as exc:
        raise _unreachable(settings, exc) from exc
    try:
        response.raise_for_status()
        document = response.json()
    except (httpx.HTTPError, ValueError) as exc:
        log.warning("single sign-on: %s answered %s", url, response.status_code)
        raise SsoUnavailable(
            f"the identity provider answered {response.status_code} at {url}; try again soon, or sign in with a key"
        ) from exc
    if not isinstance(document, dict):
        raise SsoUnavailable(f"the identity provider's {url} is not a JSON object; tell an admin")
    return document


def _unreachable(settings: Settings, exc: Exception) -> SsoUnavailable:
    log.warning("single sign-on: the identity provider is unreachable: %s", str(exc)[:300] or type(exc).__name__)
    return SsoUnavailable(
        f"the identity provider at {settings.oidc_issuer} cannot be reached right now; try again soon, "
        "or sign in with an API key"
    )


_cache: dict[str, tuple[float, dict[str, Any]]] = {}
_cache_lock = threading.Lock()


def _cached(url: str, fetch: Any) -> dict[str, Any]:
    with _cache_lock:
        hit = _cache.get(url)
    if hit is not None and time.monotonic() - hit[0] < METADATA_TTL_S:
        return hit[1]
    document: dict[str, Any] = fetch()
    with _cache_lock:
        _cache[url] = (time.monotonic(), document)
    return document


def _forget(url: str) -> None:
    with _cache_lock:
        _cache.pop(url, None)


def _flow_key(state: str) -> str:
    return _FLOW_KEY + hashlib.sha256(state.encode()).hexdigest()
