"""Shadow decisions: how often a shadow policy agrees with the active one it runs beside."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlmodel import Session, col

from core.public import ShadowSummary
from core.tables import ShadowDecision, iso

ACTIONS = ("allow", "review", "block")


def shadow_agreement(
    session: Session,
    active_policy: str,
    *,
    tenant: str | None = None,
    since: datetime | None = None,
    shadow: str | None = None,
) -> list[ShadowSummary]:
    """Per shadow policy version: jobs compared, agreement rate and the confusion counts (active x shadow action).

    Shadows that could not decide (a context field they need, say) are counted in `errors`, outside the rate.
    """
    # SQLAlchemy's select: sqlmodel's typed overloads stop at four columns.
    query = select(
        col(ShadowDecision.policy),
        col(ShadowDecision.policy_version),
        col(ShadowDecision.active_action),
        col(ShadowDecision.action),
        func.count(),
        func.min(col(ShadowDecision.decided_at)),
        func.max(col(ShadowDecision.decided_at)),
    ).where(col(ShadowDecision.active_policy) == active_policy)
    if tenant is not None:
        query = query.where(col(ShadowDecision.tenant) == tenant)
    if since is not None:
        query = query.where(col(ShadowDecision.decided_at) >= since)
    if shadow is not None:
        query = query.where(col(ShadowDecision.policy) == shadow)
    query = query.group_by(
        col(ShadowDecision.policy),
        col(ShadowDecision.policy_version),
        col(ShadowDecision.active_action),
        col(ShadowDecision.action),
    )
    summaries: dict[tuple[str, str], dict[str, Any]] = {}
    for name, version, active_action, action, count, first, last in session.execute(query).all():
        summary = summaries.setdefault(
            (name, version),
            {
                "shadow": name,
                "version": version,
                "compared": 0,
                "agreed": 0,
                "errors": 0,
                "confusion": {a: dict.fromkeys(ACTIONS, 0) for a in ACTIONS},
                "first_at": first,
                "last_at": last,
            },
        )
        summary["first_at"] = min(summary["first_at"], first)
        summary["last_at"] = max(summary["last_at"], last)
        if action is None:
            summary["errors"] += int(count)
            continue
        summary["compared"] += int(count)
        summary["agreed"] += int(count) if action == active_action else 0
        summary["confusion"].setdefault(active_action, dict.fromkeys(ACTIONS, 0))[action] = int(count)
    result = []
    for summary in sorted(summaries.values(), key=lambda s: (s["shadow"], s["last_at"]), reverse=False):
        compared = summary["compared"]
        summary["agreement"] = round(summary["agreed"] / compared, 6) if compared else None
        summary["first_at"], summary["last_at"] = iso(summary["first_at"]), iso(summary["last_at"])
        result.append(ShadowSummary.model_validate(summary))
    return result
