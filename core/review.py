"""The human review queue: `review` decisions wait here to be claimed (a lease) and resolved allow/block.

The machine's decision row is never changed: a resolution is stored on the queue item beside it, with
who and when, and every step (enqueued, claimed, released, resolved, reopened) goes into the audit log in the
same transaction as the change. Claims and resolutions are single conditional UPDATEs, so two
reviewers racing for one item cannot both win, on SQLite or PostgreSQL.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

from sqlalchemy import ColumnElement, and_, or_, update
from sqlmodel import Session, col, func, select

from core import events
from core.audit import record
from core.errors import BadRequest, Conflict, InvalidField, ModtagError, NotFound
from core.metrics import REVIEW_RESOLUTION
from core.principals import Permission, Principal, system_principal
from core.public import ReviewItemPublic
from core.tables import (
    ID_PATTERN,
    AuditEntry,
    Decision,
    DecisionCategory,
    ReviewItem,
    ReviewKind,
    ReviewState,
    as_utc,
    iso,
    utcnow,
)

Order = Literal["oldest", "score"]
Resolution = Literal["allow", "block"]
MAX_REASON_CHARS = 2000


@dataclass(frozen=True)
class QueueStats:
    open: int
    oldest_queued_at: datetime | None


def enqueue(session: Session, decision: Decision, kind: ReviewKind = ReviewKind.REVIEW) -> ReviewItem:
    """Put a `review` decision (or an `audit` sample of an automatic one) in the queue (caller commits, in the
    decision's own transaction)."""
    # An audit sample of an allow has nothing flagged: its top category overall is shown.
    shown = [
        (name, result)
        for name, result in decision.categories.items()
        if kind == ReviewKind.AUDIT or result.get("action") != "allow"
    ]
    top = max(shown, key=lambda item: (float(item[1]["score"]), item[0]), default=None)
    item = ReviewItem(
        job_id=decision.job_id,
        decision_id=decision.id,
        tenant=decision.tenant,
        policy=decision.policy,
        category=top[0] if top else None,
        score=float(top[1]["score"]) if top else 0.0,
        queued_at=utcnow(),
        kind=kind,
    )
    session.add(item)
    record(
        session,
        system_principal(decision.tenant),
        "review.enqueued",
        "job",
        decision.job_id,
        before=None,
        after=item_public(item),
    )
    return item


def audit_sampled(job_id: str, rate: float) -> bool:
    """Whether an automatic decision of this job is one of the `rate` share sent to the queue as an audit item.

    A function of the job id alone (its SHA-256 read as a number in [0, 1)): a redelivered job samples the same way,
    and every worker agrees without sharing state."""
    if rate <= 0:
        return False
    draw = int.from_bytes(hashlib.sha256(f"audit:{job_id}".encode()).digest()[:8], "big") / 2**64
    return draw < rate


def effective_labels(
    categories: Mapping[str, Mapping[str, Any]], action: Resolution, given: Mapping[str, bool] | None
) -> dict[str, bool]:
    """A resolution's labels: the categories the reviewer gave, and for the others what the action says (a block:
    the categories that fired apply; an allow: none applies). InvalidField `unknown_category` for a name the
    decision's policy version does not have (the API names the closest one first)."""
    given = dict(given or {})
    unknown = sorted(name for name in given if name not in categories)
    if unknown:
        raise InvalidField(
            f"no category {unknown[0][:64]!r} in this decision's policy; its categories: "
            + ", ".join(sorted(categories)),
            code="unknown_category",
        )
    labels: dict[str, bool] = {}
    for name, result in categories.items():
        if name in given:
            labels[name] = bool(given[name])
        elif action == "allow":
            labels[name] = False
        elif result.get("fired"):
            labels[name] = True
    return labels


def get_item(session: Session, job_id: str, tenant: str) -> ReviewItem | None:
    if not ID_PATTERN.match(job_id):
        return None
    item = session.get(ReviewItem, job_id)
    return item if item is not None and item.tenant == tenant else None


def list_queue(
    session: Session,
    *,
    tenant: str,
    state: ReviewState | None = ReviewState.OPEN,
    order: Order = "oldest",
    policy: str | None = None,
    category: str | None = None,
    kind: ReviewKind | None = None,
    limit: int = 50,
    cursor: str | None = None,
) -> tuple[list[tuple[ReviewItem, Decision]], str | None]:
    """Queue items with their decisions: oldest first or highest score first; keyset paging."""
    query = select(ReviewItem, Decision).join(Decision, col(Decision.id) == col(ReviewItem.decision_id))
    query = query.where(ReviewItem.tenant == tenant)
    if kind is not None:
        query = query.where(ReviewItem.kind == kind)
    if state is not None:
        query = query.where(ReviewItem.state == state)
    if policy:
        query = query.where(ReviewItem.policy == policy)
    if category:
        fired = select(DecisionCategory.decision_id).where(
            DecisionCategory.category == category, col(DecisionCategory.fired).is_(True)
        )
        query = query.where(col(ReviewItem.decision_id).in_(fired))
    queued, job = col(ReviewItem.queued_at), col(ReviewItem.job_id)
    if cursor:
        position = _decode_cursor(cursor, order)
        after_time = or_(queued > position["t"], and_(queued == position["t"], job > position["j"]))
        if order == "score":
            score = col(ReviewItem.score)
            query = query.where(or_(score < position["s"], and_(score == position["s"], after_time)))
        else:
            query = query.where(after_time)
    ordering: list[Any] = [queued.asc(), job.asc()]
    if order == "score":
        ordering.insert(0, col(ReviewItem.score).desc())
    rows = [(item, decision) for item, decision in session.exec(query.order_by(*ordering).limit(limit + 1)).all()]
    next_cursor = _encode_cursor(rows[limit - 1][0], order) if len(rows) > limit else None
    return rows[:limit], next_cursor


def claim(
    session: Session, job_id: str, actor: Principal, lease_s: float, *, now: datetime | None = None
) -> ReviewItem:
    """Take the item for `lease_s` seconds (claiming again extends it). Conflict if someone else holds it.

    `now` (default: the clock) is when the claim happens; leases run out against it, so a test can pass time.
    """
    before = _existing(session, job_id, actor.tenant)
    now = now or utcnow()
    me = claimant_id(actor)
    lease = {
        "claimed_by": me,
        "claimed_by_name": actor.name[:128],
        "claim_expires_at": now + timedelta(seconds=lease_s),
    }
    item = _update_if_claimable(session, job_id, actor, now, lease, "claim")
    record(session, actor, "review.claimed", "job", job_id, before=before, after=item_public(item, now=now))
    session.commit()
    return item


def release(session: Session, job_id: str, actor: Principal, *, now: datetime | None = None) -> ReviewItem:
    """Give a live claim back before its lease runs out, so another reviewer can take the item at once.

    Only the holder may release a claim, or an admin (who may also reopen items) anyone's. Conflict
    `review_claimed` for someone else's claim, `review_not_claimed` when there is no live claim.
    """
    before = _existing(session, job_id, actor.tenant)
    now = now or utcnow()
    me = claimant_id(actor)
    # "Live" as item_public shows it, so what a reviewer sees as claimed is what can be released.
    held = and_(col(ReviewItem.claimed_by).is_not(None), col(ReviewItem.claim_expires_at) > now)
    guard = [_item_in(job_id, actor.tenant, ReviewState.OPEN), held]
    if not actor.can(Permission.REOPEN):  # the queue's admin power: reopen, and release anyone's claim
        guard.append(col(ReviewItem.claimed_by) == me)
    item = _update_or_refuse(
        session,
        job_id,
        and_(*guard),
        {"claimed_by": None, "claimed_by_name": None, "claim_expires_at": None},
        lambda: _refusal(session, job_id, actor.tenant, "release", now),
    )
    record(session, actor, "review.released", "job", job_id, before=before, after=item_public(item, now=now))
    session.commit()
    return item


def resolve(
    session: Session,
    job_id: str,
    actor: Principal,
    action: Resolution,
    reason: str,
    *,
    labels: Mapping[str, bool] | None = None,
    now: datetime | None = None,
) -> ReviewItem:
    """Record a person's allow/block beside the machine decision. Needs no claim, unless someone else holds one.

    `labels` says per category whether it applies; the categories not given follow the action (effective_labels).
    They are stored on the item, with who and when, and quoted by the audit entry."""
    if action not in ("allow", "block"):
        raise BadRequest("a resolution is `allow` or `block`", code="resolution_invalid")
    reason = check_reason(reason)
    before = _existing(session, job_id, actor.tenant)
    decision = session.get(Decision, before["decision_id"])
    effective = effective_labels(decision.categories if decision else {}, action, labels)
    now = now or utcnow()
    me = claimant_id(actor)
    item = _update_if_claimable(
        session,
        job_id,
        actor,
        now,
        {
            "state": ReviewState.RESOLVED,
            "resolution": action,
            "reason": reason,
            "resolved_by": me,
            "resolved_by_name": actor.name[:128],
            "resolved_at": now,
            "labels": effective,
            "claimed_by": None,
            "claimed_by_name": None,
            "claim_expires_at": None,
        },
        "resolve",
    )
    record(session, actor, "review.resolved", "job", job_id, before=before, after=item_public(item, now=now))
    events.record_review_resolved(session, item)  # the job's webhook, committed with the resolution
    session.commit()
    REVIEW_RESOLUTION.labels(policy=item.policy, resolution=action).observe(
        max(0.0, (now - as_utc(item.queued_at)).total_seconds())
    )
    return item


def reopen(session: Session, job_id: str, actor: Principal, reason: str) -> ReviewItem:
    """An appeal: a resolved item goes back to the queue. The old resolution stays in the audit log."""
    reason = check_reason(reason)
    before = _existing(session, job_id, actor.tenant)
    now = utcnow()
    item = _update_or_refuse(
        session,
        job_id,
        _item_in(job_id, actor.tenant, ReviewState.RESOLVED),
        {
            "state": ReviewState.OPEN,
            "resolution": None,
            "reason": None,
            "resolved_by": None,
            "resolved_by_name": None,
            "resolved_at": None,
            "labels": None,
            "queued_at": now,
            "reopen_count": ReviewItem.reopen_count + 1,
        },
        lambda: Conflict(f"job {job_id} is not resolved, so there is nothing to reopen", code="review_not_resolved"),
    )
    after = {**item_public(item, now=now), "reopen_reason": reason}
    record(session, actor, "review.reopened", "job", job_id, before=before, after=after)
    session.commit()
    return item


def erase_notes(session: Session, job_id: str) -> None:
    """An erased job's reviewer notes go: the resolution's reason and the notes its audit entries quote (who did
    what, and when, stays). The caller commits, in the erasure's transaction."""
    session.execute(update(ReviewItem).where(col(ReviewItem.job_id) == job_id).values(reason=None))
    entries = session.exec(
        select(AuditEntry).where(
            AuditEntry.target_type == "job",
            AuditEntry.target_id == job_id,
            col(AuditEntry.action).startswith("review."),
        )
    ).all()
    for entry in entries:
        # New dicts, never changed in place: the JSON columns are written only when assigned.
        entry.before, entry.after = _without_notes(entry.before), _without_notes(entry.after)
        session.add(entry)


def queue_stats(session: Session) -> QueueStats:
    """Open items over every tenant, for the gauges."""
    count, oldest = session.exec(
        select(func.count(), func.min(ReviewItem.queued_at)).where(ReviewItem.state == ReviewState.OPEN)
    ).one()
    return QueueStats(open=int(count or 0), oldest_queued_at=as_utc(oldest) if oldest else None)


def item_public(item: ReviewItem, *, now: datetime | None = None) -> dict[str, Any]:
    """A queue item as the audit log records it: its public shape (`core.public.ReviewItemPublic`) as JSON."""
    return ReviewItemPublic.from_row(item, now=now).model_dump(mode="json")


def claimant_id(actor: Principal) -> str:
    """Who holds a claim: the key's id; without keys (CLI, auth off) a label of the actor."""
    return actor.key_id or f"{actor.via}:{actor.name}"[:32]


def check_reason(reason: str) -> str:
    reason = reason.strip()
    if not reason:
        raise BadRequest("give a reason: it is kept with the resolution", code="reason_missing")
    if len(reason) > MAX_REASON_CHARS or "\x00" in reason:
        raise BadRequest(f"a reason is at most {MAX_REASON_CHARS} characters of text", code="reason_invalid")
    return reason


def count_by_resolution(session: Session, tenant: str) -> dict[str, int]:
    rows = session.exec(
        select(ReviewItem.state, ReviewItem.resolution, func.count())
        .where(ReviewItem.tenant == tenant)
        .group_by(col(ReviewItem.state), col(ReviewItem.resolution))
    ).all()
    counts: dict[str, int] = {}
    for state, resolution, count in rows:
        counts[str(resolution or state)] = counts.get(str(resolution or state), 0) + int(count)
    return counts


def items_for(session: Session, job_ids: Sequence[str]) -> dict[str, ReviewItem]:
    if not job_ids:
        return {}
    rows = session.exec(select(ReviewItem).where(col(ReviewItem.job_id).in_(list(job_ids)))).all()
    return {row.job_id: row for row in rows}


# --- helpers ---------------------------------------------------------------------------------------


def _without_notes(snapshot: dict[str, Any] | None) -> dict[str, Any] | None:
    if snapshot is None:
        return None
    cleared = dict(snapshot)
    if isinstance(cleared.get("resolution"), dict):
        cleared["resolution"] = {**cleared["resolution"], "reason": None}
    if "reopen_reason" in cleared:
        cleared["reopen_reason"] = None
    return cleared


def _item_in(job_id: str, tenant: str, state: ReviewState) -> ColumnElement[bool]:
    """The guard every change starts from: this tenant's item, in the state the change expects."""
    return and_(col(ReviewItem.job_id) == job_id, col(ReviewItem.tenant) == tenant, col(ReviewItem.state) == state)


def _update_if_claimable(
    session: Session, job_id: str, actor: Principal, now: datetime, values: dict[str, Any], verb: str
) -> ReviewItem:
    """The guard of claim and resolve: change the item only while it is open and nobody else holds a live claim."""
    me = claimant_id(actor)
    claimable = or_(
        col(ReviewItem.claimed_by).is_(None),
        col(ReviewItem.claimed_by) == me,
        col(ReviewItem.claim_expires_at) < now,
    )
    guard = and_(_item_in(job_id, actor.tenant, ReviewState.OPEN), claimable)
    return _update_or_refuse(session, job_id, guard, values, lambda: _refusal(session, job_id, actor.tenant, verb, now))


def _update_or_refuse(
    session: Session,
    job_id: str,
    guard: ColumnElement[bool],
    values: dict[str, Any],
    refusal: Callable[[], ModtagError],
) -> ReviewItem:
    """One conditional UPDATE: exactly one row matches `guard` or nothing changes and `refusal()` says why.

    The refusal is worked out after the rollback, from the row as it is now, so a lost race reads right.
    """
    result = session.execute(update(ReviewItem).where(guard).values(**values))
    if getattr(result, "rowcount", 0) != 1:
        session.rollback()
        raise refusal()
    return _reload(session, job_id)


def _existing(session: Session, job_id: str, tenant: str) -> dict[str, Any]:
    item = get_item(session, job_id, tenant)
    if item is None:
        raise NotFound(f"job {job_id[:64]!r} is not in the review queue", code="review_not_found")
    snapshot = item_public(item)
    session.expunge(item)  # the UPDATE below is the source of truth; reload afterwards
    return snapshot


def _reload(session: Session, job_id: str) -> ReviewItem:
    item = session.get(ReviewItem, job_id, populate_existing=True)
    assert item is not None
    return item


def _refusal(session: Session, job_id: str, tenant: str, verb: str, now: datetime) -> ModtagError:
    item = get_item(session, job_id, tenant)
    if item is None:
        return NotFound(f"job {job_id[:64]!r} is not in the review queue", code="review_not_found")
    if item.state == ReviewState.RESOLVED:
        return Conflict(
            f"job {job_id} was already resolved ({item.resolution}) by {item.resolved_by_name}; an admin can reopen it",
            code="review_resolved",
        )
    if verb == "release" and item_public(item, now=now)["claim"] is None:
        return Conflict(
            f"job {job_id} is not claimed (or its claim has run out), so there is nothing to release",
            code="review_not_claimed",
        )
    until = iso(item.claim_expires_at)
    advice = "only they or an admin can release it" if verb == "release" else "try another item"
    return Conflict(
        f"cannot {verb}: {item.claimed_by_name} has claimed job {job_id} until {until}; {advice}",
        code="review_claimed",
    )


def _encode_cursor(item: ReviewItem, order: Order) -> str:
    position = {"o": order, "t": iso(item.queued_at), "j": item.job_id, "s": item.score}
    return base64.urlsafe_b64encode(json.dumps(position, separators=(",", ":")).encode()).decode().rstrip("=")


def _decode_cursor(cursor: str, order: Order) -> dict[str, Any]:
    try:
        raw = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        if not isinstance(raw, dict) or raw.get("o") != order or not ID_PATTERN.match(str(raw.get("j"))):
            raise ValueError("not a queue cursor for this order")
        score = float(raw["s"])
        if score != score:  # NaN
            raise ValueError("score")
        return {"t": as_utc(datetime.fromisoformat(str(raw["t"]))), "j": str(raw["j"]), "s": score}
    except (ValueError, KeyError, TypeError, binascii.Error, UnicodeDecodeError):
        raise BadRequest("cursor is not one this API returned (for this order)", code="invalid_cursor") from None
