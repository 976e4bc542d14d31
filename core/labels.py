"""The tenant's labelled jobs (resolved review items with per-category labels), for export and training elsewhere.

Erased jobs are never exported: their images and content are gone, and the person asked for them to be.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from sqlalchemy import and_, or_
from sqlmodel import Session, col, select

from core.errors import BadRequest, NotFound
from core.public import JobHashes, LabelledJobPublic, ReviewActor
from core.review import effective_labels
from core.tables import ID_PATTERN, Decision, Job, ReviewItem, ReviewState, as_utc, iso


def labelled_jobs(
    session: Session,
    *,
    tenant: str,
    since: datetime,
    policy: str | None = None,
    limit: int = 100,
    cursor: str | None = None,
) -> tuple[list[LabelledJobPublic], str | None]:
    """The tenant's resolved, unerased jobs labelled since `since`, oldest resolution first; keyset paging."""
    resolved, job = col(ReviewItem.resolved_at), col(ReviewItem.job_id)
    query = (
        select(ReviewItem, Decision, Job)
        .join(Decision, col(Decision.id) == col(ReviewItem.decision_id))
        .join(Job, col(Job.id) == col(ReviewItem.job_id))
        .where(
            ReviewItem.tenant == tenant,
            ReviewItem.state == ReviewState.RESOLVED,
            resolved >= since,
            col(Job.erased_at).is_(None),
        )
    )
    if policy:
        query = query.where(ReviewItem.policy == policy)
    if cursor:
        at, after = _decode_cursor(cursor)
        query = query.where(or_(resolved > at, and_(resolved == at, job > after)))
    rows = list(session.exec(query.order_by(resolved.asc(), job.asc()).limit(limit + 1)).all())
    next_cursor = _encode_cursor(rows[limit - 1][0]) if len(rows) > limit else None
    return [labelled_job(item, decision, row) for item, decision, row in rows[:limit]], next_cursor


def labelled_job(item: ReviewItem, decision: Decision, job: Job) -> LabelledJobPublic:
    return LabelledJobPublic(
        job_id=job.id,
        policy=decision.policy,
        policy_version=decision.policy_version,
        kind=item.kind,  # type: ignore[arg-type]
        decision=decision.action,  # type: ignore[arg-type]
        scores={name: float(result["score"]) for name, result in decision.categories.items()},
        resolution=item.resolution,  # type: ignore[arg-type]
        labels=labels_of(item, decision.categories),
        reviewer=ReviewActor(id=item.resolved_by, name=item.resolved_by_name),
        labelled_at=iso(item.resolved_at),  # type: ignore[arg-type]
        image=(
            JobHashes(sha256=job.image_sha256, pdq=job.pdq, pdq_quality=job.pdq_quality) if job.image_sha256 else None
        ),
        image_format=job.image_format,
        source=job.source,  # type: ignore[arg-type]
    )


def labels_of(item: ReviewItem, categories: Mapping[str, Mapping[str, Any]]) -> dict[str, bool]:
    """The item's labels; a resolution from before labels were stored reads as its action says (effective_labels)."""
    if isinstance(item.labels, dict):
        return {str(name): bool(value) for name, value in item.labels.items()}
    return effective_labels(categories, "block" if item.resolution == "block" else "allow", None)


def exportable_job(session: Session, job_id: str, tenant: str) -> Job:
    """A labelled job of the tenant whose image may be exported: 404 unless resolved, stored and not erased."""
    job = session.get(Job, job_id) if ID_PATTERN.match(job_id) else None
    item = session.get(ReviewItem, job_id) if job is not None else None
    if job is None or job.tenant != tenant or item is None or item.state != ReviewState.RESOLVED:
        raise NotFound(f"no labelled job with id {job_id[:64]!r}", code="job_not_found")
    if job.erased_at is not None:
        raise NotFound("this job was erased: its image is never exported", code="job_erased")
    if not job.blob_key:
        raise NotFound("this job's image was given as a URL and is not stored", code="image_not_stored")
    return job


def _encode_cursor(item: ReviewItem) -> str:
    position = {"t": iso(item.resolved_at), "j": item.job_id}
    return base64.urlsafe_b64encode(json.dumps(position, separators=(",", ":")).encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        if not isinstance(raw, dict) or not ID_PATTERN.match(str(raw.get("j"))):
            raise ValueError("not a labels cursor")
        return as_utc(datetime.fromisoformat(str(raw["t"]))), str(raw["j"])
    except (ValueError, KeyError, TypeError, binascii.Error, UnicodeDecodeError):
        raise BadRequest("cursor is not one this API returned", code="invalid_cursor") from None
