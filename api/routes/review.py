"""The human review queue: list, claim (a lease) or release it, resolve allow/block, reopen (appeals, admin only)."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query

from api.auth import Reopener, Reviewer
from api.deps import SessionDep, SettingsDep
from api.errors import error_responses
from api.labels import checked_labels
from api.schemas import SLUG_PATTERN, BankFramesRequest, ReopenRequest, ResolveRequest
from core import resolutions, review
from core.public import BankImport, ReviewItemPublic, ReviewQueueEntry, ReviewQueuePage
from core.tables import ReviewKind, ReviewState
from core.videobanks import bank_frames

router = APIRouter(prefix="/v1/review", tags=["review"])

StateFilter = Literal["open", "resolved", "all"]


@router.get("/queue", response_model=ReviewQueuePage, responses=error_responses(400, 401, 403, 422))
def read_queue(
    session: SessionDep,
    principal: Reviewer,
    state: Annotated[StateFilter, Query(description="`open` (default), `resolved` or `all`.")] = "open",
    order: Annotated[review.Order, Query(description="`oldest` first (default) or highest `score` first.")] = "oldest",
    policy: Annotated[str | None, Query(max_length=64, pattern=SLUG_PATTERN)] = None,
    category: Annotated[
        str | None, Query(max_length=64, pattern=SLUG_PATTERN, description="Only items where it fired.")
    ] = None,
    kind: Annotated[
        Literal["review", "audit"] | None,
        Query(description="Only `review` items (the policy said review) or `audit` samples of automatic decisions."),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, Query(max_length=512)] = None,
) -> ReviewQueuePage:
    """The tenant's review queue with each item's machine decision (role review or admin)."""
    items, next_cursor = review.list_queue(
        session,
        tenant=principal.tenant,
        state=None if state == "all" else ReviewState(state),
        order=order,
        policy=policy,
        category=category,
        kind=ReviewKind(kind) if kind else None,
        limit=limit,
        cursor=cursor,
    )
    data = [ReviewQueueEntry.from_rows(item, decision) for item, decision in items]
    return ReviewQueuePage(data=data, next_cursor=next_cursor)


@router.post("/{job_id}/claim", response_model=ReviewItemPublic, responses=error_responses(401, 403, 404, 409, 422))
def claim_item(job_id: str, session: SessionDep, settings: SettingsDep, principal: Reviewer) -> ReviewItemPublic:
    """Claim an open item for MODTAG_REVIEW_CLAIM_LEASE_S seconds; 409 `review_claimed` if someone else holds it."""
    item = review.claim(session, job_id, principal, settings.review_claim_lease_s)
    return ReviewItemPublic.from_row(item)


@router.post("/{job_id}/release", response_model=ReviewItemPublic, responses=error_responses(401, 403, 404, 409, 422))
def release_item(job_id: str, session: SessionDep, principal: Reviewer) -> ReviewItemPublic:
    """Give a claim back early (yours; admins: anyone's); 409 `review_claimed` or `review_not_claimed`."""
    item = review.release(session, job_id, principal)
    return ReviewItemPublic.from_row(item)


@router.post(
    "/{job_id}/resolve", response_model=ReviewItemPublic, responses=error_responses(400, 401, 403, 404, 409, 422)
)
def resolve_item(job_id: str, body: ResolveRequest, session: SessionDep, principal: Reviewer) -> ReviewItemPublic:
    """Resolve an open item `allow` or `block` with a reason; the machine decision is kept beside it.

    `categories` labels each category of the policy true or false (422 `unknown_category` for a name it lacks); the
    categories not given follow the action: block, the fired ones apply; allow, none does.

    `add_to_bank` (with `block`) banks the image's hashes too, so later copies are blocked before the models run."""
    labels = checked_labels(session, job_id, principal.tenant, body.categories)
    item = resolutions.resolve(
        session, job_id, principal, body.action, body.reason, labels=labels, add_to_bank=body.add_to_bank
    )
    return ReviewItemPublic.from_row(item)


@router.post(
    "/{job_id}/bank-frames",
    status_code=201,
    response_model=BankImport,
    responses=error_responses(400, 401, 403, 404, 409, 422),
)
def bank_frames_route(job_id: str, body: BankFramesRequest, session: SessionDep, principal: Reviewer) -> BankImport:
    """Add a video's judged frames (their PDQ hashes) to a bank of the tenant, so that copies of them are blocked
    before the models run: the frames `times` names, else those on which a category fired (role review or admin).
    Hashes the bank holds already are skipped."""
    rows, skipped = bank_frames(session, principal, job_id, body.bank, body.times, body.note)
    return BankImport(bank=body.bank, added=len(rows), skipped=skipped)


@router.post(
    "/{job_id}/reopen", response_model=ReviewItemPublic, responses=error_responses(400, 401, 403, 404, 409, 422)
)
def reopen_item(job_id: str, body: ReopenRequest, session: SessionDep, principal: Reopener) -> ReviewItemPublic:
    """Put a resolved item back in the queue (an appeal; role admin). The old resolution stays in the audit log."""
    item = review.reopen(session, job_id, principal, body.reason)
    return ReviewItemPublic.from_row(item)
