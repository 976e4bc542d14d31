"""Job submission and status: `POST /v1/jobs`, `GET /v1/jobs/{job_id}`, `GET /v1/jobs/{job_id}/thumbnail`."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Response, status
from sqlmodel import Session

from api.auth import Reader, Submitter
from api.deps import ServicesDep, SessionDep
from api.errors import error_responses
from api.schemas import JobRequest
from api.submissions import (
    IdempotencyKeyDep,
    SubmissionDep,
    check_url,
    parse_context,
    require_context,
    resolve_policy,
)
from api.thumbnails import thumbnail_response
from core.broker import enqueue_job
from core.images import ImageLimits, sniff_image
from core.jobs import NewJob, create_job, find_by_idempotency_key, get_decision, tenant_job
from core.metrics import JOBS_SUBMITTED
from core.public import JobPublic
from core.review import get_item
from core.tables import Job

logger = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

_MULTIPART_SCHEMA = {
    "type": "object",
    "required": ["image"],
    "properties": {
        "image": {"type": "string", "format": "binary", "description": "JPEG, PNG, WebP, GIF..."},
        "policy": {"type": "string", "default": "moderation"},
        "context": {"type": "string", "description": "A JSON object, e.g. the listing's title and attributes."},
        "callback_url": {"type": "string", "format": "uri"},
    },
}
_SUBMIT_OPENAPI = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {"schema": _MULTIPART_SCHEMA},
            "application/json": {"schema": JobRequest.model_json_schema()},
        },
    },
}


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobPublic,
    openapi_extra=_SUBMIT_OPENAPI,
    responses={
        200: {"model": JobPublic, "description": "A job with this Idempotency-Key already exists; it is returned."},
        **error_responses(400, 401, 403, 404, 413, 415, 422),
    },
)
def submit_job(
    principal: Submitter,  # first: the body is not read for a caller who may not submit
    idempotency_key: IdempotencyKeyDep,
    submission: SubmissionDep,
    services: ServicesDep,
    session: SessionDep,
    response: Response,
) -> JobPublic:
    """Submit an image (multipart upload or JSON `image_url`) to be judged against a policy (role submit)."""
    settings = services.settings
    tenant = principal.tenant
    # Cheapest checks first; the body was already read under a hard size cap.
    header = (
        sniff_image(submission.image, ImageLimits.from_settings(settings)) if submission.image is not None else None
    )
    policy = resolve_policy(services.policies, submission.policy)
    context = parse_context(submission, settings.max_context_bytes)
    require_context(policy, context)
    image_url = check_url(submission.image_url, "image_url") if submission.image_url else None
    callback_url = check_url(submission.callback_url, "callback_url") if submission.callback_url else None

    if idempotency_key and (existing := find_by_idempotency_key(session, tenant, idempotency_key)):
        return _replay(existing, session, response)

    blob_key = services.blobs.put(submission.image) if submission.image is not None else None
    job, created = create_job(
        session,
        NewJob(
            tenant=tenant,
            policy=policy.name,
            policy_version=policy.version,
            source=submission.source,
            blob_key=blob_key,
            image_sha256=blob_key,  # the blob store is content-addressed by SHA-256
            image_bytes=len(submission.image) if submission.image is not None else None,
            image_width=header.width if header else None,
            image_height=header.height if header else None,
            image_format=header.format if header else None,
            image_url=image_url,
            context=context,
            callback_url=callback_url,
            idempotency_key=idempotency_key,
            submitted_by=principal.key_id,
        ),
    )
    if not created:  # a concurrent request with the same key won the race
        return _replay(job, session, response)

    try:
        enqueue_job(services.celery, job.id)
    except Exception as exc:
        # The job row is committed, so nothing is lost: the reconciler re-enqueues queued jobs that no worker
        # picked up. The client still gets its 202 and can poll the job.
        logger.warning("job %s stored but not enqueued (%s); the reconciler will enqueue it", job.id, exc)
    JOBS_SUBMITTED.labels(policy=policy.name, source=submission.source).inc()
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return JobPublic.from_row(job, None)


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


def _replay(job: Job, session: Session, response: Response) -> JobPublic:
    response.status_code = status.HTTP_200_OK
    response.headers["Idempotent-Replayed"] = "true"
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return JobPublic.from_row(job, get_decision(session, job.id), get_item(session, job.id, job.tenant))
