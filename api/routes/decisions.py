"""The decision log: `GET /v1/decisions`, newest first, filtered, with keyset paging."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query

from api.auth import Reader
from api.deps import SessionDep
from api.errors import error_responses
from api.schemas import ID_PATTERN, SLUG_PATTERN, Action, DecisionPage
from core.errors import BadRequest
from core.jobs import decision_public, decode_cursor, list_decisions

router = APIRouter(prefix="/v1/decisions", tags=["decisions"])


@router.get("", response_model=DecisionPage, responses=error_responses(400, 401, 403, 422))
def read_decisions(
    session: SessionDep,
    principal: Reader,
    action: Annotated[Action | None, Query(description="Only this action.")] = None,
    policy: Annotated[str | None, Query(max_length=64, pattern=SLUG_PATTERN, description="Only this policy.")] = None,
    category: Annotated[
        str | None, Query(max_length=64, pattern=SLUG_PATTERN, description="Only decisions where it fired.")
    ] = None,
    since: Annotated[datetime | None, Query(description="ISO-8601; naive times are UTC.")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    cursor: Annotated[str | None, Query(max_length=512, description="`next_cursor` of the previous page.")] = None,
) -> dict[str, Any]:
    """Decisions, newest first; filter by action, policy, category and time; page with `cursor`."""
    if cursor is not None:
        check_cursor(cursor)
    decisions, next_cursor = list_decisions(
        session,
        tenant=principal.tenant,
        action=action,
        policy=policy,
        category=category,
        since=as_utc(since) if since else None,
        limit=limit,
        cursor=cursor,
    )
    return {"data": [decision_public(decision) for decision in decisions], "next_cursor": next_cursor}


def check_cursor(cursor: str) -> None:
    # A forged cursor may decode to any bytes; only one naming a plausible decision id reaches the database.
    _, decision_id = decode_cursor(cursor)
    if not ID_PATTERN.match(decision_id):
        raise BadRequest("cursor is not one this API returned", code="invalid_cursor")


def as_utc(moment: datetime) -> datetime:
    # SQLite stores UTC wall-clock times without an offset, so every comparison must be made in UTC.
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
