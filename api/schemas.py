"""Request and response bodies of the HTTP API, as the OpenAPI document shows them.

The JSON shapes themselves are built by `core.jobs.job_public` / `decision_public` (shared with callbacks);
these models describe them and let unknown extra keys through, so a field added in core is never dropped here.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema

# Ids are hex uuids; policy and category names are slugs. Checking them at the edge keeps bytes PostgreSQL
# refuses (NUL) out of queries, so a hostile id is a 404 or 422, never a database error.
ID_PATTERN = re.compile(r"^[0-9A-Za-z_-]{1,64}$")
SLUG_PATTERN = r"^[a-z0-9_-]+$"

Timestamp = Annotated[str, WithJsonSchema({"type": "string", "format": "date-time"})]
Action = Literal["allow", "review", "block"]


class ErrorBody(BaseModel):
    """Every error the API returns."""

    detail: str = Field(description="What went wrong, in a sentence a person can act on.")
    code: str = Field(description="A stable snake_case code for scripts.")


class JobRequest(BaseModel):
    """`POST /v1/jobs` as JSON: the image is fetched from `image_url` by a worker."""

    model_config = ConfigDict(extra="forbid")

    # URL lengths are checked with the URL itself, so every bad URL is reported as `url_invalid`.
    image_url: str = Field(description="http(s) URL of the image, at most 2048 characters.")
    policy: str = Field(default="moderation", min_length=1, max_length=64)
    # Typed loosely so that a non-object is reported as `invalid_context`, like the multipart form does.
    context: Annotated[Any, WithJsonSchema({"type": "object", "description": "Listing text and attributes."})] = None
    callback_url: str | None = Field(default=None, description="http(s) URL, at most 2048 characters.")


class CategoryResult(BaseModel):
    model_config = ConfigDict(extra="allow")

    score: float
    action: Action
    fired: bool


class DecisionPublic(BaseModel):
    """A stored decision with its evidence."""

    model_config = ConfigDict(extra="allow")

    id: str
    job_id: str
    action: Action
    categories: dict[str, CategoryResult]
    caption: str | None
    evidence: list[dict[str, Any]]
    tags: list[dict[str, Any]]
    policy: str
    policy_version: str
    models: dict[str, Any]
    decided_at: Timestamp
    duration_ms: float


class JobError(BaseModel):
    code: str
    message: str | None


class ReviewActor(BaseModel):
    id: str | None = Field(description="The API key's id (or a label for the CLI / the machine).")
    name: str | None


class ReviewClaim(BaseModel):
    by: ReviewActor
    expires_at: Timestamp


class ReviewResolution(BaseModel):
    action: Literal["allow", "block"]
    reason: str | None
    by: ReviewActor
    at: Timestamp


class ReviewItemPublic(BaseModel):
    """A `review` decision in the human queue; the machine decision itself is never changed."""

    model_config = ConfigDict(extra="allow")

    job_id: str
    decision_id: str
    policy: str
    category: str | None = Field(description="The highest-scoring flagged category.")
    score: float
    state: Literal["open", "resolved"]
    queued_at: Timestamp
    claim: ReviewClaim | None = Field(description="A live claim; an expired one is shown as null.")
    resolution: ReviewResolution | None
    reopen_count: int


class JobPublic(BaseModel):
    """A job and, once done, its decision and any human review beside it."""

    model_config = ConfigDict(extra="allow")

    id: str
    status: Literal["queued", "running", "done", "failed"]
    policy: str
    policy_version: str | None
    source: Literal["upload", "url"]
    image_url: str | None
    context: dict[str, Any] | None
    created_at: Timestamp
    started_at: Timestamp | None
    finished_at: Timestamp | None
    attempts: int
    error: JobError | None
    decision: DecisionPublic | None
    review: ReviewItemPublic | None = Field(default=None, description="The human review, for `review` decisions.")


class DecisionPage(BaseModel):
    data: list[DecisionPublic]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null on the last page.")


class PolicySummary(BaseModel):
    name: str
    description: str
    version: str = Field(description="Hash of the policy's normalised content; every decision records it.")
    categories: list[str]


class PolicyReloadError(BaseModel):
    code: str
    message: str = Field(description="file:line:col: what is wrong, one line per problem.")
    at: Timestamp


class PolicyList(BaseModel):
    data: list[PolicySummary]
    reload_error: PolicyReloadError | None = Field(
        default=None,
        description="The policy files changed but could not be loaded: the versions listed stay in use until fixed.",
    )


class Liveness(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    status: Literal["ready"]
    checks: dict[str, str]


class NotReadyBody(ErrorBody):
    checks: dict[str, str] = Field(description="Each dependency and `ok` or what failed.")


class ReviewQueueEntry(ReviewItemPublic):
    decision: DecisionPublic


class ReviewQueuePage(BaseModel):
    data: list[ReviewQueueEntry]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null on the last page.")


class ResolveRequest(BaseModel):
    """A person's call on a queued item, kept beside the machine decision."""

    model_config = ConfigDict(extra="forbid")

    action: Literal["allow", "block"]
    reason: str = Field(min_length=1, max_length=2000, description="Why; kept with the resolution.")


class ReopenRequest(BaseModel):
    """An appeal: why the resolved item goes back to the queue."""

    model_config = ConfigDict(extra="forbid")

    reason: str = Field(min_length=1, max_length=2000)


class AuditActor(BaseModel):
    key_id: str | None
    name: str
    role: str | None


class AuditTarget(BaseModel):
    type: str
    id: str


class AuditEntryPublic(BaseModel):
    id: int
    at: Timestamp
    actor: AuditActor
    action: str = Field(
        description="review.enqueued, review.claimed, review.released, review.resolved, review.reopened, key.created..."
    )
    target: AuditTarget
    before: dict[str, Any] | None
    after: dict[str, Any] | None


class AuditPage(BaseModel):
    data: list[AuditEntryPublic]
    next_cursor: str | None
