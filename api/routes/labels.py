"""The labels export: `GET /v1/labels` (the tenant's labelled jobs) and `GET /v1/labels/{job_id}/image`."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import Response

from api.auth import LabelExporter
from api.deps import ServicesDep, SessionDep
from api.errors import error_responses
from api.schemas import SINCE_HELP, SLUG_PATTERN, Moment
from core.labels import exportable_job, labelled_jobs
from core.public import LabelledJobPage
from core.tables import as_utc, utcnow

router = APIRouter(prefix="/v1/labels", tags=["labels"])

DEFAULT_SINCE = timedelta(days=30)
_MEDIA_TYPES = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp", "GIF": "image/gif"}


@router.get("", response_model=LabelledJobPage, responses=error_responses(400, 401, 403, 422))
def read_labels(
    session: SessionDep,
    principal: LabelExporter,
    since: Annotated[Moment | None, Query(description=SINCE_HELP + " Default 30d.")] = None,
    policy: Annotated[str | None, Query(max_length=64, pattern=SLUG_PATTERN)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: Annotated[str | None, Query(max_length=512)] = None,
) -> LabelledJobPage:
    """The tenant's labelled jobs, oldest resolution first: the machine's action and scores, the reviewer's
    resolution and per-category labels, who and when (role admin). Erased jobs are never listed."""
    data, next_cursor = labelled_jobs(
        session,
        tenant=principal.tenant,
        since=as_utc(since) if since is not None else utcnow() - DEFAULT_SINCE,
        policy=policy,
        limit=limit,
        cursor=cursor,
    )
    return LabelledJobPage(data=data, next_cursor=next_cursor)


@router.get(
    "/{job_id}/image",
    response_class=Response,
    responses={
        200: {"content": {"image/*": {}}, "description": "The image as it was uploaded (Cache-Control private)."},
        **error_responses(401, 403, 404, 422),
    },
)
def read_labelled_image(job_id: str, session: SessionDep, services: ServicesDep, principal: LabelExporter) -> Response:
    """The uploaded bytes of a labelled job of the tenant (role admin); 404 `job_erased` once it was erased."""
    job = exportable_job(session, job_id, principal.tenant)
    assert job.blob_key is not None  # exportable_job refuses jobs without a stored image
    media_type = _MEDIA_TYPES.get((job.image_format or "").upper(), "application/octet-stream")
    return Response(services.blobs.get(job.blob_key), media_type=media_type, headers={"Cache-Control": "private"})
