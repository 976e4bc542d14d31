"""Per-category labels of a review resolution, checked against the decision's categories before anything changes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from sqlmodel import Session

from api.schemas import MAX_LABELS
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


def form_labels(
    session: Session, job_id: str, tenant: str, ticked: Sequence[str], shown: Sequence[str]
) -> dict[str, bool] | None:
    """The review form's checkboxes as labels: with any ticked, the ticked categories apply and the other shown ones
    do not; with none ticked, None (the action decides). 422 `unknown_category` for a name the decision lacks."""
    if not ticked:
        return None
    if len(ticked) > MAX_LABELS or len(shown) > MAX_LABELS:
        raise InvalidField(f"at most {MAX_LABELS} categories can be labelled at once", code="invalid_field")
    labels = {name[:64]: False for name in shown}
    labels.update({name[:64]: True for name in ticked})
    return checked_labels(session, job_id, tenant, labels)
