"""Calibration: a category's precision-recall curve from the tenant's review labels, and the thresholds it suggests.

One function for the API route, the CLI (through the route) and the dashboard's Quality page. The labels are the
resolutions of the review queue (`review` items and the `audit` sample of automatic decisions); the score a label
is set against is the machine's category score of that decision. A policy acts on `score >= threshold`, so every
point's threshold is a labelled score: a policy written with it decides the labelled jobs as the point says.

An erased job's labels no longer count (as the labels export never holds it): erasure ends every use of what a
person said about its image, the thresholds tuned on it included; its tombstone keeps only its own decision.

The labelled jobs are the ones people saw: `review` items sit between the thresholds, and only the audit sample
reaches below and above them. The curve is exact for those jobs; how well it speaks for all traffic depends on
the audit rate.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import datetime
from typing import Literal

from sqlalchemy import and_
from sqlmodel import Session, col, select

from core.public import (
    CalibrationPublic,
    CalibrationTarget,
    CurvePoint,
    MeasuredPrecision,
    Thresholds,
)
from core.review import effective_labels
from core.tables import Decision, DecisionCategory, Job, ReviewItem, ReviewKind, ReviewState

DEFAULT_BLOCK_PRECISION = 0.95
DEFAULT_REVIEW_RECALL = 0.9
MAX_POINTS = 500  # points in an answer: a curve over many distinct scores is thinned (`thinned`)
WILSON_Z = 1.959964  # a 95% interval


def calibrate(
    session: Session,
    *,
    tenant: str,
    policy: str,
    category: str,
    since: datetime,
    current: Thresholds,
    block_precision: float = DEFAULT_BLOCK_PRECISION,
    review_recall: float = DEFAULT_REVIEW_RECALL,
) -> CalibrationPublic:
    """The curve of `category` from `tenant`'s labels of `policy` resolved since `since`, and what it suggests."""
    labelled = labelled_scores(session, tenant=tenant, policy=policy, category=category, since=since)
    points = curve(labelled)
    positives = sum(1 for _, label in labelled if label)
    review, block = suggest(points, block_precision=block_precision, review_recall=review_recall)
    kept = {current.review, current.block, review, block}
    return CalibrationPublic(
        policy=policy,
        category=category,
        since=since,
        labelled=len(labelled),
        positives=positives,
        points=thinned(points, MAX_POINTS, keep=[point_at(points, threshold) for threshold in kept]),
        current=current,
        suggested=Thresholds(review=review, block=block),
        target=CalibrationTarget(block_precision=block_precision, review_recall=review_recall),
        audit=audit_precision(session, tenant=tenant, policy=policy, since=since),
    )


def labelled_scores(
    session: Session, *, tenant: str, policy: str, category: str, since: datetime
) -> list[tuple[float, bool]]:
    """(machine score, label) of every resolved item of the tenant's `policy` that labels `category`, erased jobs'
    left out.

    A resolution from before labels were stored reads as its action says (core.review.effective_labels)."""
    rows = session.exec(
        select(ReviewItem.labels, ReviewItem.resolution, DecisionCategory.score, DecisionCategory.fired)
        .join(
            DecisionCategory,
            and_(
                col(DecisionCategory.decision_id) == col(ReviewItem.decision_id),
                col(DecisionCategory.category) == category,
            ),
        )
        .join(Job, col(Job.id) == col(ReviewItem.job_id))
        .where(
            col(Job.erased_at).is_(None),
            ReviewItem.tenant == tenant,
            ReviewItem.policy == policy,
            ReviewItem.state == ReviewState.RESOLVED,
            col(ReviewItem.resolved_at) >= since,
        )
    ).all()
    labelled: list[tuple[float, bool]] = []
    for labels, resolution, score, fired in rows:
        if not isinstance(labels, dict):
            labels = effective_labels({category: {"fired": fired}}, "block" if resolution == "block" else "allow", None)
        if isinstance(labels.get(category), bool):
            labelled.append((float(score), labels[category]))
    return labelled


def curve(labelled: Sequence[tuple[float, bool]]) -> list[CurvePoint]:
    """Precision and recall of `score >= t` at each distinct labelled score t, lowest t first.

    With no positive label recall is undefined: no points."""
    positives = sum(1 for _, label in labelled if label)
    if positives == 0:
        return []
    points: list[CurvePoint] = []
    true_above = false_above = 0
    ordered = sorted(labelled, key=lambda pair: -pair[0])
    for index, (score, label) in enumerate(ordered):
        true_above += label
        false_above += not label
        if index + 1 < len(ordered) and ordered[index + 1][0] == score:
            continue  # ties: a threshold takes every job of that score at once
        points.append(
            CurvePoint(
                threshold=score,
                precision=round(true_above / (true_above + false_above), 6),
                recall=round(true_above / positives, 6),
            )
        )
    points.reverse()
    return points


def suggest(
    points: Sequence[CurvePoint], *, block_precision: float, review_recall: float
) -> tuple[float | None, float | None]:
    """(review, block): block at the lowest threshold whose precision meets the target (the most recall at that
    precision); review at the highest threshold whose recall meets the target (the fewest items to review),
    never above block (a score that blocks is never reviewed). None where no threshold meets its target."""
    block = next((p.threshold for p in points if p.precision >= block_precision and p.recall > 0), None)
    review = next((p.threshold for p in reversed(points) if p.recall >= review_recall), None)
    if review is not None and block is not None:
        review = min(review, block)
    return review, block


def thinned(points: Sequence[CurvePoint], most: int, keep: Sequence[CurvePoint | None] = ()) -> list[CurvePoint]:
    """At most about `most` points, evenly spaced along the curve, with both ends and the points in `keep` (the
    thresholds in use and suggested): the suggestion is computed on every point, the answer stays small."""
    if len(points) <= most:
        return list(points)
    step = (len(points) - 1) / (most - 1)
    chosen = {round(i * step) for i in range(most)}
    wanted = {point.threshold for point in keep if point is not None}
    return [point for index, point in enumerate(points) if index in chosen or point.threshold in wanted]


def point_at(points: Sequence[CurvePoint], threshold: float | None) -> CurvePoint | None:
    """Where `score >= threshold` sits on the curve: the point of the lowest labelled score at or above it (None
    without a threshold, or above every labelled score)."""
    if threshold is None:
        return None
    return next((point for point in points if point.threshold >= threshold), None)


def audit_precision(
    session: Session, *, tenant: str, policy: str, since: datetime
) -> dict[Literal["allow", "block"], MeasuredPrecision]:
    """Per automatic action (allow, block): how many audit items people resolved and how many they agreed with
    (erased jobs' left out)."""
    rows = session.exec(
        select(Decision.action, ReviewItem.resolution)
        .join(Decision, col(Decision.id) == col(ReviewItem.decision_id))
        .join(Job, col(Job.id) == col(ReviewItem.job_id))
        .where(
            col(Job.erased_at).is_(None),
            ReviewItem.tenant == tenant,
            ReviewItem.policy == policy,
            ReviewItem.kind == ReviewKind.AUDIT,
            ReviewItem.state == ReviewState.RESOLVED,
            col(ReviewItem.resolved_at) >= since,
        )
    ).all()
    measured: dict[Literal["allow", "block"], MeasuredPrecision] = {}
    actions: tuple[Literal["allow", "block"], ...] = ("allow", "block")
    for action in actions:
        sampled = [resolution for machine, resolution in rows if machine == action]
        agreed = sum(1 for resolution in sampled if resolution == action)
        low, high = wilson(agreed, len(sampled)) if sampled else (None, None)
        measured[action] = MeasuredPrecision(
            sampled=len(sampled),
            agreed=agreed,
            precision=round(agreed / len(sampled), 6) if sampled else None,
            low=low,
            high=high,
        )
    return measured


def wilson(successes: int, trials: int, z: float = WILSON_Z) -> tuple[float, float]:
    """The Wilson score interval of a proportion: sound at 0 and at 1, and for a few trials, where p +- z*se is not."""
    p = successes / trials
    denominator = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denominator
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denominator
    return round(max(0.0, centre - half), 6), round(min(1.0, centre + half), 6)
