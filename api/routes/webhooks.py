"""The tenant's webhook signing secret and delivery log (role admin): `/v1/webhooks/...`."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Annotated, Literal

from fastapi import APIRouter, Query

from api.auth import WebhookAdmin
from api.deps import SessionDep, SettingsDep
from api.errors import error_responses
from core import webhooks
from core.public import WebhookDeliveryPage, WebhookDeliveryPublic, WebhookSecretPublic
from core.tables import iso

router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"])


@router.get("/secret", response_model=WebhookSecretPublic, responses=error_responses(401, 403))
def read_secret(session: SessionDep, principal: WebhookAdmin) -> WebhookSecretPublic:
    """The secret that signs this tenant's webhooks (made on first read)."""
    return WebhookSecretPublic.from_row(webhooks.tenant_secret(session, principal.tenant))


@router.post("/secret/rotate", response_model=WebhookSecretPublic, responses=error_responses(401, 403, 422))
def rotate_secret(
    session: SessionDep,
    settings: SettingsDep,
    principal: WebhookAdmin,
    revoke_old: Annotated[
        bool, Query(description="End the previous secrets now (a leaked secret) instead of after the overlap.")
    ] = False,
) -> WebhookSecretPublic:
    """A new secret; the previous one keeps signing beside it for `webhook_secret_overlap_s` (a day), or stops at
    once with `revoke_old=true`. Audited."""
    row = webhooks.rotate_secret(
        session, principal.tenant, settings.webhook_secret_overlap_s, revoke_old=revoke_old, actor=principal
    )
    until = row.created_at if revoke_old else row.created_at + timedelta(seconds=settings.webhook_secret_overlap_s)
    return WebhookSecretPublic.from_row(row, previous_valid_until=until)


@router.get("/deliveries", response_model=WebhookDeliveryPage, responses=error_responses(400, 401, 403, 422))
def read_deliveries(
    session: SessionDep,
    principal: WebhookAdmin,
    status: Annotated[
        Literal["pending", "delivered", "failed", "dropped"] | None, Query(description="Only this status.")
    ] = None,
    before: Annotated[datetime | None, Query(description="`next_cursor` of the previous page.")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> WebhookDeliveryPage:
    """Webhook messages of this tenant, newest first, with their attempts and last outcome."""
    rows = webhooks.list_deliveries(session, principal.tenant, status=status, before=before, limit=limit)
    cursor = iso(rows[-1].created_at) if len(rows) == limit else None
    return WebhookDeliveryPage(data=[WebhookDeliveryPublic.from_row(row) for row in rows], next_cursor=cursor)


@router.post(
    "/deliveries/{delivery_id}/redeliver",
    status_code=202,
    response_model=WebhookDeliveryPublic,
    responses=error_responses(401, 403, 404, 409, 422),
)
def redeliver(delivery_id: str, session: SessionDep, principal: WebhookAdmin) -> WebhookDeliveryPublic:
    """Send a message again: the same `webhook-id` and body, a fresh timestamp and signature, and a fresh retry
    schedule; the workers send it within `webhook_poll_s`. Another tenant's id is 404; an erased one 409
    `delivery_erased`. Audited (`webhook.redeliver`)."""
    return WebhookDeliveryPublic.from_row(webhooks.redeliver(session, delivery_id, principal))
