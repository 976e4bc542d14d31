"""Single sign-on's settings and claim mapping (core/sso.py, core/settings.py): what a provider may send and what an
operator may configure, broken, hostile and huge included. The flow itself is tested against a real provider
process in tests/integration/test_dashboard_sso.py."""

from __future__ import annotations

from typing import Any

import pytest

from core.errors import ConfigError, Forbidden
from core.settings import Settings, load_settings
from core.sso import identity_from_claims, identity_prefix, role_from_claim
from core.tables import Role

ISSUER = "https://idp.example.com"
SSO = {"oidc_issuer": ISSUER, "oidc_client_id": "modtag", "oidc_client_secret": "s3cret"}


def settings(**fields: Any) -> Settings:
    return Settings(_env_file=None, **{**SSO, **fields})


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"oidc_issuer": "ftp://idp.example.com"}, "http(s) URL"),
        ({"oidc_issuer": "https://idp.example.com/?tenant=a"}, "without a query"),
        ({"oidc_issuer": "https://idp example.com"}, "http(s) URL"),
        ({"oidc_issuer": "https://" + "a" * 100_000}, None),  # huge but well-formed: accepted, bounded elsewhere
        ({"oidc_issuer": "javascript:alert(1)"}, "http(s) URL"),
        ({"oidc_redirect_url": "//evil.example/cb"}, "http(s) URL"),
        ({"oidc_client_secret": None}, "together"),
        ({"oidc_roles": "moderators=root"}, "value=role"),
        ({"oidc_roles": "moderators"}, "value=role"),
        ({"oidc_roles": "," * 10_000}, None),  # only separators: no pairs, the claim holds role names
        ({"oidc_timeout_s": 0}, "greater than 0"),
        ({"oidc_timeout_s": 3600}, "less than or equal to 60"),
        ({"environment": "production", "oidc_issuer": "http://idp.example.com", "admin_key": None}, "https"),
    ],
)
def test_sso_settings_are_checked(fields: dict[str, Any], words: str | None) -> None:
    if words is None:
        settings(**fields)
        return
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
        settings(**fields)


def test_sso_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODTAG_OIDC_ISSUER", ISSUER)
    monkeypatch.setenv("MODTAG_OIDC_CLIENT_ID", "modtag")
    with pytest.raises(ConfigError, match="together"):
        load_settings()
    monkeypatch.setenv("MODTAG_OIDC_CLIENT_SECRET", "s3cret")
    monkeypatch.setenv("MODTAG_OIDC_ISSUER", "")  # as compose writes an unset variable
    monkeypatch.setenv("MODTAG_OIDC_CLIENT_ID", "")
    monkeypatch.setenv("MODTAG_OIDC_CLIENT_SECRET", "")
    assert load_settings().oidc_issuer is None


def test_roles_map_through_the_setting_and_a_list_takes_the_highest() -> None:
    plain = settings()
    assert role_from_claim("review", plain) is Role.REVIEW
    assert role_from_claim(["submit", "admin", "review"], plain) is Role.ADMIN
    mapped = settings(oidc_roles=" moderators = review , leads=admin,uploaders=submit")
    assert role_from_claim(["staff", "moderators"], mapped) is Role.REVIEW
    assert role_from_claim(["moderators", "leads"], mapped) is Role.ADMIN
    with pytest.raises(Forbidden) as refused:
        role_from_claim("admin", mapped)  # with a mapping, raw role names are not roles
    assert refused.value.code == "sso_role_unknown" and "leads, moderators, uploaders" in refused.value.message


@pytest.mark.parametrize(
    ("value", "code"),
    [
        (None, "sso_claim_missing"),
        ("", "sso_claim_missing"),
        ([], "sso_claim_missing"),
        ("Admin", "sso_role_unknown"),
        ("admin ", "sso_role_unknown"),
        (["x" * 100_000] * 1000, "sso_role_unknown"),
        ([{"role": "admin"}, 7, None], "sso_role_unknown"),
        (True, "sso_role_unknown"),
        ({"admin": True}, "sso_role_unknown"),
    ],
)
def test_a_missing_or_unknown_role_is_refused_never_defaulted(value: object, code: str) -> None:
    with pytest.raises(Forbidden) as refused:
        role_from_claim(value, settings())
    assert refused.value.code == code and refused.value.http_status == 403
    assert len(refused.value.message) < 600  # a huge claim is not echoed whole


@pytest.mark.parametrize(
    ("claims", "code"),
    [
        ({"modtag_role": "admin", "modtag_tenant": "acme"}, "sso_claim_missing"),  # no sub
        ({"sub": "", "modtag_role": "admin", "modtag_tenant": "acme"}, "sso_claim_missing"),
        ({"sub": "u", "modtag_role": "admin"}, "sso_claim_missing"),
        ({"sub": "u", "modtag_role": "admin", "modtag_tenant": "ACME"}, "sso_tenant_invalid"),
        ({"sub": "u", "modtag_role": "admin", "modtag_tenant": "../etc"}, "sso_tenant_invalid"),
        ({"sub": "u", "modtag_role": "admin", "modtag_tenant": "a\x00b"}, "sso_tenant_invalid"),
        ({"sub": "u", "modtag_role": "admin", "modtag_tenant": 42}, "sso_tenant_invalid"),
        ({"sub": "u", "modtag_tenant": "acme"}, "sso_claim_missing"),
    ],
)
def test_claims_without_a_usable_tenant_or_role_are_refused(claims: dict[str, Any], code: str) -> None:
    with pytest.raises(Forbidden) as refused:
        identity_from_claims(claims, ISSUER, settings())
    assert refused.value.code == code


def test_an_identity_is_named_and_keyed_by_issuer_and_subject() -> None:
    claims = {"sub": "u-1", "modtag_role": "review", "modtag_tenant": "acme", "name": "Ada\x07 Lovelace" + "e" * 300}
    identity = identity_from_claims(claims, ISSUER, settings())
    assert (identity.tenant, identity.role, identity.subject) == ("acme", Role.REVIEW, "u-1")
    assert identity.name.startswith("Ada Lovelace") and identity.name.endswith(" (sso)") and len(identity.name) <= 128
    assert identity_from_claims({**claims, "name": None, "email": "a@x"}, ISSUER, settings()).name == "a@x (sso)"
    assert identity_prefix(ISSUER, "u-1") != identity_prefix("https://other.example", "u-1")
    assert identity_prefix(ISSUER, "u-1").startswith("sso_") and len(identity_prefix(ISSUER, "u-1")) <= 32
