"""Jobs put in the database the way the API and the worker put them, for tests that start from a stored job."""

from __future__ import annotations

from sqlmodel import Session

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
