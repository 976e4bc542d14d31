"""The audit log: `GET /v1/audit`, newest first, for admins of the tenant."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Query

from api.auth import Auditor
from api.deps import SessionDep
from api.errors import error_responses
from api.schemas import SINCE_HELP, Moment
from core.audit import list_entries
from core.public import AuditEntryPublic, AuditPage
from core.tables import as_utc

router = APIRouter(prefix="/v1/audit", tags=["audit"])

_ACTION_PATTERN = r"^[a-z_]+\.([a-z_]+)?$"
_ID_PATTERN = r"^[0-9A-Za-z_-]{1,64}$"


@router.get("", response_model=AuditPage, responses=error_responses(400, 401, 403, 422))
def read_audit(
    session: SessionDep,
    principal: Auditor,
    action: Annotated[
        str | None,
        Query(max_length=64, pattern=_ACTION_PATTERN, description="`review.resolved`, or `review.` for every step."),
    ] = None,
    job_id: Annotated[str | None, Query(pattern=_ID_PATTERN, description="Entries about this job.")] = None,
    target_id: Annotated[str | None, Query(pattern=_ID_PATTERN, description="Entries about this job or key.")] = None,
    actor: Annotated[str | None, Query(pattern=_ID_PATTERN, description="Entries made with this key id.")] = None,
    since: Annotated[Moment | None, Query(description=SINCE_HELP)] = None,
    until: Annotated[datetime | None, Query(description="ISO-8601, exclusive.")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    cursor: Annotated[str | None, Query(max_length=512)] = None,
) -> AuditPage:
    """Who changed what and when, with the record before and after (role admin)."""
    entries, next_cursor = list_entries(
        session,
        tenant=principal.tenant,
        action=action,
        target_id=job_id or target_id,
        actor_key_id=actor,
        since=as_utc(since) if since else None,
        until=as_utc(until) if until else None,
        limit=limit,
        cursor=cursor,
    )
    return AuditPage(data=[AuditEntryPublic.from_row(entry) for entry in entries], next_cursor=next_cursor)
