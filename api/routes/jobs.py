"""Job submission, status and erasure: `POST /v1/jobs`, `GET` and `DELETE /v1/jobs/{job_id}`, its thumbnail."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Response
from sqlmodel import Session
from starlette.concurrency import run_in_threadpool

from api.auth import Eraser, Reader
from api.deps import ServicesDep, SessionDep
from api.errors import error_responses
from api.media import filmstrip_response, video_response
from api.moderate_now import FinalWaiterDep, PreferencesDep, wait_for_final
from api.submissions import IntakeDep, JobSubmission, JobSubmissionDep, submission_route
from api.thumbnails import forget_thumbnail, thumbnail_response
from core.erasure import erase_job
from core.finality import job_subject
from core.jobs import get_decision, tenant_job
from core.public import ErrorBody, JobPublic
from core.review import get_item
from core.tables import FINAL_STATUSES, Job

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


@router.post("", **submission_route(JobSubmission))
async def submit_job(
    intake: IntakeDep, submission: JobSubmissionDep, preferences: PreferencesDep, waiter: FinalWaiterDep
) -> JobPublic:
    """Submit an image (multipart upload or JSON `image_url`) to be judged against a policy (role submit); with
    `Prefer: wait=N`, answered 200 with the decided job when it is decided within N seconds."""
    accepted = await run_in_threadpool(intake.accept, submission, "/v1/jobs")
    job = accepted.record
    wait_s = preferences.wait_within(intake.services.settings.max_prefer_wait_s)
    if wait_s is not None:
        return await wait_for_final(
            intake, preferences, wait_s, job_subject(job.id), lambda session: _job_now(session, job), waiter
        )
    if accepted.created:
        return JobPublic.from_row(job, None)
    return (await run_in_threadpool(_job_now, intake.session, job))[1]


def _job_now(session: Session, job: Job) -> tuple[bool, JobPublic]:
    """Whether the job is final now, and its body as `GET /v1/jobs/{id}` shows it."""
    row = session.get(Job, job.id) or job
    body = JobPublic.from_row(row, get_decision(session, row.id), get_item(session, row.id, row.tenant))
    return row.status in FINAL_STATUSES, body


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
    """A small JPEG of the job's uploaded image (a video's: the filmstrip of its judged frames, the fired ones framed
    in red, once judged), for the caller's own tenant only."""
    job = tenant_job(session, job_id, principal.tenant)
    if job.media == "video":
        return filmstrip_response(job, get_decision(session, job.id), services)
    return thumbnail_response(job, services)


@router.get(
    "/{job_id}/video",
    response_class=Response,
    responses={
        200: {"content": {"video/mp4": {}}, "description": "The whole video (Accept-Ranges: bytes)."},
        206: {"content": {"video/mp4": {}}, "description": "The one range asked for, with Content-Range."},
        416: {"model": ErrorBody, "description": "The range is outside the video (`range_not_satisfiable`)."},
        **error_responses(401, 403, 404, 422),
    },
)
def read_video(
    job_id: str,
    session: SessionDep,
    services: ServicesDep,
    principal: Reader,
    range_header: Annotated[str | None, Header(alias="Range")] = None,
) -> Response:
    """A video job's stored video, with HTTP range requests (an HTML5 <video> seeks with them), own tenant only."""
    job = tenant_job(session, job_id, principal.tenant)
    return video_response(job, services, range_header)


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
