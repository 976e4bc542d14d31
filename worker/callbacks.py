"""Webhooks of final jobs: the job to its callback_url (`job.decided` or `job.failed`), and its listing to the
listing's once every photo is final (`listing.decided`); every body is the Standard Webhooks envelope
(core/events.py). The same sender also sends what the API recorded (`review.resolved`, an admin's redelivery).

Each is recorded as a signed delivery (core/webhooks.py) before its first attempt, tried once at once, then
retried by `start_webhook_sender` with backoff until delivered or out of retries: at least once, the same
`webhook-id` and body every time. A worker that stops between finishing a job and recording its webhooks leaves
them to the sender's sweep (`_record_missing`: final jobs without a delivery row, final listings whose callback
nobody claimed; a listing's claim commits with its delivery row). The API stays the source of truth; a failed
delivery never fails the job.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import timedelta

from sqlalchemy.exc import DBAPIError, OperationalError

from core import jobs, metrics, webhooks
from core.db import session_scope
from core.dependencies import RECORD, Dependency, outage_of
from core.errors import ModtagError
from core.events import JOB_EVENTS, EventType, envelope, job_event_type
from core.listings import listing_callback_due, listings_missing_callback
from core.public import JobPublic, ListingPublic
from core.settings import Settings
from core.tables import Job, utcnow
from core.urls import post_json
from policies.listing import photos_verdict

log = logging.getLogger(__name__)


def send_callbacks(settings: Settings, job: Job) -> None:
    """Record the final job's webhook, and its listing's when this job was the last photo; try each once now."""
    try:
        recorded = _record(settings, job)
    except (OperationalError, DBAPIError) as exc:
        log.warning("webhooks for job %s not recorded: %s", job.id, exc)
        metrics.CALLBACKS.labels("failed").inc()
        return
    for delivery_id in recorded:
        deliver(settings, delivery_id)


def deliver(settings: Settings, delivery_id: str, clock: Callable[[], float] = time.time) -> None:
    """One attempt of a due delivery, signed with the tenant's live secrets; the outcome decides the next one."""
    url = settings.resolved_database_url
    with session_scope(url) as session:
        row = webhooks.claim_attempt(session, delivery_id, lease_s=settings.fetch_timeout_s + 30)
        if row is None:
            return  # not due, done, or another sender has it
        headers = webhooks.signature_headers(
            webhooks.signing_secrets(session, row.tenant), row.id, int(clock()), row.payload.encode()
        )
        headers["User-Agent"] = webhooks.USER_AGENT
        target, body, subject = row.url, row.payload.encode(), f"{row.event_type} {row.subject_id}"
    status: int | None = None
    error: str | None = None
    try:
        status = post_json(
            target,
            body,
            timeout_s=settings.fetch_timeout_s,
            allow_private=settings.fetch_allow_private,
            headers=headers,
        )
        if not 200 <= status < 300:
            error = f"the receiver answered HTTP {status}"
    except ModtagError as exc:
        error = exc.message
    metrics.CALLBACKS.labels("delivered" if error is None else "rejected" if status else "failed").inc()
    with session_scope(url) as session:
        row = webhooks.finish_attempt(session, delivery_id, settings, status_code=status, error=error)
    if row.status == webhooks.FAILED:
        metrics.WEBHOOKS_ABANDONED.labels(row.event_type).inc()
        log.warning("webhook %s for %s abandoned after %d attempts: %s", row.id, subject, row.attempts, error)
    elif error is not None:
        log.info(
            "webhook %s for %s not delivered (%s); next attempt at %s", row.id, subject, error, row.next_attempt_at
        )


def start_webhook_sender(settings: Settings, stop: threading.Event) -> threading.Thread:
    """Retry due deliveries every `webhook_poll_s` in a daemon thread until `stop` is set."""

    def loop() -> None:
        while not stop.wait(settings.webhook_poll_s):
            try:
                _record_missing(settings)
                with session_scope(settings.resolved_database_url) as session:
                    due = webhooks.due_deliveries(session)
                for delivery_id in due:
                    deliver(settings, delivery_id)
                RECORD.succeeded(Dependency.DATABASE)
            except Exception as exc:  # the loop must survive a database outage: one line per outage, not per pass
                outage = outage_of(exc)
                if outage is None:
                    log.exception("webhook retry pass failed; will try again")
                else:
                    RECORD.failed(outage)

    thread = threading.Thread(target=loop, name="modtag-webhooks", daemon=True)
    thread.start()
    return thread


def _record_missing(settings: Settings) -> None:
    """Record the webhooks of final jobs and listings whose worker stopped before it could (at least once, even
    then). Those finished in the last `queued_grace_s` are left to their own worker."""
    url = settings.resolved_database_url
    grace = utcnow() - timedelta(seconds=settings.queued_grace_s)
    with session_scope(url) as session:
        missing = webhooks.jobs_missing_delivery(session, JOB_EVENTS, grace)
        found = [job for job_id in missing if (job := jobs.get_job(session, job_id)) is not None]
        listings = listings_missing_callback(session, grace)
    for job in found:
        log.warning("job %s was final without its webhook recorded; recording it now", job.id)
        _record(settings, job)
    for listing_id in listings:
        log.warning("listing %s was final without its webhook recorded; recording it now", listing_id)
        _record_listing(settings, listing_id)


def _record(settings: Settings, job: Job) -> list[str]:
    recorded: list[str] = []
    url = settings.resolved_database_url
    if job.callback_url:
        with session_scope(url) as session:
            current = jobs.get_job(session, job.id)
            if current is not None:
                public = JobPublic.from_row(current, jobs.get_decision(session, job.id))
                event = job_event_type(current)
                row = webhooks.record_delivery(
                    session,
                    tenant=current.tenant,
                    event_type=event,
                    subject_id=current.id,
                    url=job.callback_url,
                    payload=envelope(event, public.model_dump(mode="json"), current.finished_at),
                )
                recorded.append(row.id)
    if job.listing_id:
        recorded.extend(_record_listing(settings, job.listing_id))
    return recorded


def _record_listing(settings: Settings, listing_id: str) -> list[str]:
    """The listing's webhook, when due: the claim and the delivery row commit together (or, if we die, neither)."""
    with session_scope(settings.resolved_database_url) as session:
        due = listing_callback_due(session, listing_id)
        if due is None:
            return []
        body = ListingPublic.from_rows(due.listing, due.rows, photos_verdict).model_dump(mode="json")
        row = webhooks.record_delivery(
            session,
            tenant=due.listing.tenant,
            event_type=EventType.LISTING_DECIDED,
            subject_id=due.listing.id,
            url=due.url,
            payload=envelope(EventType.LISTING_DECIDED, body),
        )
        return [row.id]
