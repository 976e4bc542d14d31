"""Calibration: `GET /v1/calibration`, a category's precision-recall curve from the tenant's review labels."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated

from fastapi import APIRouter, Query

from api.auth import Reviewer
from api.deps import PoliciesDep, SessionDep, resolve_policy
from api.errors import error_responses
from api.schemas import SINCE_HELP, SLUG_PATTERN, Moment
from core.calibration import DEFAULT_BLOCK_PRECISION, DEFAULT_REVIEW_RECALL, calibrate
from core.errors import InvalidField
from core.public import CalibrationPublic, Thresholds
from core.tables import as_utc, utcnow
from policies import Category, Policy
from policies.problems import did_you_mean

router = APIRouter(prefix="/v1/calibration", tags=["calibration"])

DEFAULT_SINCE = timedelta(days=30)


@router.get("", response_model=CalibrationPublic, responses=error_responses(401, 403, 404, 422))
def read_calibration(
    session: SessionDep,
    policies: PoliciesDep,
    principal: Reviewer,
    policy: Annotated[str, Query(min_length=1, max_length=64, pattern=SLUG_PATTERN)],
    category: Annotated[str, Query(min_length=1, max_length=64, pattern=SLUG_PATTERN)],
    since: Annotated[Moment | None, Query(description=SINCE_HELP + " Default 30d.")] = None,
    block_precision: Annotated[
        float, Query(gt=0.0, le=1.0, allow_inf_nan=False, description="The precision a block threshold must reach.")
    ] = DEFAULT_BLOCK_PRECISION,
    review_recall: Annotated[
        float, Query(gt=0.0, le=1.0, allow_inf_nan=False, description="The recall a review threshold must keep.")
    ] = DEFAULT_REVIEW_RECALL,
) -> CalibrationPublic:
    """The category's precision and recall at each threshold over the tenant's labels (review resolutions and the
    audit sample), the thresholds that meet the targets, and the audit-measured precision of automatic decisions
    (role review or admin). 404 `policy_not_found`, 422 `unknown_category`."""
    loaded = resolve_policy(policies, policy)
    known = policy_category(loaded, category)
    return calibrate(
        session,
        tenant=principal.tenant,
        policy=loaded.name,
        category=known.name,
        since=as_utc(since) if since is not None else utcnow() - DEFAULT_SINCE,
        current=Thresholds(review=known.review, block=known.block),
        block_precision=block_precision,
        review_recall=review_recall,
    )


def policy_category(policy: Policy, name: str) -> Category:
    """The policy's category called `name`, or 422 `unknown_category` with the likely one."""
    try:
        return policy.category(name)
    except KeyError:
        known = [category.name for category in policy.categories]
        close = did_you_mean(name, known)
        hint = f"did you mean {close!r}?" if close else f"its categories: {', '.join(known)}"
        raise InvalidField(
            f"policy {policy.name!r} has no category {name[:64]!r}; {hint}", code="unknown_category"
        ) from None
