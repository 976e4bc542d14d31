"""Example sets (`/v1/example-sets[/{name}[/items[/{job_id}]]]`) and similar images (`/v1/jobs/{job_id}/similar`).

An example is one of the tenant's jobs with a label (core/examples.py). Added by `job_id`, or uploaded: an upload
becomes an ordinary job of the policy the form names (default `moderation`), and the worker that decides it stores
its embedding, as it does for every job that is an example (worker/embedding.py); until then the item is pending.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Request, Response, status
from sqlmodel import col, select
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, UploadFile

from api.auth import ExampleCreator, ExampleEditor, Reader
from api.bodies import (
    MULTIPART_SLACK_BYTES,
    BodyLimits,
    SpooledUpload,
    form_text,
    open_body,
    refuse_unknown_fields,
    spooled_upload,
    validate_body,
)
from api.deps import ServicesDep, SessionDep, SettingsDep
from api.errors import error_responses
from api.schemas import ExampleItemRequest, ExampleSetRequest
from api.submissions import Intake, JobSubmission, read_priority
from core import embeddings, examples
from core.errors import Conflict, InvalidField
from core.jobs import tenant_job
from core.public import (
    ExampleItemList,
    ExampleItemPublic,
    ExampleSetList,
    ExampleSetPublic,
    SimilarJob,
    SimilarJobs,
)
from core.tables import Decision, Job

router = APIRouter(prefix="/v1/example-sets", tags=["examples"])
similar_router = APIRouter(prefix="/v1/jobs", tags=["examples"])

SetName = Annotated[str, Path(max_length=64, description="The example set's name.")]
JobId = Annotated[str, Path(max_length=64)]
_FORM_FIELDS = frozenset({"image", "label", "policy"})
_ITEM_BODY = {
    "multipart/form-data": {
        "schema": {
            "type": "object",
            "required": ["image", "label"],
            "properties": {
                "image": {"type": "string", "format": "binary", "description": "The example image: it becomes a job."},
                "label": {"type": "string", "enum": ["positive", "negative"]},
                "policy": {"type": "string", "default": "moderation", "description": "The job's policy."},
            },
        }
    },
    "application/json": {"schema": ExampleItemRequest.model_json_schema()},
}


@dataclass
class NewExample:
    """An item off the wire: an existing job by id, or an upload that becomes a job."""

    label: examples.Label
    job_id: str | None = None
    submission: JobSubmission | None = None


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=ExampleSetPublic,
    responses=error_responses(401, 403, 409, 422),
)
def create_example_set(body: ExampleSetRequest, session: SessionDep, principal: ExampleCreator) -> ExampleSetPublic:
    """Create an empty example set in the caller's tenant (role admin)."""
    created = examples.create_set(session, principal, body.name, body.description)
    return ExampleSetPublic.from_row(created, examples.SetCounts())


@router.get("", response_model=ExampleSetList, responses=error_responses(401, 403))
def read_example_sets(session: SessionDep, principal: ExampleEditor) -> ExampleSetList:
    """The tenant's example sets with their counts (roles admin, review)."""
    return ExampleSetList(
        data=[ExampleSetPublic.from_row(s, counts) for s, counts in examples.list_sets(session, principal.tenant)]
    )


@router.get("/{name}", response_model=ExampleSetPublic, responses=error_responses(401, 403, 404, 422))
def read_example_set(name: SetName, session: SessionDep, principal: ExampleEditor) -> ExampleSetPublic:
    """One example set with its counts (roles admin, review)."""
    example_set = examples.get_set(session, principal.tenant, name)
    return ExampleSetPublic.from_row(example_set, examples.counts(session, example_set))


@router.delete(
    "/{name}",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    responses=error_responses(401, 403, 404, 422),
)
def delete_example_set(name: SetName, session: SessionDep, principal: ExampleCreator) -> Response:
    """Delete an example set and its items; the jobs stay (role admin). Checks naming it then find no examples."""
    examples.delete_set(session, principal, examples.get_set(session, principal.tenant, name))
    return Response(status_code=status.HTTP_204_NO_CONTENT)


async def read_example_item(request: Request, settings: SettingsDep) -> Any:
    """The item off the wire: JSON `{"job_id", "label"}`, or a multipart `image` with `label` (and `policy`)."""
    limits = BodyLimits(
        multipart_cap=settings.max_upload_bytes + MULTIPART_SLACK_BYTES,
        multipart_too_large=("image_too_large", f"the image is over {settings.max_upload_bytes} bytes"),
        max_files=1,
        max_fields=4,
        json_cap=MULTIPART_SLACK_BYTES,
        json_too_large="the JSON body is too large for one example: send a job_id and a label",
        expected='multipart/form-data with an `image` and a `label`, or application/json with "job_id" and "label"',
    )

    async def from_form(form: FormData) -> NewExample:
        refuse_unknown_fields(form, _FORM_FIELDS)
        label = examples.parse_label(form_text(form, "label") or "")
        image = form.get("image")
        if not isinstance(image, UploadFile):
            raise InvalidField("the `image` file is missing: send it as multipart field `image`", code="image_missing")
        upload: SpooledUpload = spooled_upload(image, settings.max_upload_bytes, "the image")
        submission = JobSubmission(
            policy=form_text(form, "policy") or "moderation",
            uploads=[upload],
            urls=[],
            callback_url=None,
            priority=read_priority(None),
        )
        return NewExample(label=label, submission=submission)

    def from_json(document: dict[str, Any]) -> NewExample:
        if "label" in document and document["label"] not in ("positive", "negative"):
            examples.parse_label(document["label"])  # the clear 422 `example_label_invalid`
        body = validate_body(ExampleItemRequest, document)
        return NewExample(label=examples.Label(body.label), job_id=body.job_id)

    async with open_body(request, limits, from_form=from_form, from_json=from_json) as item:
        yield item


@router.post(
    "/{name}/items",
    status_code=status.HTTP_201_CREATED,
    response_model=ExampleItemPublic,
    openapi_extra={"requestBody": {"required": True, "content": _ITEM_BODY}},
    responses=error_responses(400, 401, 403, 404, 409, 413, 415, 422),
)
def add_example(
    name: SetName,
    principal: ExampleEditor,  # before the body: a caller who may not add is refused unread
    item: Annotated[NewExample, Depends(read_example_item)],
    session: SessionDep,
    services: ServicesDep,
    response: Response,
) -> ExampleItemPublic:
    """Add an example to a set: one of the tenant's jobs by `job_id`, or an uploaded image, which becomes a job
    whose embedding the worker stores (the item is `embedded: false` until then) (roles admin, review)."""
    example_set = examples.get_set(session, principal.tenant, name)
    if item.submission is not None:
        intake = Intake(principal, None, services, session, response)
        job = intake.accept(item.submission, "/v1/jobs").record
    else:
        job = tenant_job(session, item.job_id or "", principal.tenant)
    row = examples.add_item(session, principal, example_set, job, item.label)
    response.headers["Location"] = f"/v1/example-sets/{example_set.name}/items/{job.id}"
    return ExampleItemPublic.from_row(row, example_set.name, embeddings.get(session, job.id) is not None)


@router.get("/{name}/items", response_model=ExampleItemList, responses=error_responses(401, 403, 404, 422))
def read_examples(
    name: SetName,
    session: SessionDep,
    principal: ExampleEditor,
    after: Annotated[str | None, Query(max_length=64, description="The last job id of the previous page.")] = None,
    limit: Annotated[int, Query(ge=1, le=examples.MAX_ITEMS_PAGE)] = 100,
) -> ExampleItemList:
    """The set's examples by job id, a page at a time (roles admin, review)."""
    example_set = examples.get_set(session, principal.tenant, name)
    rows = examples.list_items(session, example_set, after=after, limit=limit)
    data = [ExampleItemPublic.from_row(row, example_set.name, embedded) for row, embedded in rows]
    return ExampleItemList(data=data, next_cursor=data[-1].job_id if len(data) == limit else None)


@router.get("/{name}/items/{job_id}", response_model=ExampleItemPublic, responses=error_responses(401, 403, 404, 422))
def read_example(name: SetName, job_id: JobId, session: SessionDep, principal: ExampleEditor) -> ExampleItemPublic:
    """One example of a set, by its job's id (roles admin, review)."""
    example_set = examples.get_set(session, principal.tenant, name)
    row, embedded = examples.get_item(session, example_set, job_id)
    return ExampleItemPublic.from_row(row, example_set.name, embedded)


@router.delete(
    "/{name}/items/{job_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    responses=error_responses(401, 403, 404, 422),
)
def delete_example(name: SetName, job_id: JobId, session: SessionDep, principal: ExampleEditor) -> Response:
    """Remove an example from a set (the job stays); it stops voting at once (roles admin, review)."""
    examples.delete_item(session, principal, examples.get_set(session, principal.tenant, name), job_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@similar_router.get("/{job_id}/similar", response_model=SimilarJobs, responses=error_responses(401, 403, 404, 409, 422))
async def read_similar(
    job_id: JobId,
    session: SessionDep,
    principal: Reader,
    limit: Annotated[int, Query(ge=1, le=100, description="How many similar images.")] = 20,
) -> SimilarJobs:
    """The tenant's images most similar to this job's (image embeddings, cosine similarity) (role read)."""
    return await run_in_threadpool(_similar, session, job_id, principal.tenant, limit)


def _similar(session: Any, job_id: str, tenant: str, limit: int) -> SimilarJobs:
    job = tenant_job(session, job_id, tenant)
    found = similar_jobs(session, job, limit)
    if found is None:
        raise Conflict(
            "this job has no image embedding: only jobs whose policy runs the ITM model (match, describe, tags or "
            "examples checks) or that are examples store one, once decided",
            code="embedding_missing",
        )
    return SimilarJobs(job_id=job.id, data=found)


def similar_jobs(session: Any, job: Job, limit: int) -> list[SimilarJob] | None:
    """The tenant's jobs nearest to `job`'s image, most similar first; None when the job has no embedding."""
    embedding = embeddings.get(session, job.id)
    if embedding is None:
        return None
    found = embeddings.similar(session, embedding, limit)
    ids = [item.job_id for item in found]
    if not ids:
        return []
    rows = {row.id: row for row in session.exec(select(Job).where(col(Job.id).in_(ids))).all()}
    actions = dict(session.exec(select(Decision.job_id, Decision.action).where(col(Decision.job_id).in_(ids))).all())
    return [
        SimilarJob(
            job_id=item.job_id,
            similarity=item.similarity,
            action=actions.get(item.job_id),
            created_at=rows[item.job_id].created_at,
        )
        for item in found
        if item.job_id in rows and rows[item.job_id].tenant == job.tenant
    ]
