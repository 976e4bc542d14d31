"""Erasure and retention: a job's image and content removed on request or after MODTAG_RETENTION_DAYS.

What goes: the image (its blob, unless another job still uses the same bytes: blobs are content
addressed and shared), the image URL, the context, the caption, the lines read (text), the evidence, tags,
contradictions and reasons (they quote the caption and the context). What stays, as a tombstone for statistics: the job
row with `erased_at`, the decision's action and its category scores and actions. Every erasure is
audit-logged in the same transaction.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from sqlalchemy import func
from sqlmodel import Session, col, select

from core import audit, metrics
from core.blobs import BlobStore
from core.db import session_scope
from core.errors import Forbidden
from core.principals import Principal, system_principal
from core.tables import FINAL_STATUSES, Decision, Job, Role, utcnow

log = logging.getLogger(__name__)
SWEEP_BATCH = 500  # jobs per transaction of a retention sweep
_CATEGORY_KEPT = ("score", "action", "fired", "decided_by")


def erase_job(session: Session, blobs: BlobStore, job: Job, actor: Principal, *, why: str = "request") -> bool:
    """Erase one job's image and content (idempotent); True when its blob was deleted (no other job uses it).

    A submit key may erase only the jobs it submitted. A job still queued or running is erased too: its
    worker then fails it with `blob_missing` and no decision is made from the erased image.
    """
    if actor.role == Role.SUBMIT and job.submitted_by != actor.key_id:
        raise Forbidden("a submit key may erase only the jobs it submitted", code="forbidden")
    if job.erased_at is not None:
        return False
    key = job.blob_key
    before = {"status": job.status, "blob": bool(key), "context": job.context is not None}
    job.erased_at = utcnow()
    job.blob_key, job.image_url, job.context = None, None, None
    session.add(job)
    decision = session.exec(select(Decision).where(Decision.job_id == job.id)).first()
    if decision is not None:
        decision.caption, decision.text, decision.reason, decision.contradictions = None, None, None, None
        decision.evidence, decision.tags = [], []
        decision.categories = {
            name: {field: result.get(field) for field in _CATEGORY_KEPT} for name, result in decision.categories.items()
        }
        session.add(decision)
    audit.record(
        session,
        actor,
        "job.erase",
        "job",
        job.id,
        before=before,
        after={"erased_at": job.erased_at.isoformat(), "why": why},
        tenant=job.tenant,
    )
    session.commit()
    metrics.ERASURES.labels(why).inc()
    # After the commit: a job stored meanwhile with the same bytes counts. One submitted in the instant between
    # this check and the delete would find its blob gone and fail with `blob_missing` (it can be resubmitted).
    if key is None or _blob_in_use(session, key):
        return False
    blobs.delete(key)
    return True


def sweep_retention(url: str, blobs: BlobStore, retention_days: int, now: datetime | None = None) -> int:
    """Erase every finished job created more than `retention_days` before `now`; how many were erased."""
    cutoff = (now or utcnow()) - timedelta(days=retention_days)
    erased = 0
    while True:
        with session_scope(url) as session:
            batch = session.exec(
                select(Job)
                .where(
                    col(Job.erased_at).is_(None),
                    col(Job.created_at) < cutoff,
                    col(Job.status).in_([str(status) for status in FINAL_STATUSES]),
                )
                .limit(SWEEP_BATCH)
            ).all()
            for job in batch:
                erase_job(session, blobs, job, system_principal(job.tenant), why="retention")
        erased += len(batch)
        if len(batch) < SWEEP_BATCH:
            break
    if erased:
        log.info("retention: erased %d job(s) created before %s", erased, cutoff.isoformat())
    return erased


def _blob_in_use(session: Session, key: str) -> bool:
    return bool(session.exec(select(func.count()).select_from(Job).where(Job.blob_key == key)).one())
