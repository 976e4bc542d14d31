"""API keys: create (the secret is shown once), authenticate, list, revoke. Who may do what: core/principals.py.

A key is `mtk_<12 hex>_<43 random url-safe characters>` (256 bits of randomness); only its SHA-256
is stored. A slow password hash (bcrypt, argon2) protects secrets people choose, which are guessable;
a 256-bit random key cannot be guessed, so a fast hash loses nothing and keeps every request cheap
(bcrypt would add ~100 ms of CPU to each API call). The `mtk_<12 hex>` prefix is not secret: it is
shown in listings and logs so a person can tell keys apart. Keys are looked up by their hash (an
indexed equality), which works for operator-chosen bootstrap keys too and reveals nothing about the
secret: the attacker controls only the input of the hash, never which stored hash it is compared to.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from sqlalchemy import update
from sqlmodel import Session, col, select

from core.audit import record
from core.errors import AuthError, ConfigError, InvalidField, NotFound
from core.principals import MAX_NAME_CHARS, Principal, cli_principal
from core.public import KeyPublic
from core.tables import ApiKey, DashboardSession, Role, as_utc, utcnow

KEY_PREFIX = "mtk_"
MAX_KEY_CHARS = 256
TENANT_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
DEFAULT_TENANT = "default"
LOCAL_ADMIN_NAME = "local admin (modtag up)"
BOOTSTRAP_NAME = "bootstrap admin (MODTAG_ADMIN_KEY)"
# Writing last_used_at on every request would turn each read into a write; once a minute is enough to audit.
_LAST_USED_RESOLUTION = timedelta(seconds=60)
_GENERATED = re.compile(r"^mtk_([0-9a-f]{12})_[A-Za-z0-9_-]{43}$")


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def generate_key() -> str:
    return f"{KEY_PREFIX}{secrets.token_hex(6)}_{secrets.token_urlsafe(32)}"


def display_prefix(key: str) -> str:
    """The non-secret part of a key: `mtk_<12 hex>` for generated keys, a hash stub for chosen ones."""
    return generated_prefix(key) or f"sha256:{hash_key(key)[:12]}"


def generated_prefix(key: str) -> str | None:
    """`mtk_<12 hex>` when `key` has the shape of a generated key, else None."""
    match = _GENERATED.match(key)
    return f"{KEY_PREFIX}{match.group(1)}" if match else None


def check_tenant(tenant: str) -> str:
    if not TENANT_PATTERN.match(tenant):
        raise InvalidField(
            f"tenant {tenant[:70]!r} is not valid: use 1 to 64 lowercase letters, digits, '-' or '_'",
            code="tenant_invalid",
        )
    return tenant


def check_name(name: str) -> str:
    name = name.strip()
    if not 0 < len(name) <= MAX_NAME_CHARS or not name.isprintable():
        raise InvalidField(f"a key name is 1 to {MAX_NAME_CHARS} printable characters", code="key_name_invalid")
    return name


def create_key(
    session: Session, *, role: Role | str, tenant: str, name: str, actor: Principal, key: str | None = None
) -> tuple[ApiKey, str]:
    """Store a new key (random unless `key` is given) and commit. Returns the row and the secret, shown once."""
    try:
        role = Role(role)
    except ValueError:
        raise InvalidField(
            f"role {str(role)[:40]!r} is not one of {', '.join(r.value for r in Role)}", code="role_invalid"
        ) from None
    secret = key if key is not None else generate_key()
    row = ApiKey(
        key_hash=hash_key(secret),
        prefix=display_prefix(secret),
        name=check_name(name),
        role=role,
        tenant=check_tenant(tenant),
    )
    session.add(row)
    session.flush()
    record(session, actor, "key.created", "api_key", row.id, before=None, after=key_public(row), tenant=row.tenant)
    session.commit()
    return row, secret


def authenticate(session: Session, presented: str) -> ApiKey:
    """The live key `presented` names, or AuthError (`auth_invalid`, `auth_revoked`)."""
    # Shape first: a hostile header (huge, NUL, non-ASCII) never reaches the database.
    if not 0 < len(presented) <= MAX_KEY_CHARS or not all("!" <= char <= "~" for char in presented):
        raise AuthError("the API key is malformed; send the key `modtag keys create` printed", code="auth_invalid")
    row = session.exec(select(ApiKey).where(ApiKey.key_hash == hash_key(presented))).first()
    if row is None:
        raise AuthError("the API key is not valid", code="auth_invalid")
    if row.revoked_at is not None:
        raise AuthError(f"the API key {row.prefix} was revoked; ask an admin for a new one", code="auth_revoked")
    _touch(session, row)
    return row


def principal_for(row: ApiKey, *, via: str = "header", csrf_token: str | None = None) -> Principal:
    return Principal(
        name=row.name, role=Role(row.role), tenant=row.tenant, key_id=row.id, via=via, csrf_token=csrf_token
    )


def list_keys(session: Session, tenant: str | None = None) -> Sequence[ApiKey]:
    query = select(ApiKey).order_by(col(ApiKey.created_at), col(ApiKey.id))
    if tenant is not None:
        query = query.where(ApiKey.tenant == tenant)
    return session.exec(query).all()


def revoke_key(session: Session, key_id: str, actor: Principal) -> ApiKey:
    """Revoke a key (idempotent) and end its dashboard sessions; commit."""
    row = session.get(ApiKey, key_id) if re.fullmatch(r"[0-9a-f]{32}", key_id) else None
    if row is None:
        raise NotFound(f"no API key with id {key_id[:40]!r}; `modtag keys list` shows the ids", code="key_not_found")
    if row.revoked_at is None:
        before = key_public(row)
        row.revoked_at = utcnow()
        session.add(row)
        after = key_public(row)
        record(session, actor, "key.revoked", "api_key", row.id, before=before, after=after, tenant=row.tenant)
        session.execute(
            update(DashboardSession).where(col(DashboardSession.key_id) == row.id).values(expires_at=utcnow())
        )
        session.commit()
    return row


def bootstrap_admin_key(session: Session, given: str | None, *, temporary: bool = False) -> tuple[ApiKey, str]:
    """The admin key a local stack hands its user.

    `given` (MODTAG_ADMIN_KEY / --admin-key-file) is created if absent and reused if present. Otherwise a new
    random key is made; for `modtag up` the previous `modtag up` key is revoked, so only the last key
    printed works; a `temporary` key (for `modtag scan`) leaves it alone and is revoked by its caller.
    """
    if given is not None:
        existing = session.exec(select(ApiKey).where(ApiKey.key_hash == hash_key(given))).first()
        if existing is None:
            row, _ = create_key(
                session, role=Role.ADMIN, tenant=DEFAULT_TENANT, name=BOOTSTRAP_NAME, actor=cli_principal("default"),
                key=given,
            )  # fmt: skip
            return row, given
        if existing.revoked_at is not None:
            raise ConfigError(
                f"the admin key given by MODTAG_ADMIN_KEY / --admin-key-file ({existing.prefix}) was revoked; "
                "choose another",
                code="admin_key_revoked",
            )
        if existing.role != Role.ADMIN:
            raise ConfigError(
                f"the key given by MODTAG_ADMIN_KEY / --admin-key-file ({existing.prefix}) has role {existing.role}, "
                "not admin",
                code="admin_key_not_admin",
            )
        return existing, given
    actor = cli_principal(DEFAULT_TENANT)
    if temporary:
        return create_key(session, role=Role.ADMIN, tenant=DEFAULT_TENANT, name="modtag scan (temporary)", actor=actor)
    for old in session.exec(
        select(ApiKey).where(ApiKey.name == LOCAL_ADMIN_NAME, col(ApiKey.revoked_at).is_(None))
    ).all():
        revoke_key(session, old.id, actor)
    return create_key(session, role=Role.ADMIN, tenant=DEFAULT_TENANT, name=LOCAL_ADMIN_NAME, actor=actor)


def key_public(row: ApiKey) -> dict[str, Any]:
    """A key as `modtag keys` lists it and the audit log records it (`core.public.KeyPublic`) as JSON."""
    return KeyPublic.from_row(row).model_dump(mode="json")


def _touch(session: Session, row: ApiKey) -> None:
    now = utcnow()
    if row.last_used_at is None or now - as_utc(row.last_used_at) > _LAST_USED_RESOLUTION:
        session.execute(update(ApiKey).where(col(ApiKey.id) == row.id).values(last_used_at=now))
        session.commit()
