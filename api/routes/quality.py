"""The dashboard's Quality page: per category, the precision-recall curve from the tenant's review labels (an SVG
drawn on the server, no JavaScript), today's and the suggested thresholds on it, and the audit-measured precision."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, Response

from api.auth import Reviewer
from api.deps import PoliciesDep, SessionDep
from api.pages import render
from core.calibration import calibrate, point_at
from core.public import CalibrationPublic, Thresholds
from core.tables import utcnow

router = APIRouter(prefix="/dashboard", tags=["dashboard"], include_in_schema=False)

SINCE = {"7d": 7, "30d": 30, "90d": 90}  # days
# The curve's drawing area inside its SVG viewBox (pixels): recall along x, precision up y.
LEFT, TOP, WIDTH, HEIGHT = 40, 10, 260, 200


@router.get("/quality", response_class=HTMLResponse)
def quality_page(
    request: Request,
    session: SessionDep,
    policies: PoliciesDep,
    principal: Reviewer,
    policy: Annotated[str | None, Query(max_length=64)] = None,
    since: Literal["7d", "30d", "90d"] = "30d",
) -> Response:
    """Each category's curve, labelled counts, today's and the suggested thresholds, and the audit sample."""
    names = sorted(name for name, loaded in policies.items() if loaded.shadows is None)
    chosen = policy if policy in policies else (names[0] if names else None)
    from_moment = utcnow().replace(microsecond=0) - timedelta(days=SINCE[since])
    categories: list[dict[str, Any]] = []
    audit = None
    if chosen is not None:
        for category in policies[chosen].categories:
            if category.review is None and category.block is None:
                continue  # tags only: never acts
            found = calibrate(
                session,
                tenant=principal.tenant,
                policy=chosen,
                category=category.name,
                since=from_moment,
                current=Thresholds(review=category.review, block=category.block),
            )
            audit = found.audit
            categories.append(_drawn(found))
    return render(
        request,
        "quality.html",
        principal,
        policies=names,
        filters={"policy": chosen or "", "since": since},
        categories=categories,
        audit=audit,
        box={"left": LEFT, "top": TOP, "width": WIDTH, "height": HEIGHT},
    )


def _drawn(found: CalibrationPublic) -> dict[str, Any]:
    """The calibration with what its SVG needs: the curve's polyline and each marked threshold's position."""
    polyline = " ".join(f"{_x(point.recall):.1f},{_y(point.precision):.1f}" for point in reversed(found.points))
    marks = []
    for which, thresholds in (("today", found.current), ("suggested", found.suggested)):
        for action in ("review", "block"):
            threshold = getattr(thresholds, action)
            point = point_at(found.points, threshold)
            if point is not None:
                marks.append(
                    {
                        "which": which,
                        "action": action,
                        "threshold": threshold,
                        "precision": point.precision,
                        "recall": point.recall,
                        "x": round(_x(point.recall), 1),
                        "y": round(_y(point.precision), 1),
                    }
                )
    return {"calibration": found, "polyline": polyline, "marks": marks}


def _x(recall: float) -> float:
    return LEFT + recall * WIDTH


def _y(precision: float) -> float:
    return TOP + (1 - precision) * HEIGHT
