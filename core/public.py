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

from collections.abc import Callable, Mapping, Sequence
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


class FramePublic(PublicModel):
    """One judged frame of a video."""

    time_s: float = Field(description="Seconds from the start of the video.")
    action: Action
    scores: dict[str, float] = Field(description="The frame's highest category scores (at most 3).")
    pdq: str | None = Field(default=None, description="The frame's PDQ hash (64 hex digits), as banks match it.")


class SegmentPublic(PublicModel):
    """A stretch of a video over which a category fired on consecutive judged frames."""

    category: str
    start_s: float
    end_s: float = Field(description="Where the next judged frame begins, or the end of the video.")
    max_score: float


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
    # Only a video's decision carries them; an image's has no such keys (not even null).
    frames: list[FramePublic] | None = Field(
        default=None,
        description="A video's judged frames in time order: each one's time, action and top category scores.",
        exclude_if=lambda frames: frames is None,
    )
    segments: list[SegmentPublic] | None = Field(
        default=None,
        description="Where a category fired over consecutive judged frames of a video (seconds from the start).",
        exclude_if=lambda segments: segments is None,
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
    labels: dict[str, bool] | None = Field(
        default=None,
        description="Per category, whether it applies (given, or from the action: block = the fired categories, "
        "allow = none); what calibration learns from. Null for resolutions from before labels.",
    )


class ReviewItemPublic(OpenModel):
    """A `review` decision in the human queue; the machine decision itself is never changed."""

    job_id: str
    decision_id: str
    policy: str
    category: str | None = Field(description="The highest-scoring flagged category (audit items: any category).")
    score: float
    kind: Literal["review", "audit"] = Field(
        default="review",
        description="`review`: the policy said review. `audit`: an automatic allow or block sampled at the "
        "policy's `audit_rate`, to measure how often automatic decisions are right.",
    )
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
                ReviewResolution(
                    action=item.resolution, reason=item.reason, by=resolver, at=item.resolved_at, labels=item.labels
                )
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
    priority: Literal["interactive", "bulk"] = Field(
        default="interactive", description="`bulk` jobs wait while any `interactive` one waits (their own queue)."
    )
    media: Literal["image", "video"] = Field(
        default="image",
        description="`video` for an MP4, MOV or WebM file and for an animated GIF, WebP or PNG: judged on its frames.",
    )
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

    @classmethod
    def from_rows(
        cls,
        listing: Listing,
        rows: Sequence[tuple[Job, Decision | None]],
        verdict: Callable[[Sequence[JobPublic]], Mapping[str, Any]],
    ) -> ListingPublic:
        """The listing body (`GET /v1/listings/{id}`, and the listing's callback) from its rows, with the verdict
        `verdict` reads from its photos (`policies.listing.photos_verdict`, passed in: core never imports policies)."""
        photos = cls.photos_of(rows)
        return cls.from_photos(listing, photos, verdict(photos))


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


# --- labels and calibration ---------------------------------------------------------------------------------------


class CurvePoint(PublicModel):
    """One threshold on a category's precision-recall curve: what acting at `score >= threshold` would have done."""

    threshold: float
    precision: float = Field(description="Of the labelled jobs at or above the threshold, the share labelled true.")
    recall: float = Field(description="Of the jobs labelled true, the share at or above the threshold.")


class Thresholds(PublicModel):
    review: float | None
    block: float | None


class CalibrationTarget(PublicModel):
    block_precision: float
    review_recall: float


class MeasuredPrecision(PublicModel):
    """How often people agreed with one automatic action, over the audit sample, with a 95% Wilson interval."""

    sampled: int = Field(description="Audit items of this automatic action that people resolved.")
    agreed: int = Field(description="Of those, resolved with the same action.")
    precision: float | None = Field(description="agreed / sampled (null when nothing was sampled).")
    low: float | None = Field(description="The 95% Wilson interval's lower end.")
    high: float | None = Field(description="The 95% Wilson interval's upper end.")


class CalibrationPublic(PublicModel):
    """A category's thresholds measured against the tenant's review labels (`GET /v1/calibration`)."""

    policy: str
    category: str
    since: Timestamp
    labelled: int = Field(description="Resolved jobs with a label for this category.")
    positives: int = Field(description="Of those, labelled true (the category applies).")
    points: list[CurvePoint] = Field(
        description="One per distinct labelled score, lowest threshold first; past 500, thinned evenly (keeping both "
        "ends and the current and suggested thresholds)."
    )
    current: Thresholds = Field(description="The category's thresholds in the loaded policy.")
    suggested: Thresholds = Field(
        description="`block`: the lowest threshold whose precision meets `target.block_precision`; `review`: the "
        "highest whose recall meets `target.review_recall` (never above `block`); null when no threshold does."
    )
    target: CalibrationTarget
    audit: dict[Literal["allow", "block"], MeasuredPrecision] = Field(
        description="The policy's automatic allows and blocks as people judged their audit sample."
    )


class LabelledJobPublic(PublicModel):
    """A resolved review item with its labels, as `GET /v1/labels` exports it (for training elsewhere)."""

    job_id: str
    policy: str
    policy_version: str
    kind: Literal["review", "audit"]
    decision: Literal["allow", "review", "block"] = Field(description="The machine's action.")
    scores: dict[str, float] = Field(description="The machine's score per category.")
    resolution: Literal["allow", "block"]
    labels: dict[str, bool]
    reviewer: ReviewActor
    labelled_at: Timestamp
    image: JobHashes | None = Field(description="The image's hashes; its bytes: GET /v1/labels/{job_id}/image.")
    image_format: str | None
    source: Literal["upload", "url"]


class LabelledJobPage(PublicModel):
    data: list[LabelledJobPublic]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null on the last page.")


# --- banks -------------------------------------------------------------------------------------------------------


class BankPublic(PublicModel):
    """A tenant's hash bank and how many items it holds."""

    name: str
    description: str | None
    kind: str  # `block`, or `allow`: an allow-list whose matches suppress the block banks'
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
    unsupported: dict[str, int] = {}  # signals of types modtag does not match (HMA's video_md5...), by type


class BankMatchPublic(PublicModel):
    """One bank holding a looked-up hash (`GET /v1/lookup`): its closest item and how far it is."""

    bank: str
    kind: str
    content_id: str  # the bank item's id (HMA calls a banked entry's id `content_id`)
    signal_type: str  # how it matched: `pdq` or `sha256`
    distance: int  # PDQ Hamming distance in bits; 0 for an exact SHA-256 match
    allowed_by: str | None  # a block match suppressed by this allow-list item ("bank/item")


class LookupResult(PublicModel):
    """`GET /v1/lookup`: the tenant's banks holding the hash, by bank name (HMA's `raw_lookup` shape)."""

    matches: list[BankMatchPublic]


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
    event_type: Literal["job.decided", "job.failed", "listing.decided", "review.resolved"] = Field(
        description="The body's `type` (the Standard Webhooks envelope)."
    )
    subject_id: str = Field(description="The job's or listing's id.")
    url: str
    status: Literal["pending", "delivered", "failed", "dropped"] = Field(
        description="`dropped`: its job or listing was erased before it was delivered (its body is gone too)."
    )
    attempts: int = Field(description="Attempts since it was recorded, or since its last redelivery.")
    redeliveries: int = Field(description="How many times an admin sent it again.")
    redelivered_at: Timestamp | None
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


class QuotaLimits(PublicModel):
    """A tenant's submission limits (photos; null: unlimited). A burst left null follows its rate (at least 1)."""

    rate: float | None = Field(description="Submissions per second in the interactive lane.")
    burst: int | None = Field(description="How many the interactive lane takes at once above the rate.")
    bulk_rate: float | None = Field(description="Submissions per second in the bulk lane (its own budget).")
    bulk_burst: int | None
    daily_cap: int | None = Field(description="Submissions per UTC day, both lanes together.")


class QuotaPublic(PublicModel):
    """A tenant's quota: the override an admin set (only its fields; null: unlimited) and the limits in force."""

    tenant: str
    override: dict[str, float | int | None] | None = Field(
        description="The fields an admin set; a field left out follows the MODTAG_TENANT_* setting. Null: none."
    )
    limits: QuotaLimits = Field(description="What applies: the settings with the override above them.")
    updated_at: Timestamp | None
    updated_by: str | None


class QuotaPage(PublicModel):
    defaults: QuotaLimits = Field(description="The MODTAG_TENANT_* settings, for tenants without an override.")
    data: list[QuotaPublic]


# --- example sets and similar images ------------------------------------------------------------------------


class ExampleSetPublic(PublicModel):
    """A tenant's example set: its items by label, and how many still wait for their embedding (`pending`)."""

    name: str
    description: str | None
    positive: int
    negative: int
    pending: int = Field(description="Items whose image no worker has embedded yet: they do not vote until then.")
    created_at: Timestamp

    @classmethod
    def from_row(cls, example_set: Any, counts: Any) -> ExampleSetPublic:
        return _from_row(cls, example_set, positive=counts.positive, negative=counts.negative, pending=counts.pending)


class ExampleSetList(PublicModel):
    data: list[ExampleSetPublic]


class ExampleItemPublic(PublicModel):
    """One job's image in an example set, with its label; `embedded` once a worker stored its embedding."""

    set: str
    job_id: str
    label: Literal["positive", "negative"]
    embedded: bool
    added_by: str | None = Field(description="The API key that added it.")
    created_at: Timestamp

    @classmethod
    def from_row(cls, item: Any, set_name: str, embedded: bool) -> ExampleItemPublic:
        return _from_row(cls, item, set=set_name, embedded=embedded)


class ExampleItemList(PublicModel):
    data: list[ExampleItemPublic]
    next_cursor: str | None = Field(description="Pass as `after` for the next page; null on the last one.")


class SimilarJob(PublicModel):
    """A job of the tenant whose image is near the asked one: cosine similarity of the image embeddings."""

    job_id: str
    similarity: float
    action: Action | None = Field(description="Its machine decision's action, when it has one.")
    created_at: Timestamp


class SimilarJobs(PublicModel):
    job_id: str
    data: list[SimilarJob]


def _from_row(shape: type[Shape], row: SQLModel, **given: Any) -> Shape:
    """`shape` with each field the row has a column of that name for read from it, the others `given`; validated,
    so a value the shape does not allow (an unknown status, an undeclared key) fails here, not in a client."""
    columns = {name: getattr(row, name) for name in shape.model_fields if name not in given and hasattr(row, name)}
    return shape.model_validate({**columns, **given})
