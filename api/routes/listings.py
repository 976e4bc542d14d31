"""Marketplace listings: `POST /v1/listings` (photos + title, description, attributes), `GET` and `DELETE
/v1/listings/{id}`.

A listing becomes one job per photo, each carrying the listing's text as its context, so a photo is
judged exactly as `POST /v1/jobs` would judge it; the listing adds the verdict that reads them together.
"""

from __future__ import annotations

from fastapi import APIRouter
from sqlmodel import Session
from starlette.concurrency import run_in_threadpool

from api.auth import Eraser, Reader
from api.deps import ServicesDep, SessionDep
from api.errors import error_responses
from api.moderate_now import FinalWaiterDep, PreferencesDep, wait_for_final
from api.submissions import IntakeDep, ListingSubmission, ListingSubmissionDep, submission_route
from api.thumbnails import forget_thumbnail
from core.erasure import erase_listing
from core.errors import NotFound
from core.finality import listing_subject
from core.listings import get_listing, listing_jobs
from core.public import ListingPublic
from core.tables import ID_PATTERN, Listing
from policies.listing import photos_verdict

router = APIRouter(prefix="/v1/listings", tags=["listings"])


@router.post("", **submission_route(ListingSubmission))
async def submit_listing(
    intake: IntakeDep, submission: ListingSubmissionDep, preferences: PreferencesDep, waiter: FinalWaiterDep
) -> ListingPublic:
    """Submit a listing's photos with its title, description and attributes: one job per photo (role submit); with
    `Prefer: wait=N`, answered 200 with the verdict when every photo is final within N seconds."""
    accepted = await run_in_threadpool(intake.accept, submission, "/v1/listings")
    listing = accepted.record
    wait_s = preferences.wait_within(intake.services.settings.max_prefer_wait_s)
    if wait_s is not None:
        return await wait_for_final(
            intake,
            preferences,
            wait_s,
            listing_subject(listing.id),
            lambda session: _listing_now(session, listing),
            waiter,
        )
    if accepted.created:
        return ListingPublic.from_rows(listing, [(job, None) for job in accepted.jobs], photos_verdict)
    return (await run_in_threadpool(_listing_now, intake.session, listing))[1]


def _listing_now(session: Session, listing: Listing) -> tuple[bool, ListingPublic]:
    """Whether the listing's verdict is final now (every photo final), and its body as `GET` shows it."""
    body = ListingPublic.from_rows(listing, listing_jobs(session, listing.id), photos_verdict)
    return body.verdict.status != "pending", body


@router.get("/{listing_id}", response_model=ListingPublic, responses=error_responses(401, 403, 404, 422))
def read_listing_result(listing_id: str, session: SessionDep, principal: Reader) -> ListingPublic:
    """The listing with each photo's result and the listing-level verdict (pending until every photo is final)."""
    listing = _tenant_listing(session, listing_id, principal.tenant)
    return ListingPublic.from_rows(listing, listing_jobs(session, listing.id), photos_verdict)


@router.delete("/{listing_id}", response_model=ListingPublic, responses=error_responses(401, 403, 404, 422))
def delete_listing(listing_id: str, session: SessionDep, services: ServicesDep, principal: Eraser) -> ListingPublic:
    """Erase the listing's title, description, attributes and callback URL, and each photo's job as `DELETE
    /v1/jobs/{id}` does; each photo's `kept` says what stayed and why (role admin; a submit key for its own)."""
    listing = _tenant_listing(session, listing_id, principal.tenant)
    photos = listing_jobs(session, listing.id)
    keys = {job.id: job.blob_key for job, _ in photos}
    erasures = erase_listing(session, services.blobs, listing, principal)
    for job_id, erasure in erasures.items():
        key = keys.get(job_id)
        if erasure.blob_deleted and key is not None:
            forget_thumbnail(key, services)
    body = ListingPublic.from_rows(listing, listing_jobs(session, listing.id), photos_verdict)
    body.photos = [photo.model_copy(update={"kept": erasures[photo.id].kept}) for photo in body.photos]
    return body


def _tenant_listing(session: Session, listing_id: str, tenant: str) -> Listing:
    listing = get_listing(session, listing_id, tenant) if ID_PATTERN.match(listing_id) else None
    if listing is None:  # another tenant's listing is unknown here, never forbidden
        raise NotFound(f"no listing with id {listing_id[:64]!r}", code="listing_not_found")
    return listing
