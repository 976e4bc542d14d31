"""Jobs put in the database the way the API and the worker put them, for tests that start from a stored job."""

from __future__ import annotations

from sqlalchemy import update
from sqlmodel import Session, col

from core.db import session_scope
from core.jobs import NewJob, claim_job, create_job
from core.tables import Job


def claimed_url_job(
    session: Session, *, tenant: str, policy: str, policy_version: str, image_url: str, worker: str
) -> Job:
    """A job for `image_url`, created as the API creates it and claimed by `worker`: ready for its decision."""
    job, _ = create_job(
        session,
        NewJob(tenant=tenant, policy=policy, policy_version=policy_version, source="url", image_url=image_url),
    )
    claimed = claim_job(session, job.id, worker, 60)
    assert claimed is not None
    return claimed


def new_job(database_url: str, **values: object) -> str:
    """A queued upload job as the API commits it; `values` overwrite its columns (its age, its status)."""
    with session_scope(database_url) as session:
        job, _ = create_job(
            session,
            NewJob(tenant="default", policy="moderation", policy_version=None, source="upload", blob_key="0" * 64),
        )
        if values:
            session.execute(update(Job).where(col(Job.id) == job.id).values(**values))
    return job.id


def stored(database_url: str, job_id: str) -> Job:
    """The job's row as the database holds it now."""
    with session_scope(database_url) as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job


def decided_url_job(
    database_url: str,
    action: str = "review",
    *,
    categories: dict[str, dict[str, object]] | None = None,
    tenant: str = "default",
    callback_url: str | None = None,
) -> str:
    """A URL job the worker decided `action` (stored as its write path stores it: decision, a queue item for a
    review, audit); `categories` default to one weapons score that asked for review."""
    from core.jobs import store_decision
    from core.tables import Decision

    if categories is None:
        categories = {"weapons": {"score": 0.72, "action": "review", "fired": True, "decided_by": "probe"}}
    with session_scope(database_url) as session:
        job = claimed_url_job(
            session,
            tenant=tenant,
            policy="moderation",
            policy_version="v1",
            image_url="https://img.example/a.jpg",
            worker="test-worker",
        )
        if callback_url is not None:
            session.execute(update(Job).where(col(Job.id) == job.id).values(callback_url=callback_url))
        decision = Decision(
            job_id=job.id, action=action, policy="moderation", policy_version="v1", categories=categories
        )
        store_decision(session, job, decision)
        return job.id
