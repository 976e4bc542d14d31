"""Job submission, status and erasure: `POST /v1/jobs`, `GET` and `DELETE /v1/jobs/{job_id}`, its thumbnail."""

from __future__ import annotations

from fastapi import APIRouter, Response

from api.auth import Eraser, Reader
from api.deps import ServicesDep, SessionDep
from api.errors import error_responses
from api.submissions import IntakeDep, JobSubmission, JobSubmissionDep, submission_route
from api.thumbnails import forget_thumbnail, thumbnail_response
from core.erasure import erase_job
from core.jobs import get_decision, tenant_job
from core.public import JobPublic
from core.review import get_item

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


@router.post("", **submission_route(JobSubmission))
def submit_job(intake: IntakeDep, submission: JobSubmissionDep) -> JobPublic:
    """Submit an image (multipart upload or JSON `image_url`) to be judged against a policy (role submit)."""
    accepted = intake.accept(submission, "/v1/jobs")
    job = accepted.record
    if accepted.created:
        return JobPublic.from_row(job, None)
    return JobPublic.from_row(job, get_decision(intake.session, job.id), get_item(intake.session, job.id, job.tenant))


@router.get("/{job_id}", response_model=JobPublic, responses=error_responses(401, 403, 404, 422))
def read_job(job_id: str, session: SessionDep, principal: Reader) -> JobPublic:
    """The job's status and, once done, its decision and any human review beside it."""
    job = tenant_job(session, job_id, principal.tenant)
    return JobPublic.from_row(job, get_decision(session, job.id), get_item(session, job.id, principal.tenant))


@router.get(
    "/{job_id}/thumbnail",
    response_class=Response,
    responses={
        200: {"content": {"image/jpeg": {}}, "description": "A JPEG at most 320 px on a side (Cache-Control private)."},
        **error_responses(401, 403, 404, 422),
    },
)
def read_thumbnail(job_id: str, session: SessionDep, services: ServicesDep, principal: Reader) -> Response:
    """A small JPEG of the job's uploaded image, for the caller's own tenant only."""
    job = tenant_job(session, job_id, principal.tenant)
    return thumbnail_response(job, services)


@router.delete("/{job_id}", response_model=JobPublic, responses=error_responses(401, 403, 404, 422))
def delete_job(job_id: str, session: SessionDep, services: ServicesDep, principal: Eraser) -> JobPublic:
    """Erase the job's image, thumbnail, URLs, context, caption, evidence, error message and reviewer notes, and
    empty its webhooks; the job stays as a tombstone (`erased_at`) with its decision's action and category scores,
    and `kept` says what else stayed and why (role admin; a submit key for the jobs it submitted)."""
    job = tenant_job(session, job_id, principal.tenant)
    key = job.blob_key
    erasure = erase_job(session, services.blobs, job, principal)
    if erasure.blob_deleted and key is not None:
        forget_thumbnail(key, services)
    decision, item = get_decision(session, job.id), get_item(session, job.id, principal.tenant)
    return JobPublic.from_row(job, decision, item, kept=erasure.kept)
