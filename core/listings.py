"""Listing records: a listing and its photos' jobs, written together; read back in photo order.

The listing body (`GET /v1/listings/{id}` and its callback) is `core.public.ListingPublic.from_rows` of these rows,
with `policies.listing.photos_verdict`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, update
from sqlmodel import Session, col, select

from core.jobs import NewJob, commit_once
from core.tables import FINAL_STATUSES, Decision, Job, Listing, utcnow


@dataclass(frozen=True)
class ListingCallback:
    """A listing whose callback this caller claimed: where to POST, and the rows its body is built from."""

    url: str
    listing: Listing
    rows: list[tuple[Job, Decision | None]]


@dataclass(frozen=True)
class NewListing:
    """What the API knows about a listing at submission (its photos are NewJobs)."""

    tenant: str
    policy: str
    policy_version: str | None
    title: str | None
    description: str | None
    attributes: dict[str, Any]
    idempotency_key: str | None = None
    submitted_by: str | None = None
    callback_url: str | None = None


def listing_context(title: str | None, description: str | None, attributes: dict[str, Any]) -> dict[str, Any]:
    """The context every photo's job carries: what the listing says, as the checks read it."""
    context: dict[str, Any] = {"attributes": attributes}
    if title is not None:
        context["title"] = title
    if description is not None:
        context["description"] = description
    return context


def create_listing(session: Session, new: NewListing, photos: Sequence[NewJob]) -> tuple[Listing, list[Job], bool]:
    """Insert and commit the listing and one queued job per photo, in one transaction.

    With an idempotency key already used, return that listing and its jobs instead (False: not created).
    """
    if new.idempotency_key:
        existing = find_listing_by_idempotency_key(session, new.tenant, new.idempotency_key)
        if existing is not None:
            return existing, [job for job, _ in listing_jobs(session, existing.id)], False
    listing = Listing(**dataclasses.asdict(new), image_count=len(photos))
    jobs = [
        Job(**dataclasses.replace(photo, listing_id=listing.id, listing_index=index).__dict__)
        for index, photo in enumerate(photos)
    ]
    winner = commit_once(
        session,
        [listing, *jobs],
        lambda: find_listing_by_idempotency_key(session, new.tenant, new.idempotency_key or ""),
    )
    if winner is not None:
        return winner, [job for job, _ in listing_jobs(session, winner.id)], False
    return listing, jobs, True


def find_listing_by_idempotency_key(session: Session, tenant: str, key: str) -> Listing | None:
    return session.exec(select(Listing).where(Listing.tenant == tenant, Listing.idempotency_key == key)).first()


def get_listing(session: Session, listing_id: str, tenant: str) -> Listing | None:
    listing = session.get(Listing, listing_id)
    return listing if listing is not None and listing.tenant == tenant else None


def listing_jobs(session: Session, listing_id: str) -> list[tuple[Job, Decision | None]]:
    """The listing's photos' jobs in photo order, each with its decision once done."""
    rows = session.exec(
        select(Job, Decision)
        .join(Decision, col(Decision.job_id) == col(Job.id), isouter=True)
        .where(Job.listing_id == listing_id)
        .order_by(col(Job.listing_index))
    ).all()
    return [(job, decision) for job, decision in rows]


def listing_callback_due(session: Session, listing_id: str) -> ListingCallback | None:
    """Claim the listing's callback once every photo is final: its URL and rows, or None when not due.

    The claim is a conditional UPDATE (`callback_sent_at IS NULL`), so of two workers finishing the last two photos
    at once exactly one gets the payload. It is left uncommitted: the caller commits it with the delivery row
    (`core.webhooks.record_delivery`, the outbox the sender delivers from, at least once), in one transaction, so a
    worker that dies between the claim and the row leaves neither, and `listings_missing_callback` finds the
    listing again.
    """
    listing = session.get(Listing, listing_id)
    if listing is None or not listing.callback_url or listing.callback_sent_at is not None:
        return None
    rows = listing_jobs(session, listing_id)
    if len(rows) < listing.image_count or any(job.status not in FINAL_STATUSES for job, _ in rows):
        return None
    # An erasure clears the callback URL under the same row lock: the claim then matches nothing.
    claimed = session.execute(
        update(Listing)
        .where(
            col(Listing.id) == listing_id,
            col(Listing.callback_sent_at).is_(None),
            col(Listing.callback_url).is_not(None),
        )
        .values(callback_sent_at=utcnow())
    )
    if getattr(claimed, "rowcount", 0) != 1:  # another worker claimed it between our read and our update
        return None
    # The body is read under the claim's lock: a photo erased before it shows erased; one erased after waits for
    # the delivery row and empties it (core/erasure.py locks the listing row first).
    session.refresh(listing)
    return ListingCallback(listing.callback_url or "", listing, listing_jobs(session, listing_id))


def lock_listing(session: Session, listing_id: str) -> None:
    """Hold the listing's row until the caller commits (a conditional no-op UPDATE: PostgreSQL locks the row,
    SQLite the database), so a callback claim and an erasure of the listing or one of its photos take turns."""
    session.execute(
        update(Listing).where(col(Listing.id) == listing_id).values(callback_sent_at=Listing.callback_sent_at)
    )


def erase_listing_text(session: Session, listing: Listing) -> bool:
    """Clear what the listing says (title, description, attributes) and its callback URL (caller commits); False
    when nothing was left to clear."""
    had = listing.title is not None or listing.description is not None or bool(listing.attributes)
    had = had or listing.callback_url is not None
    listing.title, listing.description, listing.attributes, listing.callback_url = None, None, {}, None
    session.add(listing)
    return had


def listings_missing_callback(session: Session, finished_before: datetime, limit: int = 100) -> list[str]:
    """Listings with a callback URL whose photos are all final, the last finished before `finished_before` (and
    within a day of it), and whose callback nobody recorded: the last photo's worker stopped first."""
    last_finished = select(func.max(Job.finished_at)).where(col(Job.listing_id) == col(Listing.id)).scalar_subquery()
    unfinished = (
        select(Job.id)
        .where(col(Job.listing_id) == col(Listing.id), col(Job.status).not_in(list(FINAL_STATUSES)))
        .exists()
    )
    return list(
        session.exec(
            select(Listing.id)
            .where(
                col(Listing.callback_url).is_not(None),
                col(Listing.callback_sent_at).is_(None),
                ~unfinished,
                last_finished < finished_before,
                last_finished >= finished_before - timedelta(days=1),
            )
            .limit(limit)
        ).all()
    )
