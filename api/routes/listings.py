"""Marketplace listings: `POST /v1/listings` (photos + title, description, attributes), `GET /v1/listings/{id}`.

A listing becomes one job per photo, each carrying the listing's text as its context, so a photo is
judged exactly as `POST /v1/jobs` would judge it; the listing adds the verdict that reads them together.
"""

from __future__ import annotations

from fastapi import APIRouter, Response

from api.auth import Reader, Submitter
from api.deps import ServicesDep, SessionDep
from api.errors import error_responses
from api.schemas import ListingRequest
from api.submissions import IdempotencyKeyDep, ListingSubmissionDep, accept, submission_route
from core.errors import NotFound
from core.listings import get_listing, listing_jobs
from core.public import ListingPublic
from core.tables import ID_PATTERN
from policies.listing import listing_public

router = APIRouter(prefix="/v1/listings", tags=["listings"])

_MULTIPART_SCHEMA = {
    "type": "object",
    "required": ["images", "title"],
    "properties": {
        "images": {"type": "array", "items": {"type": "string", "format": "binary"}, "description": "The photos."},
        "title": {"type": "string"},
        "description": {"type": "string"},
        "attributes": {"type": "string", "description": 'A JSON object, e.g. {"color": "red", "count": 2}.'},
        "policy": {"type": "string", "default": "listing"},
        "callback_url": {"type": "string", "format": "uri"},
    },
}


@router.post(
    "",
    **submission_route(
        ListingPublic,
        multipart=_MULTIPART_SCHEMA,
        json_body=ListingRequest,
        replayed="A listing with this Idempotency-Key already exists.",
    ),
)
def submit_listing(
    principal: Submitter,  # first: the body is not read for a caller who may not submit
    idempotency_key: IdempotencyKeyDep,
    submission: ListingSubmissionDep,
    services: ServicesDep,
    session: SessionDep,
    response: Response,
) -> ListingPublic:
    """Submit a listing's photos with its title, description and attributes: one job per photo (role submit)."""
    accepted = accept(
        submission, principal=principal, idempotency_key=idempotency_key, services=services, session=session
    )
    listing = accepted.record
    accepted.answer(response, f"/v1/listings/{listing.id}")
    rows = [(job, None) for job in accepted.jobs] if accepted.created else listing_jobs(session, listing.id)
    return listing_public(listing, rows)


@router.get("/{listing_id}", response_model=ListingPublic, responses=error_responses(401, 403, 404, 422))
def read_listing_result(listing_id: str, session: SessionDep, principal: Reader) -> ListingPublic:
    """The listing with each photo's result and the listing-level verdict (pending until every photo is final)."""
    listing = get_listing(session, listing_id, principal.tenant) if ID_PATTERN.match(listing_id) else None
    if listing is None:  # another tenant's listing is unknown here, never forbidden
        raise NotFound(f"no listing with id {listing_id[:64]!r}", code="listing_not_found")
    return listing_public(listing, listing_jobs(session, listing.id))
