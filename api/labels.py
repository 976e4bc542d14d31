"""Per-category labels of a review resolution, checked against the decision's categories before anything changes."""

from __future__ import annotations

from collections.abc import Mapping

from sqlmodel import Session

from core import review
from core.errors import InvalidField
from core.tables import Decision
from policies.problems import did_you_mean


def checked_labels(session: Session, job_id: str, tenant: str, given: Mapping[str, bool] | None) -> dict[str, bool]:
    """`given` when every name is a category of the item's decision; 422 `unknown_category` with the likely one.

    An unknown item passes through unchecked: resolving it answers 404 `review_not_found` as before."""
    if not given:
        return {}
    item = review.get_item(session, job_id, tenant)
    decision = session.get(Decision, item.decision_id) if item is not None else None
    if decision is None:
        return dict(given)
    known = sorted(decision.categories)
    for name in given:
        if name not in decision.categories:
            close = did_you_mean(name, known)
            hint = f"; did you mean {close!r}?" if close else f"; its categories: {', '.join(known)}"
            raise InvalidField(
                f"no category {name[:64]!r} in policy {decision.policy!r} (version {decision.policy_version}){hint}",
                code="unknown_category",
            )
    return dict(given)
