"""The public JSON shapes: every body the API answers with and every callback the worker POSTs, built from rows.

One owner per shape. The API routes declare these models as `response_model` and return them; the worker dumps the
same models as its job and listing callbacks; the review queue stores `ReviewItemPublic` snapshots in the audit log.
They live in core because api/ and worker/ both need them and neither may import the other. What the domain
computes (a listing's verdict, a policy's summary) is passed in as values: core never imports policies.

The models are exact (`extra="forbid"`): no key leaves the system undeclared. Those the document has always marked
open (`additionalProperties: true`) keep that mark: it tells clients that later versions add keys, so they must
ignore keys they do not know; it says nothing about this version sending undeclared ones.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema
from sqlmodel import SQLModel

from core.tables import (
    ApiKey,
    AuditEntry,
    Bank,
    BankItem,
    Decision,
    Job,
    Listing,
    ReviewItem,
    ReviewState,
    WebhookDelivery,
    WebhookSecret,
    as_utc,
    iso,
    utcnow,
)

# A row's datetime becomes ISO 8601 in UTC on the way in, so constructors hand columns over as they are.
Timestamp = Annotated[
    str,
    BeforeValidator(lambda value: iso(value) if isinstance(value, datetime) else value),
    WithJsonSchema({"type": "string", "format": "date-time"}),
]
Action = Literal["allow", "review", "block"]
Shape = TypeVar("Shape", bound=BaseModel)


def _promise_nothing(schema: dict[str, Any]) -> None:
    # `forbid` binds this code, not clients: `additionalProperties: false` would make generated clients refuse
    # the keys a later version adds.
    schema.pop("additionalProperties", None)


class PublicModel(BaseModel):
    """A public shape: exact, and its schema promises clients nothing about the keys later versions add."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_promise_nothing)


class OpenModel(PublicModel):
    """A public shape the document has always marked open to additions (`additionalProperties: true`)."""

    model_config = ConfigDict(json_schema_extra={"additionalProperties": True})


class ErrorBody(PublicModel):
    """Every error the API returns."""

    detail: str = Field(description="What went wrong, in a sentence a person can act on.")
    code: str = Field(description="A stable snake_case code for scripts.")


class NotReadyBody(ErrorBody):
    checks: dict[str, str] = Field(description="Each dependency and `ok` or what failed.")


class Liveness(PublicModel):
    status: Literal["ok"]


class Readiness(PublicModel):
    status: Literal["ready"]
    checks: dict[str, str]


# --- decisions and jobs ----------------------------------------------------------------------------------------


class CategoryResult(OpenModel):
    score: float
    action: Action
    fired: bool
    decided_by: str | None = Field(default=None, description="The check that set the score (null when it is 0).")
    reason: str | None = Field(default=None, description="Which check decided, with what score, against what.")


class TextLinePublic(PublicModel):
    """One line of text read in the image."""

    text: str
    score: float = Field(description="The reader's confidence, 0 to 1.")
    box: list[int] = Field(min_length=4, max_length=4, description="[x0, y0, x1, y1] in image pixels.")


class DecisionPublic(OpenModel):
    """A stored decision with its evidence."""

    id: str
    job_id: str
    action: Action
    categories: dict[str, CategoryResult]
    caption: str | None
    text: list[TextLinePublic] | None = Field(
        default=None, description="The lines read in the image (OCR), when a check read text; boxes in image pixels."
    )
    evidence: list[dict[str, Any]]
    tags: list[dict[str, Any]]
    contradictions: list[dict[str, Any]] = Field(
        description="Claims of the job's context the photo contradicts: {category, field, claimed, seen, score}."
    )
    reason: str | None = Field(description="Which category and check decided, as a sentence.")
    policy: str
    policy_version: str
    models: dict[str, Any]
    decided_at: Timestamp
    duration_ms: float
    reused_from: str | None = Field(
        default=None, description="The earlier job (same tenant, bytes and policy version) whose decision was reused."
    )

    @classmethod
    def from_row(cls, decision: Decision) -> DecisionPublic:
        return _from_row(cls, decision, contradictions=decision.contradictions or [])


class JobError(PublicModel):
    code: str
    message: str | None


class JobHashes(PublicModel):
    """What the job's image is known by: its bytes' SHA-256 and its PDQ perceptual hash (core/hashes.py)."""

    sha256: str
    pdq: str | None = Field(description="64 hex digits; null until a worker has decoded the image.")
    pdq_quality: int | None = Field(description="0-100; a hash below 50 never matches a bank by PDQ.")


class JobListing(PublicModel):
    """The listing a photo's job belongs to."""

    id: str
    index: int = Field(description="The photo's position in the listing, from 0.")


class ReviewActor(PublicModel):
    id: str | None = Field(description="The API key's id (or a label for the CLI / the machine).")
    name: str | None


class ReviewClaim(PublicModel):
    by: ReviewActor
    expires_at: Timestamp


class ReviewResolution(PublicModel):
    action: Literal["allow", "block"]
    reason: str | None
    by: ReviewActor
    at: Timestamp


class ReviewItemPublic(OpenModel):
    """A `review` decision in the human queue; the machine decision itself is never changed."""

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

    @classmethod
    def from_row(cls, item: ReviewItem, *, now: datetime | None = None) -> ReviewItemPublic:
        """The item as of `now`: a claim whose lease has run out is shown as no claim."""
        expires = item.claim_expires_at
        live = item.claimed_by is not None and expires is not None and as_utc(expires) > (now or utcnow())
        claimant = ReviewActor(id=item.claimed_by, name=item.claimed_by_name)
        resolver = ReviewActor(id=item.resolved_by, name=item.resolved_by_name)
        resolved = item.state == ReviewState.RESOLVED
        return _from_row(
            cls,
            item,
            claim=ReviewClaim(by=claimant, expires_at=expires) if live else None,
            resolution=(
                ReviewResolution(action=item.resolution, reason=item.reason, by=resolver, at=item.resolved_at)
                if resolved
                else None
            ),
        )


class JobPublic(OpenModel):
    """A job and, once done, its decision and any human review beside it."""

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
    listing: JobListing | None = Field(description="The listing this job checks a photo of, if any.")
    decision: DecisionPublic | None
    review: ReviewItemPublic | None = Field(default=None, description="The human review, for `review` decisions.")
    hashes: JobHashes | None = Field(default=None, description="The image's hashes, once known.")
    erased_at: Timestamp | None = Field(
        default=None, description="When the image and content were erased; the decision's action and scores stay."
    )
    # Only the answer of an erasure carries it; a job read otherwise has no such key (not even null).
    kept: dict[str, str] | None = Field(
        default=None,
        description='In the answer of an erasure only: what of the job was kept, and why (`{"hashes": "in bank '
        'known_bad"}`); empty when nothing was.',
        exclude_if=lambda kept: kept is None,
    )
    # Only a listing's photos carry it; a job read on its own has no such key (not even null).
    index: int | None = Field(
        default=None,
        description="In a listing's `photos` only: the photo's position, from 1.",
        exclude_if=lambda index: index is None,
    )

    @classmethod
    def from_row(
        cls,
        job: Job,
        decision: Decision | None,
        review: ReviewItem | None = None,
        *,
        index: int | None = None,
        kept: Mapping[str, str] | None = None,
    ) -> JobPublic:
        return _from_row(
            cls,
            job,
            error=JobError(code=job.error_code, message=job.error_message) if job.error_code else None,
            listing=JobListing(id=job.listing_id, index=job.listing_index or 0) if job.listing_id else None,
            decision=DecisionPublic.from_row(decision) if decision is not None else None,
            review=ReviewItemPublic.from_row(review) if review is not None else None,
            hashes=(
                JobHashes(sha256=job.image_sha256, pdq=job.pdq, pdq_quality=job.pdq_quality)
                if job.image_sha256
                else None
            ),
            index=index,
            kept=None if kept is None else dict(kept),
        )


class DecisionPage(PublicModel):
    data: list[DecisionPublic]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null on the last page.")


class ReviewQueueEntry(ReviewItemPublic):
    decision: DecisionPublic

    @classmethod
    def from_rows(cls, item: ReviewItem, decision: Decision, *, now: datetime | None = None) -> ReviewQueueEntry:
        return cls(**dict(ReviewItemPublic.from_row(item, now=now)), decision=DecisionPublic.from_row(decision))


class ReviewQueuePage(PublicModel):
    data: list[ReviewQueueEntry]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null on the last page.")


# --- listings ----------------------------------------------------------------------------------------------------


class ListingCategoryVerdict(PublicModel):
    action: Action
    photos: list[int] = Field(description="The photos (from 1) on which the category fired.")


class ListingPhotoCounts(PublicModel):
    total: int
    decided: int
    failed: int


class ListingVerdict(OpenModel):
    status: str = Field(description="pending (some photo not final), done, or failed (no photo could be checked).")
    action: str | None = Field(description="allow, review or block once every photo is final.")
    matches_description: bool | None = Field(description="Whether some photo matches the title and description.")
    findings: list[str] = Field(description='Sentences: "photo 3 shows a different colour: blue, ...".')
    categories: dict[str, ListingCategoryVerdict] = Field(description="Per category: its listing-level action.")
    tags: list[dict[str, Any]] = Field(description="The photos' tags merged, each with the photo that scored best.")
    photos: ListingPhotoCounts


class ListingPublic(OpenModel):
    """A listing, its verdict and its photos (each a job, as `GET /v1/jobs/{id}` shows it, with `index` from 1)."""

    id: str
    policy: str
    policy_version: str | None
    title: str | None
    description: str | None
    attributes: dict[str, Any]
    created_at: Timestamp
    verdict: ListingVerdict
    photos: list[JobPublic]

    @staticmethod
    def photos_of(rows: Sequence[tuple[Job, Decision | None]]) -> list[JobPublic]:
        """The listing's photos in order: each job as `GET /v1/jobs/{id}` shows it, numbered from 1."""
        return [JobPublic.from_row(job, decision, index=(job.listing_index or 0) + 1) for job, decision in rows]

    @classmethod
    def from_photos(cls, listing: Listing, photos: list[JobPublic], verdict: Mapping[str, Any]) -> ListingPublic:
        """The listing body, given its photos and the verdict the domain read from them (policies.listing)."""
        return _from_row(cls, listing, verdict=verdict, photos=photos)


# --- policies, shadows, audit ----------------------------------------------------------------------------------


class PolicySummary(PublicModel):
    name: str
    description: str
    version: str = Field(description="Hash of the policy's normalised content; every decision records it.")
    categories: list[str]


class PolicyReloadError(PublicModel):
    code: str
    message: str = Field(description="file:line:col: what is wrong, one line per problem.")
    at: Timestamp


class PolicyList(PublicModel):
    data: list[PolicySummary]
    reload_error: PolicyReloadError | None = Field(
        default=None,
        description="The policy files changed but could not be loaded: the versions listed stay in use until fixed.",
    )


class ShadowSummary(OpenModel):
    shadow: str
    version: str = Field(description="The shadow policy's version; each version is summarised on its own.")
    compared: int = Field(description="Jobs on which both the active policy and this shadow decided.")
    agreed: int
    agreement: float | None = Field(description="agreed / compared (null when nothing was compared).")
    errors: int = Field(description="Jobs the shadow could not decide (a context field it needs, say).")
    confusion: dict[str, dict[str, int]] = Field(description="Counts by active action, then shadow action.")
    first_at: str | None
    last_at: str | None


class ShadowReport(PublicModel):
    policy: str
    version: str = Field(description="The active policy's current version.")
    shadows: list[str] = Field(description="The policies loaded now that shadow this one.")
    data: list[ShadowSummary]


class KeyPublic(PublicModel):
    """An API key as `modtag keys` lists it and the audit log records it: never the secret or its hash."""

    id: str
    prefix: str = Field(description="The key's non-secret start (`mtk_<12 hex>`), to tell keys apart.")
    name: str
    role: str
    tenant: str
    created_at: Timestamp
    last_used_at: Timestamp | None
    revoked_at: Timestamp | None

    @classmethod
    def from_row(cls, row: ApiKey) -> KeyPublic:
        return _from_row(cls, row)


class AuditActor(PublicModel):
    key_id: str | None
    name: str
    role: str | None


class AuditTarget(PublicModel):
    type: str
    id: str


class AuditEntryPublic(PublicModel):
    id: int
    at: Timestamp
    actor: AuditActor
    action: str = Field(
        description="review.enqueued, review.claimed, review.released, review.resolved, review.reopened, key.created..."
    )
    target: AuditTarget
    before: dict[str, Any] | None
    after: dict[str, Any] | None

    @classmethod
    def from_row(cls, entry: AuditEntry) -> AuditEntryPublic:
        return _from_row(
            cls,
            entry,
            actor=AuditActor(key_id=entry.actor_key_id, name=entry.actor_name, role=entry.actor_role),
            target=AuditTarget(type=entry.target_type, id=entry.target_id),
        )


class AuditPage(PublicModel):
    data: list[AuditEntryPublic]
    next_cursor: str | None


# --- banks -------------------------------------------------------------------------------------------------------


class BankPublic(PublicModel):
    """A tenant's hash bank and how many items it holds."""

    name: str
    description: str | None
    items: int
    created_at: Timestamp

    @classmethod
    def from_row(cls, bank: Bank, items: int) -> BankPublic:
        return _from_row(cls, bank, items=items)


class BankList(PublicModel):
    data: list[BankPublic]


class BankItemPublic(PublicModel):
    """One known image of a bank: its SHA-256 and/or PDQ hash."""

    id: str
    bank: str
    sha256: str | None
    pdq: str | None
    pdq_quality: int | None
    note: str | None
    added_by: str | None = Field(description="The API key that added it.")
    created_at: Timestamp

    @classmethod
    def from_row(cls, item: BankItem, bank: str) -> BankItemPublic:
        return _from_row(cls, item, bank=bank)


class BankImport(PublicModel):
    """What an import of hashes added, and how many it skipped because the bank already held their hash."""

    bank: str
    added: int
    skipped: int = 0


# --- helpers -----------------------------------------------------------------------------------------------------
class WebhookSecretPublic(PublicModel):
    """The tenant's webhook signing secret (Standard Webhooks: verify `webhook-signature` with it)."""

    secret: str = Field(description="`whsec_` + base64 of the HMAC-SHA256 key.")
    created_at: Timestamp
    previous_valid_until: Timestamp | None = Field(
        description="After a rotation: until when the previous secret still signs beside this one."
    )

    @classmethod
    def from_row(cls, row: WebhookSecret, previous_valid_until: datetime | None = None) -> WebhookSecretPublic:
        return _from_row(cls, row, previous_valid_until=previous_valid_until)


class WebhookDeliveryPublic(PublicModel):
    """One webhook message and how its delivery went; `id` is the `webhook-id` every attempt carried."""

    id: str
    event_type: Literal["job.completed", "listing.completed"]
    subject_id: str = Field(description="The job's or listing's id.")
    url: str
    status: Literal["pending", "delivered", "failed", "dropped"] = Field(
        description="`dropped`: its job or listing was erased before it was delivered (its body is gone too)."
    )
    attempts: int
    next_attempt_at: Timestamp | None
    last_status_code: int | None
    last_error: str | None
    created_at: Timestamp
    delivered_at: Timestamp | None

    @classmethod
    def from_row(cls, row: WebhookDelivery) -> WebhookDeliveryPublic:
        return _from_row(cls, row)


class WebhookDeliveryPage(PublicModel):
    data: list[WebhookDeliveryPublic]
    next_cursor: str | None = Field(description="Pass as `before` for the next, older page.")


def _from_row(shape: type[Shape], row: SQLModel, **given: Any) -> Shape:
    """`shape` with each field the row has a column of that name for read from it, the others `given`; validated,
    so a value the shape does not allow (an unknown status, an undeclared key) fails here, not in a client."""
    columns = {name: getattr(row, name) for name in shape.model_fields if name not in given and hasattr(row, name)}
    return shape.model_validate({**columns, **given})
