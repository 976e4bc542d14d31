"""Database tables: jobs, their decisions, and one row per decision category for filtering."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import JSON, Column, DateTime, Index, UniqueConstraint
from sqlmodel import Field, SQLModel


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id() -> str:
    return uuid.uuid4().hex


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


class Job(SQLModel, table=True):
    """One image to judge against one policy. The task carries only `id`."""

    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("tenant", "idempotency_key", name="uq_jobs_tenant_idempotency_key"),
        Index("ix_jobs_status_updated_at", "status", "updated_at"),
    )

    id: str = Field(default_factory=new_id, primary_key=True, max_length=32)
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
    context: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    callback_url: str | None = Field(default=None, max_length=2048)
    idempotency_key: str | None = Field(default=None, max_length=255)
    attempts: int = 0
    error_code: str | None = Field(default=None, max_length=64)
    error_message: str | None = Field(default=None, max_length=2000)
    worker: str | None = Field(default=None, max_length=255)
    created_at: datetime = Field(default_factory=utcnow, sa_column=Column(DateTime(timezone=True), nullable=False))
    updated_at: datetime = Field(default_factory=utcnow, sa_column=Column(DateTime(timezone=True), nullable=False))
    started_at: datetime | None = Field(default=None, sa_column=Column(DateTime(timezone=True)))
    finished_at: datetime | None = Field(default=None, sa_column=Column(DateTime(timezone=True)))


class Decision(SQLModel, table=True):
    """The machine's decision for a job, with the evidence of every check. One per job."""

    __tablename__ = "decisions"
    __table_args__ = (Index("ix_decisions_decided_at_id", "decided_at", "id"),)

    id: str = Field(default_factory=new_id, primary_key=True, max_length=32)
    job_id: str = Field(foreign_key="jobs.id", unique=True, max_length=32)
    tenant: str = Field(default="default", max_length=64, index=True)
    action: str = Field(max_length=16, index=True)
    policy: str = Field(max_length=64, index=True)
    policy_version: str = Field(max_length=64)
    caption: str | None = Field(default=None, max_length=2000)
    categories: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    evidence: list[dict[str, Any]] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    tags: list[dict[str, Any]] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    models: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    duration_ms: float = 0.0
    decided_at: datetime = Field(default_factory=utcnow, sa_column=Column(DateTime(timezone=True), nullable=False))


class DecisionCategory(SQLModel, table=True):
    """One row per (decision, category): lets the API and dashboards filter by category in SQL."""

    __tablename__ = "decision_categories"
    __table_args__ = (Index("ix_decision_categories_category_fired", "category", "fired"),)

    decision_id: str = Field(foreign_key="decisions.id", primary_key=True, max_length=32)
    category: str = Field(primary_key=True, max_length=64)
    score: float
    action: str = Field(max_length=16)
    fired: bool
