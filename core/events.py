"""Webhook events: what happened to a job, a listing or a review, as the body of a Standard Webhooks message.

Every body is the envelope `{"type", "timestamp", "data"}`: `type` names the event, `timestamp` (ISO 8601, UTC) is
when it happened, and `data` is the same public shape the API answers with (`JobPublic` for job and review events,
`ListingPublic` for listings), so a receiver parses one model for a callback and a `GET`. The envelope is built once,
when the delivery is recorded, and stored as the exact bytes every attempt sends; the `webhook-timestamp` header is
each attempt's own.

| type | when | data |
| --- | --- | --- |
| `job.decided` | a job is `done` | the job with its decision (and review, if any) |
| `job.failed` | a job is `failed` | the job with its `error` |
| `listing.decided` | every photo of a listing is final | the listing with its verdict |
| `review.resolved` | a person resolved the job's review item | the job with its decision and `review` |
"""

from __future__ import annotations

import json
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlmodel import Session, select

from core import webhooks
from core.public import JobPublic
from core.tables import Decision, Job, JobStatus, Listing, ReviewItem, WebhookDelivery, iso, utcnow


class EventType(StrEnum):
    JOB_DECIDED = "job.decided"
    JOB_FAILED = "job.failed"
    LISTING_DECIDED = "listing.decided"
    REVIEW_RESOLVED = "review.resolved"


# A final job's own event, by its status; the sender's sweep looks for final jobs that have neither.
JOB_EVENTS = (EventType.JOB_DECIDED, EventType.JOB_FAILED)


def envelope(event_type: EventType, data: dict[str, Any], at: datetime | None = None) -> bytes:
    """The body of one message: `{"type", "timestamp", "data"}`, compact JSON."""
    document = {"type": event_type.value, "timestamp": iso(at or utcnow()), "data": data}
    return json.dumps(document, separators=(",", ":")).encode()


def job_event_type(job: Job) -> EventType:
    return EventType.JOB_FAILED if job.status == JobStatus.FAILED else EventType.JOB_DECIDED


def record_review_resolved(session: Session, item: ReviewItem) -> WebhookDelivery | None:
    """Add the `review.resolved` message of a resolution to the session (the caller commits it with the resolution),
    to the job's callback URL, else its listing's; None when neither has one.

    Sent by the workers' webhook sender (its next poll), never from the API process: the workers reach out.
    """
    job = session.get(Job, item.job_id)
    if job is None:
        return None
    url = job.callback_url or _listing_callback(session, job)
    if not url:
        return None
    decision = session.exec(select(Decision).where(Decision.job_id == job.id)).first()
    public = JobPublic.from_row(job, decision, item)
    return webhooks.add_delivery(
        session,
        tenant=job.tenant,
        event_type=EventType.REVIEW_RESOLVED,
        subject_id=job.id,
        sequence=item.reopen_count,
        url=url,
        payload=envelope(EventType.REVIEW_RESOLVED, public.model_dump(mode="json"), item.resolved_at),
    )


def _listing_callback(session: Session, job: Job) -> str | None:
    if not job.listing_id:
        return None
    listing = session.get(Listing, job.listing_id)
    return listing.callback_url if listing is not None else None
