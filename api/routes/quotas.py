"""Tenant quotas (role admin): `GET /v1/quotas`, `GET`, `PUT` and `DELETE /v1/quotas/{tenant}`.

Who may do what is in api/quotas.py: admins of MODTAG_QUOTA_ADMIN_TENANT every tenant, other admins read their own.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path

from api.auth import QuotaAdmin
from api.deps import SessionDep, SettingsDep
from api.errors import error_responses
from api.quotas import check_readable, check_writable, is_operator
from api.schemas import QuotaRequest
from core import quotas
from core.errors import NotFound
from core.public import QuotaLimits, QuotaPage, QuotaPublic
from core.settings import Settings
from core.tables import TenantQuota

router = APIRouter(prefix="/v1/quotas", tags=["quotas"])

Tenant = Annotated[str, Path(pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$", description="The tenant's name.")]


@router.get("", response_model=QuotaPage, responses=error_responses(401, 403))
def read_quotas(session: SessionDep, settings: SettingsDep, principal: QuotaAdmin) -> QuotaPage:
    """The settings' default limits and the tenants' overrides (the quota admin tenant: all; others: their own)."""
    rows = quotas.list_overrides(session, None if is_operator(principal, settings) else principal.tenant)
    defaults = QuotaLimits(**quotas.default_limits(settings).as_dict())
    return QuotaPage(defaults=defaults, data=[_public(settings, row.tenant, row) for row in rows])


@router.get("/{tenant}", response_model=QuotaPublic, responses=error_responses(401, 403, 404, 422))
def read_quota(tenant: Tenant, session: SessionDep, settings: SettingsDep, principal: QuotaAdmin) -> QuotaPublic:
    """The tenant's limits in force and the override behind them (yours, or any tenant's for the quota admin)."""
    check_readable(principal, settings, tenant)
    return _public(settings, tenant, session.get(TenantQuota, tenant))


@router.put("/{tenant}", response_model=QuotaPublic, responses=error_responses(401, 403, 404, 422))
def put_quota(
    tenant: Tenant, body: QuotaRequest, session: SessionDep, settings: SettingsDep, principal: QuotaAdmin
) -> QuotaPublic:
    """Replace the tenant's override: a number sets a limit, `null` makes it unlimited, a field left out follows the
    setting. Admins of MODTAG_QUOTA_ADMIN_TENANT only; applies to the next submission. Audited (`quota.set`)."""
    check_writable(principal, settings, tenant)
    limits = {name: getattr(body, name) for name in body.model_fields_set}
    return _public(settings, tenant, quotas.set_override(session, principal, tenant, limits))


@router.delete("/{tenant}", response_model=QuotaPublic, responses=error_responses(401, 403, 404, 422))
def delete_quota(tenant: Tenant, session: SessionDep, settings: SettingsDep, principal: QuotaAdmin) -> QuotaPublic:
    """Remove the tenant's override: the settings apply again; 404 `quota_not_found` when it had none. Audited."""
    check_writable(principal, settings, tenant)
    if not quotas.delete_override(session, principal, tenant):
        raise NotFound(f"tenant {tenant!r} has no quota override", code="quota_not_found")
    return _public(settings, tenant, None)


def _public(settings: Settings, tenant: str, row: TenantQuota | None) -> QuotaPublic:
    override = dict(row.limits) if row is not None else None
    return QuotaPublic(
        tenant=tenant,
        override=override,
        limits=QuotaLimits(**quotas.effective_limits(settings, override).as_dict()),
        updated_at=row.updated_at if row is not None else None,
        updated_by=row.updated_by if row is not None else None,
    )
