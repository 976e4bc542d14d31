"""Callbacks of final jobs: the job to its callback_url, and its listing to the listing's once every photo is final.

Once each, best effort: the API stays the source of truth, and a failed delivery never fails the job.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from sqlalchemy.exc import DBAPIError, OperationalError

from core import jobs, metrics
from core.db import session_scope
from core.errors import ModtagError
from core.listings import listing_callback_due
from core.public import JobPublic
from core.settings import Settings
from core.tables import Job
from core.urls import post_json
from policies.listing import listing_public

log = logging.getLogger(__name__)


def send_callbacks(settings: Settings, job: Job) -> None:
    """POST the final job to its callback_url, and its listing's verdict when this job was the last photo."""
    url = settings.resolved_database_url
    if job.callback_url:
        try:
            with session_scope(url) as session:
                current = jobs.get_job(session, job.id)
                public = JobPublic.from_row(current, jobs.get_decision(session, job.id)) if current else None
        except (OperationalError, DBAPIError) as exc:
            log.warning("callback for job %s not delivered: %s", job.id, exc)
            metrics.CALLBACKS.labels("failed").inc()
        else:
            if public is not None:
                _post(settings, f"job {job.id}", job.callback_url, public.model_dump(mode="json"))
    if job.listing_id:
        try:
            with session_scope(url) as session:
                due = listing_callback_due(session, job.listing_id)
        except (OperationalError, DBAPIError) as exc:
            log.warning("callback for listing %s not claimed: %s", job.listing_id, exc)
            metrics.CALLBACKS.labels("failed").inc()
        else:
            if due is not None:
                body = listing_public(due.listing, due.rows).model_dump(mode="json")
                _post(settings, f"listing {job.listing_id}", due.url, body)


def _post(settings: Settings, subject: str, url: str, body: dict[str, Any]) -> None:
    try:
        status = post_json(
            url,
            json.dumps(body).encode(),
            timeout_s=settings.fetch_timeout_s,
            allow_private=settings.fetch_allow_private,
        )
        outcome = "delivered" if 200 <= status < 300 else "rejected"
    except ModtagError as exc:
        log.warning("callback for %s not delivered: %s", subject, exc)
        outcome = "failed"
    metrics.CALLBACKS.labels(outcome).inc()
