"""Job and decision records: the one place that reads and writes them (API, worker, reconciler, CLI)."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy import ColumnElement, String, and_, case, exists, literal_column, or_, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, SQLModel, col, func, select

from core import review
from core.errors import BadRequest, NotFound
from core.tables import (
    FINAL_STATUSES,
    ID_PATTERN,
    Decision,
    DecisionCategory,
    Job,
    JobStatus,
    ReviewKind,
    ShadowDecision,
    utcnow,
)

Won = TypeVar("Won")

# A job erased while it ran ends `failed` with this code and sentence: no decision, nothing of its content.
ERASED = "erased"
ERASED_WHILE_RUNNING = "the job was erased while it ran: nothing was decided, and nothing of it was kept"
# What stays of a failed job's message once the job is erased (the message may quote its URL or context).
ERASED_MESSAGE = "the message was erased with the job's content"


@dataclass(frozen=True)
class NewJob:
    """What the API knows about a job at submission."""

    tenant: str
    policy: str
    policy_version: str | None
    source: str
    blob_key: str | None = None
    image_sha256: str | None = None
    image_bytes: int | None = None
    image_width: int | None = None
    image_height: int | None = None
    image_format: str | None = None
    media: str = "image"  # "video": a video file or an animated image, judged on its frames (core/video.py)
    image_url: str | None = None
    context: dict[str, Any] | None = None
    callback_url: str | None = None
    idempotency_key: str | None = None
    submitted_by: str | None = None  # the API key's id
    listing_id: str | None = None
    listing_index: int | None = None
    request_id: str | None = None  # the submitting request's id, carried into the worker's log lines
    priority: str = "interactive"  # core.queues.Priority: which queue its task goes to


def create_job(session: Session, new: NewJob) -> tuple[Job, bool]:
    """Insert and commit a queued job. With an idempotency key already used, return that job instead."""
    if new.idempotency_key:
        existing = find_by_idempotency_key(session, new.tenant, new.idempotency_key)
        if existing:
            return existing, False
    job = Job(**new.__dict__)
    winner = commit_once(
        session, [job], lambda: find_by_idempotency_key(session, new.tenant, new.idempotency_key or "")
    )
    return (winner, False) if winner is not None else (job, True)


def commit_once(session: Session, rows: Sequence[SQLModel], winner: Callable[[], Won | None]) -> Won | None:
    """Add `rows` and commit; None once committed. When a request with the same idempotency key committed first
    (a uniqueness violation), roll back and return what it made (`winner()`); any other violation is raised."""
    session.add_all(rows)
    try:
        session.commit()
    except IntegrityError:
        session.rollback()
        existing = winner()
        if existing is None:
            raise
        return existing
    return None


def find_by_idempotency_key(session: Session, tenant: str, key: str) -> Job | None:
    return session.exec(select(Job).where(Job.tenant == tenant, Job.idempotency_key == key)).first()


def get_job(session: Session, job_id: str, tenant: str | None = None) -> Job | None:
    job = session.get(Job, job_id)
    if job is None or (tenant is not None and job.tenant != tenant):
        return None
    return job


def tenant_job(session: Session, job_id: str, tenant: str) -> Job:
    """The job if it exists in this tenant; another tenant's job is reported as unknown (404), never 403."""
    job = get_job(session, job_id, tenant) if ID_PATTERN.match(job_id) else None
    if job is None:
        raise NotFound(f"no job with id {job_id[:64]!r}", code="job_not_found")
    return job


def get_decision(session: Session, job_id: str) -> Decision | None:
    return session.exec(select(Decision).where(Decision.job_id == job_id)).first()


def claim_job(session: Session, job_id: str, worker: str, lease_s: float) -> Job | None:
    """Mark a job running for this worker, unless it is final or another worker holds a live lease.

    A running job's lease is its `updated_at`: set by the claim, renewed by its worker (`renew_leases`)
    while the job runs, so only a job whose worker stopped renewing for `lease_s` is taken over."""
    now = utcnow()
    result = session.execute(
        update(Job)
        .where(
            col(Job.id) == job_id,
            or_(
                col(Job.status) == JobStatus.QUEUED,
                and_(col(Job.status) == JobStatus.RUNNING, col(Job.updated_at) < now - timedelta(seconds=lease_s)),
            ),
        )
        .values(status=JobStatus.RUNNING, started_at=now, updated_at=now, worker=worker, attempts=Job.attempts + 1)
    )
    session.commit()
    if getattr(result, "rowcount", 0) != 1:
        return None
    job = session.get(Job, job_id)
    if job is not None:
        session.refresh(job)
    return job


def store_decision(
    session: Session, job: Job, decision: Decision, shadows: Sequence[ShadowDecision] = (), *, audit_rate: float = 0.0
) -> Decision | None:
    """Write the decision, its category rows, the job's `done` state, what shadow policies would have decided and,
    for a `review` decision, its place in the review queue (with the audit entry), in one transaction (idempotent).
    An automatic allow or block goes to the queue as an `audit` item when the job is in the policy's `audit_rate`
    sample (core.review.audit_sampled: decided by the job id, so a redelivery samples the same way).

    None when the job was erased before its decision could be stored: nothing of the decision is written, and the
    job ends `failed` with code `erased` in the same transaction (one decision or one failure, never both).
    """
    existing = get_decision(session, job.id)
    if existing is not None:
        return existing
    now = utcnow()
    # The job row first, on condition that it is not erased: the UPDATE holds the row (PostgreSQL) or the database
    # (SQLite) until the commit, so an erasure either committed before (no row matches) or waits for this
    # transaction and then erases what it wrote (core/erasure.py takes the row the same way).
    done = session.execute(
        update(Job)
        .where(col(Job.id) == job.id, col(Job.erased_at).is_(None))
        .values(
            status=JobStatus.DONE,
            policy_version=decision.policy_version,
            finished_at=now,
            updated_at=now,
            error_code=None,
            error_message=None,
        )
    )
    if getattr(done, "rowcount", 0) != 1:
        session.execute(
            update(Job)
            .where(col(Job.id) == job.id, col(Job.status).not_in([str(status) for status in FINAL_STATUSES]))
            .values(
                status=JobStatus.FAILED,
                error_code=ERASED,
                error_message=ERASED_WHILE_RUNNING,
                finished_at=now,
                updated_at=now,
            )
        )
        session.commit()
        return None
    decision.job_id = job.id
    decision.tenant = job.tenant
    session.add(decision)
    for shadow in shadows:
        shadow.job_id = job.id
        shadow.tenant = job.tenant
        session.add(shadow)
    for name, result in decision.categories.items():
        session.add(
            DecisionCategory(
                decision_id=decision.id,
                category=name,
                score=float(result["score"]),
                action=str(result["action"]),
                fired=bool(result["fired"]),
            )
        )
    try:
        if decision.action == "review":
            review.enqueue(session, decision)
        elif review.audit_sampled(job.id, audit_rate):
            review.enqueue(session, decision, ReviewKind.AUDIT)
        session.commit()
    except IntegrityError:
        # A redelivered copy of this job finished first: keep its decision, never a second one.
        session.rollback()
        existing = get_decision(session, job.id)
        if existing is None:
            raise
        return existing
    return decision


def record_hashes(session: Session, job: Job, sha256: str, pdq: str, pdq_quality: int) -> None:
    """The image's hashes on the job row (a URL job learns its SHA-256 here; an upload's is set at intake)."""
    session.execute(
        update(Job)
        .where(col(Job.id) == job.id, col(Job.erased_at).is_(None))  # an erased job's hashes are not written back
        .values(image_sha256=sha256, pdq=pdq, pdq_quality=pdq_quality)
    )
    session.commit()
    job.image_sha256, job.pdq, job.pdq_quality = sha256, pdq, pdq_quality


def record_fetched_video(
    session: Session, job: Job, *, blob_key: str, size: int, fmt: str, width: int, height: int
) -> None:
    """An `image_url` job whose file is a video or an animation: stored like an upload (the blob store's key is its
    SHA-256) and decided on its frames from now on (`media` video)."""
    values: dict[str, Any] = {
        "blob_key": blob_key,
        "image_sha256": blob_key,
        "image_bytes": size,
        "image_format": fmt,
        "image_width": width,
        "image_height": height,
        "media": "video",
    }
    session.execute(update(Job).where(col(Job.id) == job.id, col(Job.erased_at).is_(None)).values(**values))
    session.commit()
    for name, value in values.items():
        setattr(job, name, value)


# Candidates read per reuse lookup: jobs with the same bytes whose context differs are skipped in Python.
_REUSE_CANDIDATES = 20


def reusable_decision(session: Session, job: Job, policy_version: str) -> Decision | None:
    """The decision of an earlier finished job of the same tenant, bytes, context and policy version, if any.

    Erased jobs are never reused (their evidence is gone). The context counts: a listing photo judged
    against one title says nothing about another title. So does being a listing's main photo (or a lone
    image) or not: rules limited to the main photo (`photos: main`) judge one and skip the other.
    """
    if not job.image_sha256:
        return None
    rows = session.exec(
        select(Decision, Job)
        .join(Job, col(Job.id) == col(Decision.job_id))
        .where(
            Job.tenant == job.tenant,
            Job.image_sha256 == job.image_sha256,
            col(Job.id) != job.id,
            col(Job.erased_at).is_(None),
            Decision.policy == job.policy,
            Decision.policy_version == policy_version,
        )
        .order_by(col(Decision.decided_at))
        .limit(_REUSE_CANDIDATES)
    ).all()
    for decision, earlier in rows:
        # A bank match decided without models: whether it still blocks is the bank's say now, never a copy's.
        same_place = _is_main_photo(earlier) == _is_main_photo(job)
        if decision.models and (earlier.context or None) == (job.context or None) and same_place:
            return decision
    return None


def _is_main_photo(job: Job) -> bool:
    return not job.listing_index


def fail_job(session: Session, job_id: str, code: str, message: str) -> None:
    """Final `failed` state with a stable code and a sentence. Never overrides a stored decision. An erased job keeps
    the code but never the sentence: it may quote the erased URL (with its token) or the context."""
    now = utcnow()
    kept_message = case((col(Job.erased_at).is_(None), message[:2000]), else_=ERASED_MESSAGE)
    session.execute(
        update(Job)
        .where(col(Job.id) == job_id, col(Job.status) != JobStatus.DONE)
        .values(status=JobStatus.FAILED, error_code=code, error_message=kept_message, finished_at=now, updated_at=now)
    )
    session.commit()


def requeue_job(session: Session, job_id: str) -> None:
    """Hand a running job back to the queue (a transient failure; the task will be retried)."""
    session.execute(
        update(Job)
        .where(col(Job.id) == job_id, col(Job.status) == JobStatus.RUNNING)
        .values(status=JobStatus.QUEUED, updated_at=utcnow())
    )
    session.commit()


def renew_leases(session: Session, job_ids: Sequence[str], worker: str) -> int:
    """Renew the leases this worker holds on its running jobs; how many it still held."""
    if not job_ids:
        return 0
    result = session.execute(
        update(Job)
        .where(col(Job.id).in_(list(job_ids)), col(Job.worker) == worker, col(Job.status) == JobStatus.RUNNING)
        .values(updated_at=utcnow())
    )
    session.commit()
    return int(getattr(result, "rowcount", 0))


def stale_jobs(
    session: Session,
    *,
    queued_before: datetime,
    running_before: datetime,
    unenqueued_before: datetime | None = None,
    enqueued_lost: bool = False,
    limit: int = 500,
) -> Sequence[Job]:
    """Jobs that may have lost their message: queued for long, running past their lease, (`unenqueued_before`)
    queued since before then without their task ever reaching the broker, or (`enqueued_lost`: the broker lost
    its data) queued with their task enqueued, however recently."""
    queued = and_(col(Job.status) == JobStatus.QUEUED, col(Job.updated_at) < queued_before)
    if enqueued_lost:
        queued = or_(queued, and_(col(Job.status) == JobStatus.QUEUED, col(Job.enqueued_at).is_not(None)))
    if unenqueued_before is not None:
        never_enqueued = and_(
            col(Job.status) == JobStatus.QUEUED, col(Job.enqueued_at).is_(None), col(Job.updated_at) < unenqueued_before
        )
        queued = or_(queued, never_enqueued)
    query = (
        select(Job)
        .where(or_(queued, and_(col(Job.status) == JobStatus.RUNNING, col(Job.updated_at) < running_before)))
        .order_by(col(Job.created_at))
        .limit(limit)
    )
    return session.exec(query).all()


def reset_stale_running(session: Session, job_id: str, running_before: datetime) -> bool:
    """Put a running job whose lease expired back to queued; False if someone else already moved it."""
    result = session.execute(
        update(Job)
        .where(col(Job.id) == job_id, col(Job.status) == JobStatus.RUNNING, col(Job.updated_at) < running_before)
        .values(status=JobStatus.QUEUED, updated_at=utcnow())
    )
    session.commit()
    return getattr(result, "rowcount", 0) == 1


def touch_queued(session: Session, job_id: str, stale_before: datetime | None = None) -> bool:
    """Record a re-enqueue of a queued job (bumps updated_at so it is not re-enqueued again at once); False if the
    job is no longer queued or, with `stale_before`, was touched since then (another pass took it)."""
    conditions = [col(Job.id) == job_id, col(Job.status) == JobStatus.QUEUED]
    if stale_before is not None:
        conditions.append(col(Job.updated_at) < stale_before)
    result = session.execute(update(Job).where(*conditions).values(updated_at=utcnow()))
    session.commit()
    return getattr(result, "rowcount", 0) == 1


def mark_enqueued(session: Session, *job_ids: str) -> None:
    """Record that the jobs' tasks reached the broker: the outbox sweep leaves them to the queued grace from now on."""
    if job_ids:
        session.execute(update(Job).where(col(Job.id).in_(job_ids)).values(enqueued_at=utcnow()))
        session.commit()


def count_by_status(session: Session) -> dict[str, int]:
    rows = session.exec(select(Job.status, func.count()).group_by(Job.status)).all()
    return {str(status): int(count) for status, count in rows}


def list_decisions(
    session: Session,
    *,
    tenant: str | None = None,
    action: str | None = None,
    policy: str | None = None,
    category: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    flagged: bool = False,
    text: str | None = None,
    limit: int = 50,
    cursor: str | None = None,
) -> tuple[list[Decision], str | None]:
    """Decisions newest first, filtered (`flagged`: review or block; `text`: a line read in the image contains it,
    case-insensitive, taken literally); keyset pagination with an opaque cursor."""
    query = select(Decision)
    if tenant is not None:
        query = query.where(Decision.tenant == tenant)
    if action:
        query = query.where(Decision.action == action)
    if flagged:
        query = query.where(col(Decision.action).in_(("review", "block")))
    if until:
        query = query.where(col(Decision.decided_at) < until)
    if policy:
        query = query.where(Decision.policy == policy)
    if since:
        query = query.where(col(Decision.decided_at) >= since)
    if category:
        fired = select(DecisionCategory.decision_id).where(
            DecisionCategory.category == category, col(DecisionCategory.fired).is_(True)
        )
        query = query.where(col(Decision.id).in_(fired))
    if text:
        query = query.where(_read_line_contains(session, text))
    if cursor:
        decided_at, decision_id = decode_cursor(cursor)
        query = query.where(
            or_(
                col(Decision.decided_at) < decided_at,
                and_(col(Decision.decided_at) == decided_at, col(Decision.id) < decision_id),
            )
        )
    query = query.order_by(col(Decision.decided_at).desc(), col(Decision.id).desc()).limit(limit + 1)
    rows = list(session.exec(query).all())
    next_cursor = encode_cursor(rows[limit - 1]) if len(rows) > limit else None
    return rows[:limit], next_cursor


def _read_line_contains(session: Session, needle: str) -> ColumnElement[bool]:
    """A line of the decision's `text` contains `needle` (case-insensitive; `%`, `_` and `/` mean themselves).

    The lines are unnested and each line's `text` compared, never the JSON document as a whole: that would also
    match the keys ("score", "box"), the numbers and the JSON escapes of quotes and non-ASCII letters.
    """
    lines: Any
    if session.get_bind().dialect.name == "sqlite":
        lines = func.json_each(col(Decision.text)).table_valued("value").alias("line")
        line_text = func.json_extract(lines.c.value, "$.text", type_=String)
    else:
        # json_array_elements refuses a scalar, and an erased decision's text may be a JSON null.
        array = case(
            (func.json_typeof(col(Decision.text)) == "array", col(Decision.text)),
            else_=literal_column("'[]'::json"),
        )
        lines = func.json_array_elements(array).table_valued("value").alias("line")
        line_text = lines.c.value.op("->>", return_type=String)("text")
    # autoescape: the user's string is matched literally (LIKE's % and _ and the escape character escaped).
    return exists(select(literal_column("1")).select_from(lines).where(line_text.icontains(needle, autoescape=True)))


def encode_cursor(decision: Decision) -> str:
    raw = f"{decision.decided_at.isoformat()}|{decision.id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    """The position a cursor names. A forged one may decode to any bytes: only a plausible decision id passes."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        stamp, decision_id = raw.split("|", 1)
        if not ID_PATTERN.match(decision_id):
            raise ValueError(decision_id)
        return datetime.fromisoformat(stamp), decision_id
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise BadRequest("cursor is not one this API returned", code="invalid_cursor") from None
