"""Who a single sign-on user is in modtag: the provider's claims mapped to a tenant and a role, and the key row
their dashboard sessions hang on.

A session belongs to an API key row (dashboard_sessions.key_id), so each signed-in identity (issuer and
subject) gets one: a key whose secret is random and thrown away, so it can never be presented (API keys stay
for machines), named after the person, listed by `modtag keys list` with the prefix `sso_<hash of issuer and
subject>`. `modtag keys revoke` on it ends that person's sessions until they sign in again. When the provider
gives the identity another tenant or role, the next sign-in revokes the old row (ending every session it had)
and makes a new one: a demotion at the provider takes effect at the next sign-in, never later.

Refusals are 403 with a code a person can act on: `sso_claim_missing`, `sso_role_unknown`, `sso_tenant_invalid`.
Never a default role, never a default tenant.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import update
from sqlmodel import Session, col, select

from core.audit import record
from core.auth import TENANT_PATTERN, generate_key, hash_key, key_public, principal_for
from core.errors import Forbidden
from core.principals import MAX_NAME_CHARS, Principal
from core.settings import Settings
from core.tables import ApiKey, DashboardSession, Role, utcnow

PREFIX = "sso_"
_RANK = {Role.SUBMIT: 0, Role.REVIEW: 1, Role.ADMIN: 2}


@dataclass(frozen=True)
class Identity:
    """A person as the identity provider vouched for them, mapped onto modtag's tenant and role."""

    issuer: str
    subject: str
    name: str
    tenant: str
    role: Role


def identity_from_claims(claims: Mapping[str, Any], issuer: str, settings: Settings) -> Identity:
    """The identity the claims describe, or Forbidden naming the claim that is missing or not usable."""
    subject = claims.get("sub")
    if not isinstance(subject, str) or not subject:
        raise Forbidden(
            "the identity provider sent no subject (`sub`); ask its administrator", code="sso_claim_missing"
        )
    tenant = claims.get(settings.oidc_tenant_claim)
    if tenant is None or tenant == "":
        raise Forbidden(
            f"your account at the identity provider has no `{settings.oidc_tenant_claim}` claim, so modtag does not "
            "know your tenant; ask its administrator to add it",
            code="sso_claim_missing",
        )
    if not isinstance(tenant, str) or not TENANT_PATTERN.match(tenant):
        raise Forbidden(
            f"the `{settings.oidc_tenant_claim}` claim {str(tenant)[:70]!r} is not a modtag tenant (1 to 64 lowercase "
            "letters, digits, '-' or '_'); ask the identity provider's administrator to fix it",
            code="sso_tenant_invalid",
        )
    return Identity(
        issuer=issuer,
        subject=subject,
        name=_display_name(claims),
        tenant=tenant,
        role=role_from_claim(claims.get(settings.oidc_role_claim), settings),
    )


def role_from_claim(value: object, settings: Settings) -> Role:
    """The role a claim value maps to (a string, or a list of which the highest known role counts)."""
    values = value if isinstance(value, list) else [] if value is None or value == "" else [value]
    if not values:
        raise Forbidden(
            f"your account at the identity provider has no `{settings.oidc_role_claim}` claim, so modtag does not "
            "know your role; ask its administrator to add it",
            code="sso_claim_missing",
        )
    mapping = role_mapping(settings)
    known = [mapping[item] for item in values if isinstance(item, str) and item in mapping]
    if not known:
        shown = ", ".join(repr(str(item)[:40]) for item in values[:5])
        raise Forbidden(
            f"the `{settings.oidc_role_claim}` claim ({shown}) names no modtag role (accepted: "
            f"{', '.join(sorted(mapping))}); ask the identity provider's administrator",
            code="sso_role_unknown",
        )
    return max(known, key=_RANK.__getitem__)


def role_mapping(settings: Settings) -> dict[str, Role]:
    """Claim value -> role (MODTAG_OIDC_ROLES), or the role names themselves when it is empty."""
    pairs = [pair.partition("=") for pair in settings.oidc_roles.split(",") if pair.strip()]
    if not pairs:
        return {role.value: role for role in Role}
    return {value.strip(): Role(role.strip()) for value, _, role in pairs}


def sign_in(session: Session, identity: Identity) -> ApiKey:
    """The live key row of `identity` (made, or remade when its tenant or role changed), with the sign-in audited;
    committed."""
    prefix = identity_prefix(identity.issuer, identity.subject)
    rows = session.exec(select(ApiKey).where(ApiKey.prefix == prefix, col(ApiKey.revoked_at).is_(None))).all()
    current = next((row for row in rows if row.tenant == identity.tenant and row.role == identity.role.value), None)
    for stale in rows:
        if stale is not current:
            _revoke(session, stale, identity)
    if current is None:
        current = ApiKey(
            key_hash=hash_key(generate_key()),  # never shown: this row signs in through the provider only
            prefix=prefix,
            name=identity.name,
            role=identity.role.value,
            tenant=identity.tenant,
        )
        session.add(current)
        session.flush()
        record(
            session, principal_for(current), "key.created", "api_key", current.id, before=None,
            after=key_public(current), tenant=current.tenant,
        )  # fmt: skip
    current.name = identity.name
    current.last_used_at = utcnow()
    session.add(current)
    record(
        session, principal_for(current, via="session"), "session.signed_in", "api_key", current.id, before=None,
        after={"via": "oidc", "issuer": identity.issuer, "subject": identity.subject[:128],
               "tenant": identity.tenant, "role": identity.role.value},
    )  # fmt: skip
    session.commit()
    return current


def identity_prefix(issuer: str, subject: str) -> str:
    """The non-secret prefix every key row of one identity carries."""
    return PREFIX + hashlib.sha256(f"{issuer}\n{subject}".encode()).hexdigest()[:24]


def _revoke(session: Session, row: ApiKey, identity: Identity) -> None:
    before = key_public(row)
    row.revoked_at = utcnow()
    session.add(row)
    actor = Principal(name=f"identity provider {identity.issuer}"[:MAX_NAME_CHARS], role=Role.ADMIN,
                      tenant=row.tenant, via="system")  # fmt: skip
    record(session, actor, "key.revoked", "api_key", row.id, before=before, after=key_public(row), tenant=row.tenant)
    session.execute(update(DashboardSession).where(col(DashboardSession.key_id) == row.id).values(expires_at=utcnow()))


def _display_name(claims: Mapping[str, Any]) -> str:
    for claim in ("name", "preferred_username", "email", "sub"):
        value = claims.get(claim)
        if isinstance(value, str):
            printable = "".join(char for char in value if char.isprintable()).strip()
            if printable:
                return f"{printable[: MAX_NAME_CHARS - 6]} (sso)"
    return "single sign-on user"
