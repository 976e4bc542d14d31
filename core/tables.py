"""Database tables: jobs and decisions (with categories, shadow decisions, listings); API keys, review, audit log;
hash banks."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import JSON, BigInteger, Column, DateTime, Index, Integer, Text, UniqueConstraint
from sqlmodel import Field, SQLModel

from core.vectors import EmbeddingVector


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(moment: datetime) -> datetime:
    """The moment in UTC. A naive one is taken as UTC: SQLite hands back naive datetimes, every one written in UTC,
    and the API reads naive query times as UTC."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def iso(moment: datetime | None) -> str | None:
    return None if moment is None else as_utc(moment).isoformat()


def new_id() -> str:
    return uuid.uuid4().hex


# What an id may look like (new_id's hex, with room for ids made elsewhere). Ids are checked against it before a
# query, so bytes PostgreSQL refuses (NUL) make an unknown id, never a database error.
ID_PATTERN = re.compile(r"^[0-9A-Za-z_-]{1,64}$")


# Column factories for what many tables share. Each call makes a new Column: SQLAlchemy binds a Column to one table.
def _id_field() -> Any:
    return Field(default_factory=new_id, primary_key=True, max_length=32)


def _now_field() -> Any:
    """A timestamp (with time zone), now when the row is made, never null."""
    return Field(default_factory=utcnow, sa_column=Column(DateTime(timezone=True), nullable=False))


def _moment_field() -> Any:
    """A timestamp (with time zone) that stays null until the moment happens."""
    return Field(default=None, sa_column=Column(DateTime(timezone=True)))


def _json_field(empty: type[dict[str, Any]] | type[list[Any]]) -> Any:
    """A JSON document that is never null: `empty` (dict or list) until one is written."""
    return Field(default_factory=empty, sa_column=Column(JSON, nullable=False))


def _idempotency_key_unique(table: str) -> UniqueConstraint:
    """One record per (tenant, Idempotency-Key): a retried submission finds the first one."""
    return UniqueConstraint("tenant", "idempotency_key", name=f"uq_{table}_tenant_idempotency_key")


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


# A job in one of these states never changes again (a redelivered task finds nothing to do).
FINAL_STATUSES = frozenset({JobStatus.DONE, JobStatus.FAILED})


class Job(SQLModel, table=True):
    """One image to judge against one policy. The task carries only `id`."""

    __tablename__ = "jobs"
    __table_args__ = (
        _idempotency_key_unique("jobs"),
        Index("ix_jobs_status_updated_at", "status", "updated_at"),
        Index("ix_jobs_status_enqueued_at", "status", "enqueued_at"),  # the outbox sweep (core/reconcile.py)
        Index("ix_jobs_tenant_image_sha256", "tenant", "image_sha256"),  # decision reuse, blob sharing
    )

    id: str = _id_field()
    tenant: str = Field(default="default", max_length=64, index=True)
    status: str = Field(default=JobStatus.QUEUED, max_length=16)
    policy: str = Field(max_length=64)
    policy_version: str | None = Field(default=None, max_length=64)
    source: str = Field(max_length=8)  # "upload" or "url"
    image_url: str | None = Field(default=None, max_length=2048)
    blob_key: str | None = Field(default=None, max_length=128)
    image_sha256: str | None = Field(default=None, max_length=64)
    image_bytes: int | None = None
    image_width: int | None = None
    image_height: int | None = None
    image_format: str | None = Field(default=None, max_length=16)
    pdq: str | None = Field(default=None, max_length=64)  # set by the worker with image_sha256 (core/hashes.py)
    pdq_quality: int | None = None
    context: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    callback_url: str | None = Field(default=None, max_length=2048)
    idempotency_key: str | None = Field(default=None, max_length=255)
    attempts: int = 0
    error_code: str | None = Field(default=None, max_length=64)
    error_message: str | None = Field(default=None, max_length=2000)
    worker: str | None = Field(default=None, max_length=255)
    submitted_by: str | None = Field(default=None, max_length=32)  # the API key's id; None for unauthenticated
    listing_id: str | None = Field(default=None, max_length=32, index=True)  # listings.id (no FK: see 0003)
    listing_index: int | None = None  # the photo's 0-based position in its listing
    request_id: str | None = Field(default=None, max_length=128)  # the submitting request's X-Request-ID (logs)
    created_at: datetime = _now_field()
    updated_at: datetime = _now_field()
    started_at: datetime | None = _moment_field()
    finished_at: datetime | None = _moment_field()
    # When the job's task last reached the broker; null while it never did (a crash or a broker outage between the
    # commit and the enqueue): the reconciler's outbox sweep enqueues such jobs within seconds (core/reconcile.py).
    enqueued_at: datetime | None = _moment_field()
    # Set when the image and content were erased (core/erasure.py); the row stays as a tombstone for statistics.
    erased_at: datetime | None = _moment_field()
    # What the blob is: "image" (one picture) or "video" (a clip or an animation, decided on its sampled frames).
    media: str = Field(default="image", max_length=8, sa_column_kwargs={"server_default": "image"})
    # `interactive` or `bulk` (core.queues.Priority): which queue its task goes to.
    priority: str = Field(default="interactive", max_length=16, sa_column_kwargs={"server_default": "interactive"})


class Decision(SQLModel, table=True):
    """The machine's decision for a job, with the evidence of every check. One per job."""

    __tablename__ = "decisions"
    __table_args__ = (Index("ix_decisions_decided_at_id", "decided_at", "id"),)

    id: str = _id_field()
    job_id: str = Field(foreign_key="jobs.id", unique=True, max_length=32)
    tenant: str = Field(default="default", max_length=64, index=True)
    action: str = Field(max_length=16, index=True)
    policy: str = Field(max_length=64, index=True)
    policy_version: str = Field(max_length=64)
    caption: str | None = Field(default=None, max_length=2000)
    # The lines OCR read, when a check read text: [{text, score, box: [x0, y0, x1, y1]}] in image pixels.
    text: list[dict[str, Any]] | None = Field(default=None, sa_column=Column(JSON))
    categories: dict[str, Any] = _json_field(dict)
    evidence: list[dict[str, Any]] = _json_field(list)
    tags: list[dict[str, Any]] = _json_field(list)
    models: dict[str, Any] = _json_field(dict)
    duration_ms: float = 0.0
    decided_at: datetime = _now_field()
    reason: str | None = Field(default=None, max_length=2000)  # which category and check decided, as a sentence
    # Claims of the job's context the photo contradicts (listing policies): [{category, field, claimed, seen, score}].
    contradictions: list[dict[str, Any]] | None = Field(default=None, sa_column=Column(JSON))
    reused_from: str | None = Field(default=None, max_length=32)  # the earlier job whose decision this one copies
    # A video's judged frames [{time_s, action, scores: {category: score}}] and the runs of consecutive frames where a
    # category fired [{category, start_s, end_s, max_score}]; null for an image.
    frames: list[dict[str, Any]] | None = Field(default=None, sa_column=Column(JSON))
    segments: list[dict[str, Any]] | None = Field(default=None, sa_column=Column(JSON))
    filmstrip_key: str | None = Field(default=None, max_length=64)  # the blob of the video's filmstrip JPEG


class DecisionCategory(SQLModel, table=True):
    """One row per (decision, category): lets the API and dashboards filter by category in SQL."""

    __tablename__ = "decision_categories"
    __table_args__ = (Index("ix_decision_categories_category_fired", "category", "fired"),)

    decision_id: str = Field(foreign_key="decisions.id", primary_key=True, max_length=32)
    category: str = Field(primary_key=True, max_length=64)
    score: float
    action: str = Field(max_length=16)
    fired: bool


class Role(StrEnum):
    """What an API key may do (core/principals.py maps each role to its permissions)."""

    SUBMIT = "submit"
    REVIEW = "review"
    ADMIN = "admin"


class ApiKey(SQLModel, table=True):
    """An API key: only its SHA-256 is stored; `prefix` is the non-secret part shown in listings."""

    __tablename__ = "api_keys"

    id: str = _id_field()
    key_hash: str = Field(max_length=64, unique=True)
    prefix: str = Field(max_length=32)
    name: str = Field(max_length=128)
    role: str = Field(max_length=16)
    tenant: str = Field(max_length=64, index=True)
    created_at: datetime = _now_field()
    last_used_at: datetime | None = _moment_field()
    revoked_at: datetime | None = _moment_field()


class DashboardSession(SQLModel, table=True):
    """A signed-in browser: the cookie holds a random token whose SHA-256 is `id`; revoking the key ends it."""

    __tablename__ = "dashboard_sessions"

    id: str = Field(primary_key=True, max_length=64)
    key_id: str = Field(foreign_key="api_keys.id", max_length=32, index=True)
    csrf_token: str = Field(max_length=64)
    created_at: datetime = _now_field()
    expires_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))


class ReviewState(StrEnum):
    OPEN = "open"
    RESOLVED = "resolved"


class ReviewKind(StrEnum):
    REVIEW = "review"
    AUDIT = "audit"


class ReviewItem(SQLModel, table=True):
    """A `review` decision waiting for (or resolved by) a person. The machine decision is never changed."""

    __tablename__ = "review_items"
    __table_args__ = (
        Index("ix_review_items_tenant_state_queued_at", "tenant", "state", "queued_at"),
        Index("ix_review_items_tenant_state_score", "tenant", "state", "score"),
        Index("ix_review_items_tenant_policy_resolved_at", "tenant", "policy", "resolved_at"),  # calibration, export
    )

    job_id: str = Field(foreign_key="jobs.id", primary_key=True, max_length=32)
    decision_id: str = Field(foreign_key="decisions.id", unique=True, max_length=32)
    tenant: str = Field(max_length=64)
    policy: str = Field(max_length=64)
    category: str | None = Field(default=None, max_length=64)  # the highest-scoring flagged category
    score: float = 0.0
    state: str = Field(default=ReviewState.OPEN, max_length=16)
    queued_at: datetime = _now_field()
    claimed_by: str | None = Field(default=None, max_length=32)
    claimed_by_name: str | None = Field(default=None, max_length=128)
    claim_expires_at: datetime | None = _moment_field()
    resolution: str | None = Field(default=None, max_length=16)
    reason: str | None = Field(default=None, max_length=2000)
    resolved_by: str | None = Field(default=None, max_length=32)
    resolved_by_name: str | None = Field(default=None, max_length=128)
    resolved_at: datetime | None = _moment_field()
    reopen_count: int = 0
    # `review`: the policy said review. `audit`: an automatic allow or block sampled at the policy's `audit_rate`,
    # so the precision of automatic decisions is measured (core/review.py audit_sampled).
    kind: str = Field(default=ReviewKind.REVIEW, max_length=16, sa_column_kwargs={"server_default": "review"})
    # The resolution's per-category labels {category: true|false} (core/review.py effective_labels); null while open.
    labels: dict[str, bool] | None = Field(default=None, sa_column=Column(JSON))


class AuditEntry(SQLModel, table=True):
    """One change, who made it and when, with the record before and after. Append-only."""

    __tablename__ = "audit_log"
    __table_args__ = (
        Index("ix_audit_log_tenant_id", "tenant", "id"),
        Index("ix_audit_log_target", "target_type", "target_id"),
    )

    # BIGSERIAL on PostgreSQL; SQLite only auto-increments a column declared exactly INTEGER PRIMARY KEY.
    id: int | None = Field(
        default=None,
        sa_column=Column(BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True),
    )
    at: datetime = _now_field()
    tenant: str = Field(max_length=64)
    actor_key_id: str | None = Field(default=None, max_length=32)
    actor_name: str = Field(max_length=128)
    actor_role: str | None = Field(default=None, max_length=16)
    action: str = Field(max_length=64)
    target_type: str = Field(max_length=32)
    target_id: str = Field(max_length=64)
    before: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    after: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))


class Listing(SQLModel, table=True):
    """A marketplace listing: its text and attributes, checked photo by photo (one job per photo)."""

    __tablename__ = "listings"
    __table_args__ = (
        _idempotency_key_unique("listings"),
        Index("ix_listings_tenant_created_at", "tenant", "created_at"),
    )

    id: str = _id_field()
    tenant: str = Field(default="default", max_length=64)
    policy: str = Field(max_length=64)
    policy_version: str | None = Field(default=None, max_length=64)
    title: str | None = Field(default=None, max_length=500)
    description: str | None = Field(default=None, sa_column=Column(Text))
    attributes: dict[str, Any] = _json_field(dict)
    image_count: int = 0
    idempotency_key: str | None = Field(default=None, max_length=255)
    submitted_by: str | None = Field(default=None, max_length=32)
    created_at: datetime = _now_field()
    callback_url: str | None = Field(default=None, max_length=2048)
    # Set by the one worker that claims the callback, in the transaction that writes its webhook delivery row (see
    # core.listings.listing_callback_due): one delivery, sent at least once.
    callback_sent_at: datetime | None = _moment_field()


class ShadowDecision(SQLModel, table=True):
    """What a shadow policy would have decided for a job, beside the active decision. Never acted on."""

    __tablename__ = "shadow_decisions"
    __table_args__ = (
        UniqueConstraint("job_id", "policy", name="uq_shadow_decisions_job_policy"),
        Index("ix_shadow_decisions_active_policy_decided_at", "active_policy", "decided_at"),
    )

    id: str = _id_field()
    job_id: str = Field(foreign_key="jobs.id", max_length=32, index=True)
    tenant: str = Field(default="default", max_length=64)
    policy: str = Field(max_length=64)  # the shadow policy
    policy_version: str = Field(max_length=64)
    active_policy: str = Field(max_length=64)
    active_version: str = Field(max_length=64)
    active_action: str = Field(max_length=16)
    action: str | None = Field(default=None, max_length=16)  # None when the shadow could not decide (error_code)
    categories: dict[str, Any] = _json_field(dict)
    evidence: list[dict[str, Any]] = _json_field(list)
    tags: list[dict[str, Any]] = _json_field(list)
    reason: str | None = Field(default=None, max_length=2000)
    error_code: str | None = Field(default=None, max_length=64)
    error_message: str | None = Field(default=None, max_length=2000)
    decided_at: datetime = _now_field()


class Bank(SQLModel, table=True):
    """A tenant's named list of known images (PDQ and SHA-256 hashes) that `hash` checks match against."""

    __tablename__ = "banks"
    __table_args__ = (UniqueConstraint("tenant", "name", name="uq_banks_tenant_name"),)

    id: str = _id_field()
    tenant: str = Field(max_length=64)
    name: str = Field(max_length=64)
    description: str | None = Field(default=None, max_length=2000)
    # `block`: a match is evidence against the image; `allow`: a match suppresses every block bank's (core/banks.py).
    kind: str = Field(default="block", max_length=8, sa_column_kwargs={"server_default": "block"})
    # Bumped by every change to the items: a worker rebuilds its index of the bank when it differs.
    revision: int = 0
    created_at: datetime = _now_field()


class BankItem(SQLModel, table=True):
    """One known image in a bank: its SHA-256, its PDQ hash (with quality when computed here), or both."""

    __tablename__ = "bank_items"
    __table_args__ = (Index("ix_bank_items_bank_id_sha256", "bank_id", "sha256"),)

    id: str = _id_field()
    bank_id: str = Field(foreign_key="banks.id", max_length=32, index=True)
    tenant: str = Field(max_length=64)
    sha256: str | None = Field(default=None, max_length=64)
    pdq: str | None = Field(default=None, max_length=64)
    pdq_quality: int | None = None
    note: str | None = Field(default=None, max_length=2000)
    added_by: str | None = Field(default=None, max_length=32)  # the API key's id
    created_at: datetime = _now_field()


class WebhookSecret(SQLModel, table=True):
    """A tenant's webhook signing secret (`whsec_` + base64). A rotated-out one keeps signing until `expires_at`."""

    __tablename__ = "webhook_secrets"

    id: str = _id_field()
    tenant: str = Field(max_length=64, index=True)
    secret: str = Field(max_length=128)
    created_at: datetime = _now_field()
    expires_at: datetime | None = _moment_field()


class WebhookDelivery(SQLModel, table=True):
    """One webhook message (an event about a job or listing) and its delivery: the same `id` (webhook-id) on every
    attempt and every redelivery."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        # `sequence` tells apart the repeats of one event type for one subject: a review resolved, reopened and
        # resolved again sends two `review.resolved` messages; every other event happens once (sequence 0).
        UniqueConstraint("event_type", "subject_id", "sequence", name="uq_webhook_deliveries_event_subject_sequence"),
        Index("ix_webhook_deliveries_status_next_attempt_at", "status", "next_attempt_at"),
        Index("ix_webhook_deliveries_tenant_created_at", "tenant", "created_at"),
    )

    id: str = Field(max_length=64, primary_key=True)  # msg_<hex>
    tenant: str = Field(max_length=64)
    event_type: str = Field(max_length=32)  # job.decided, job.failed, listing.decided, review.resolved
    subject_id: str = Field(max_length=32)  # the job's or listing's id
    sequence: int = 0
    url: str = Field(max_length=2048)
    # The exact bytes signed and sent: the Standard Webhooks envelope {type, timestamp, data} (core/events.py).
    payload: str = Field(sa_column=Column(Text, nullable=False))
    status: str = Field(default="pending", max_length=16)  # pending, delivered, failed, dropped
    attempts: int = 0  # since it was recorded, or since its last redelivery
    redeliveries: int = 0  # how many times an admin sent it again (POST /v1/webhooks/deliveries/{id}/redeliver)
    redelivered_at: datetime | None = _moment_field()
    next_attempt_at: datetime | None = _moment_field()
    last_status_code: int | None = None
    last_error: str | None = Field(default=None, max_length=500)
    created_at: datetime = _now_field()
    delivered_at: datetime | None = _moment_field()


class JobEmbedding(SQLModel, table=True):
    """A job's image embedding (BLIP's ITC image features, L2-normalised), stored by the worker with its decision.

    Comparable only with embeddings of the same `model` (the ITM weights); `dim` is the vector's length, so one
    table holds every model's vectors (core/embeddings.py).
    """

    __tablename__ = "job_embeddings"
    __table_args__ = (Index("ix_job_embeddings_tenant_model", "tenant", "model"),)

    job_id: str = Field(foreign_key="jobs.id", primary_key=True, max_length=32)
    tenant: str = Field(max_length=64)
    model: str = Field(max_length=255)
    dim: int
    vector: Any = Field(sa_column=Column(EmbeddingVector(), nullable=False))
    created_at: datetime = _now_field()


class ExampleSet(SQLModel, table=True):
    """A tenant's named set of labelled example images that `examples` checks vote with."""

    __tablename__ = "example_sets"
    __table_args__ = (UniqueConstraint("tenant", "name", name="uq_example_sets_tenant_name"),)

    id: str = _id_field()
    tenant: str = Field(max_length=64)
    name: str = Field(max_length=64)
    description: str | None = Field(default=None, max_length=2000)
    # Bumped by every change to the set (an item added, deleted, erased, or its embedding stored): workers reload it.
    revision: int = 0
    created_at: datetime = _now_field()


class ExampleItem(SQLModel, table=True):
    """One job's image in an example set, labelled positive or negative; its embedding is the job's."""

    __tablename__ = "example_items"
    __table_args__ = (UniqueConstraint("set_id", "job_id", name="uq_example_items_set_job"),)

    id: str = _id_field()
    set_id: str = Field(foreign_key="example_sets.id", max_length=32, index=True)
    job_id: str = Field(foreign_key="jobs.id", max_length=32, index=True)
    tenant: str = Field(max_length=64)
    label: str = Field(max_length=16)  # positive or negative
    added_by: str | None = Field(default=None, max_length=32)  # the API key's id
    created_at: datetime = _now_field()


class TenantQuota(SQLModel, table=True):
    """An admin's override of a tenant's submission quota (core/quotas.py). `limits` holds only the fields set:
    a number, or null for unlimited; a field left out follows the MODTAG_TENANT_* setting."""

    __tablename__ = "tenant_quotas"

    tenant: str = Field(primary_key=True, max_length=64)
    limits: dict[str, Any] = _json_field(dict)
    updated_at: datetime = _now_field()
    updated_by: str | None = Field(default=None, max_length=128)  # the admin's name
