"""The decision log: `GET /v1/decisions`, newest first, filtered, with keyset paging."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from api.auth import Reader
from api.deps import SessionDep
from api.errors import error_responses
from api.schemas import SINCE_HELP, SLUG_PATTERN, Moment
from core.jobs import list_decisions
from core.public import Action, DecisionPage, DecisionPublic
from core.tables import as_utc

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
    since: Annotated[Moment | None, Query(description=SINCE_HELP)] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    cursor: Annotated[str | None, Query(max_length=512, description="`next_cursor` of the previous page.")] = None,
) -> DecisionPage:
    """Decisions, newest first; filter by action, policy, category and time; page with `cursor`."""
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
    return DecisionPage(data=[DecisionPublic.from_row(decision) for decision in decisions], next_cursor=next_cursor)
