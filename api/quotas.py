"""The quota check of a submission (core/quotas.py) and who may see or set which tenant's quota.

A submission is charged after its Idempotency-Key lookup, so a replay costs nothing, and before its images are
stored, so a refusal costs the server nothing either: one token per photo. Quotas are an operator's tool, not a
tenant's: admins of `quota_admin_tenant` (MODTAG_QUOTA_ADMIN_TENANT, default `default`, the tenant of the bootstrap
admin key) read and set every tenant's; any other admin reads only its own tenant's (another tenant is 404) and may
not change it (403), or a tenant could lift its own limit.
"""

from __future__ import annotations

from sqlmodel import Session

from api.deps import Services
from core import quotas
from core.errors import Forbidden, NotFound
from core.principals import Principal
from core.settings import Settings


def charge(services: Services, session: Session, principal: Principal, *, lane: str, photos: int) -> None:
    """Take `photos` tokens from the caller's tenant, or raise 429 `quota_exceeded` with its Retry-After."""
    limits = quotas.tenant_limits(session, services.settings, principal.tenant)
    verdict = services.quotas.charge(principal.tenant, lane, photos, limits)
    if not verdict.admitted:
        raise quotas.refusal(verdict, principal.tenant, lane, photos, limits)


def is_operator(principal: Principal, settings: Settings) -> bool:
    return principal.tenant == settings.quota_admin_tenant


def check_readable(principal: Principal, settings: Settings, tenant: str) -> None:
    """Another tenant's quota is unknown to a tenant admin (404), as another tenant's ids are."""
    if tenant != principal.tenant and not is_operator(principal, settings):
        raise NotFound(f"no quota for tenant {tenant[:64]!r}", code="quota_not_found")


def check_writable(principal: Principal, settings: Settings, tenant: str) -> None:
    check_readable(principal, settings, tenant)
    if not is_operator(principal, settings):
        raise Forbidden(
            f"only admins of the tenant {settings.quota_admin_tenant!r} (MODTAG_QUOTA_ADMIN_TENANT) set quotas; "
            "ask your operator",
            code="forbidden",
        )
