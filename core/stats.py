"""Flag rates over time for the dashboard's summary, computed in SQL (SQLite and PostgreSQL)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Integer, cast
from sqlmodel import Session, col, func, select

from core.tables import Decision, DecisionCategory


@dataclass
class Bucket:
    """Decisions made in [start, start + width), by action."""

    start: datetime
    counts: dict[str, int] = field(default_factory=lambda: {"allow": 0, "review": 0, "block": 0})

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def flagged(self) -> int:
        return self.counts["review"] + self.counts["block"]

    @property
    def flag_rate(self) -> float | None:
        return self.flagged / self.total if self.total else None


def flag_rates(
    session: Session, *, tenant: str, since: datetime, until: datetime, width: timedelta, policy: str | None = None
) -> list[Bucket]:
    """One bucket per `width` from `since` to `until` (empty ones included), counts by action."""
    seconds = int(width.total_seconds())
    buckets = [Bucket(since + i * width) for i in range(max(1, -(-int((until - since).total_seconds()) // seconds)))]
    index = func.floor((_epoch(session, col(Decision.decided_at)) - since.timestamp()) / seconds)
    query = select(index, Decision.action, func.count()).where(
        Decision.tenant == tenant, col(Decision.decided_at) >= since, col(Decision.decided_at) < until
    )
    if policy:
        query = query.where(Decision.policy == policy)
    for position, action, count in session.exec(query.group_by(index, Decision.action)).all():
        slot = int(position)
        if 0 <= slot < len(buckets) and action in buckets[slot].counts:
            buckets[slot].counts[action] += int(count)
    return buckets


def category_counts(
    session: Session, *, tenant: str, since: datetime, until: datetime, policy: str | None = None
) -> list[tuple[str, int, int]]:
    """(category, times it fired, decisions judged) per category in the window, most fired first."""
    fired_count = func.sum(cast(col(DecisionCategory.fired), Integer))
    query = (
        select(DecisionCategory.category, fired_count, func.count())
        .join(Decision, col(Decision.id) == col(DecisionCategory.decision_id))
        .where(Decision.tenant == tenant, col(Decision.decided_at) >= since, col(Decision.decided_at) < until)
    )
    if policy:
        query = query.where(Decision.policy == policy)
    rows = session.exec(query.group_by(DecisionCategory.category)).all()
    counts = [(str(name), int(fired or 0), int(total)) for name, fired, total in rows]
    return sorted(counts, key=lambda row: (-row[1], row[0]))


def _epoch(session: Session, column: Any) -> Any:
    # SQLite keeps UTC wall-clock text; PostgreSQL a timestamptz. Both become seconds since 1970 UTC.
    if session.get_bind().dialect.name == "sqlite":
        return cast(func.strftime("%s", column), Integer)
    return func.extract("epoch", column)


def reused_count(session: Session, *, tenant: str, since: datetime, until: datetime, policy: str | None = None) -> int:
    """Decisions in the window copied from an earlier identical upload (no model ran for them)."""
    query = select(func.count()).where(
        Decision.tenant == tenant,
        col(Decision.decided_at) >= since,
        col(Decision.decided_at) < until,
        col(Decision.reused_from).is_not(None),
    )
    if policy:
        query = query.where(Decision.policy == policy)
    return int(session.exec(query).one())
