"""Pure evaluation: model outputs -> evidence (one entry per check) -> a decision (allow / review / block)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from core.errors import PolicyError
from policies.checks.base import DECIMALS, BaseCheck, MissingOutput, shorten
from policies.outputs import Contradiction, Evidence, ModelOutputs, Tag
from policies.schema import Category, Policy

Action = Literal["allow", "review", "block"]
SEVERITY: dict[str, int] = {"allow": 0, "review": 1, "block": 2}


class CategoryResult(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    score: float
    action: Action
    fired: bool
    decided_by: str | None  # the check that set the score (None when the score is 0)
    reason: str | None = None  # a sentence: which check decided, with what score, against which threshold


class PolicyDecision(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    action: Action
    categories: dict[str, CategoryResult]
    evidence: list[Evidence]
    policy: str
    policy_version: str
    tags: list[Tag] = Field(default_factory=list)
    contradictions: list[Contradiction] = Field(default_factory=list)
    reason: str = ""


def collect_evidence(policy: Policy, outputs: ModelOutputs, context: Mapping[str, Any] | None = None) -> list[Evidence]:
    """One evidence entry per check, in policy order; PolicyError `evidence_missing` when an output is absent.

    `context` is the job's context: describe and attribute checks read it (a check whose field is
    absent scores 0: it does not apply to this job).
    """
    missing: list[str] = []
    evidence: list[Evidence] = []
    for category in policy.categories:
        for check in category.checks:
            try:
                entry = check.evidence(category.name, outputs, context)
            except MissingOutput as absent:
                missing.append(str(absent))
                continue
            except ValueError as exc:  # a context value checks cannot read
                raise PolicyError(str(exc), code="context_invalid") from None
            evidence.append(entry)
    if missing:
        shown = ", ".join(dict.fromkeys(missing))
        raise PolicyError(
            f"policy '{policy.name}' needs outputs the model did not provide: {shown}; "
            "compute everything in Policy.requirements() before evaluating",
            code="evidence_missing",
        )
    return evidence


def evaluate(evidence: Sequence[Evidence], policy: Policy) -> PolicyDecision:
    """Combine evidence into category scores and actions, and the most severe category action overall.

    Pure and deterministic: the same evidence and policy always give the same decision. Evidence is
    matched to checks by (category, kind, text); every check needs exactly one entry.
    """
    by_check: dict[tuple[str, str, str], Evidence] = {}
    for entry in evidence:
        key = (entry.category, entry.kind, entry.text)
        if key in by_check:
            raise PolicyError(
                f"evidence for {entry.kind} {entry.text!r} in category '{entry.category}' is given twice",
                code="evidence_mismatch",
            )
        by_check[key] = entry

    ordered: list[Evidence] = []
    results: dict[str, CategoryResult] = {}
    tags: dict[tuple[str, str], Tag] = {}
    contradictions: list[Contradiction] = []
    for category in policy.categories:
        entries: list[Evidence] = []
        for check in category.checks:
            found = by_check.pop((category.name, check.kind, check.label), None)
            if found is None:
                raise PolicyError(
                    f"no evidence for the {check.kind} check {check.label!r} of category '{category.name}' "
                    f"(policy '{policy.name}' version {policy.version})",
                    code="evidence_missing",
                )
            entries.append(found.model_copy(update={"score": round(found.score, DECIMALS), "weight": check.weight}))
        result = _category_result(category, entries)
        results[category.name] = result
        ordered.extend(entries)
        for check, entry in zip(category.checks, entries, strict=True):
            for tag in check.tags_from(entry):
                tag_key = (tag.group, tag.tag)
                if tag_key not in tags or tags[tag_key].score < tag.score:
                    tags[tag_key] = tag
            contradiction = check.contradiction(category.name, entry) if result.fired else None
            if contradiction is not None:
                contradictions.append(contradiction)
    if by_check:
        stray_category, kind, text = next(iter(by_check))
        raise PolicyError(
            f"evidence for {kind} {text!r} in category '{stray_category}' matches no check of policy '{policy.name}' "
            f"version {policy.version}; was it collected with another version?",
            code="evidence_mismatch",
        )

    action: Action = max((result.action for result in results.values()), key=SEVERITY.__getitem__, default="allow")
    return PolicyDecision(
        action=action,
        categories=results,
        evidence=ordered,
        policy=policy.name,
        policy_version=policy.version,
        tags=sorted(tags.values(), key=lambda tag: -tag.score),
        contradictions=contradictions,
        reason=_decision_reason(action, results),
    )


def decide(policy: Policy, outputs: ModelOutputs, context: Mapping[str, Any] | None = None) -> PolicyDecision:
    """collect_evidence then evaluate: the decision a policy makes on one image's model outputs."""
    return evaluate(collect_evidence(policy, outputs, context), policy)


def decide_early(
    policy: Policy, outputs: ModelOutputs, context: Mapping[str, Any] | None = None
) -> PolicyDecision | None:
    """A block decided before any model runs, from the categories made only of model-free checks (hash banks).

    When one of those categories blocks, nothing the models could add changes the action (block is the most
    severe), so the decision holds those categories only and the models never run. None otherwise.
    """
    decision = decide_model_free(policy, outputs, context)
    return decision if decision is not None and decision.action == "block" else None


def decide_model_free(
    policy: Policy, outputs: ModelOutputs, context: Mapping[str, Any] | None = None
) -> PolicyDecision | None:
    """The decision of the policy's categories made only of model-free checks (hash banks), whatever its action;
    None when the policy has no such category. A video's frames are read this way before any model runs."""
    early = [category for category in policy.categories if all(check.model_free for check in category.checks)]
    if not early:
        return None
    partial = policy.model_copy(update={"categories": early})
    return evaluate(collect_evidence(partial, outputs, context), partial)


# Combination and reasons.


def _category_result(category: Category, entries: list[Evidence]) -> CategoryResult:
    scores = [entry.score for entry in entries]
    weights = [entry.weight for entry in entries]
    if category.combine == "max":
        score = max(scores)
        decider = scores.index(score)
    elif category.combine == "mean":
        score = math.fsum(scores) / len(scores)
        decider = scores.index(max(scores))
    elif category.combine == "weighted":
        contributions = [w * s for w, s in zip(weights, scores, strict=True)]
        score = math.fsum(contributions) / math.fsum(weights)
        decider = contributions.index(max(contributions))
    else:  # "all": every check must be high, so the weakest one decides
        score = min(scores)
        decider = scores.index(score)
    score = round(min(max(score, 0.0), 1.0), DECIMALS)
    action = _action(score, category.review, category.block)
    return CategoryResult(
        score=score,
        action=action,
        fired=action != "allow",
        decided_by=entries[decider].text if score > 0 else None,
        reason=_category_reason(category, entries, decider, score, action),
    )


def _category_reason(category: Category, entries: list[Evidence], decider: int, score: float, action: str) -> str:
    count = len(entries)
    if score <= 0:
        how = "no check scored above 0" if count > 1 else _named(category.checks[0], entries[0])
    else:
        entry = entries[decider]
        named = _named(category.checks[decider], entry)
        if category.combine == "max":
            how = named + (f", the highest of {count} checks" if count > 1 else "")
        elif category.combine == "mean":
            how = f"the mean of {count} checks is {score:g}; the highest is {named}"
        elif category.combine == "weighted":
            how = f"the weighted mean of {count} checks is {score:g}; the largest share is {named} x {entry.weight:g}"
        else:
            how = f"all {count} checks must be high and the lowest is {named}" if count > 1 else named
    return f"{how}; {_threshold_clause(score, action, category.review, category.block)}"


def _named(check: BaseCheck, entry: Evidence) -> str:
    label = entry.text.removeprefix(f"{entry.kind} ")  # "describe title, description" -> "title, description"
    return f"{entry.kind} {shorten(label)!r} scored {entry.score:g}" + check.explain(entry)


def _threshold_clause(score: float, action: str, review: float | None, block: float | None) -> str:
    if review is None and block is None:
        return "this category reports tags and never acts"
    if action == "block":
        return f"{score:g} >= block {block:g}"
    if action == "review":
        below = f", below block {block:g}" if block is not None else " (this category never blocks)"
        return f"{score:g} >= review {review:g}{below}"
    first = review if review is not None else block
    return f"{score:g} is below {'review' if review is not None else 'block'} {first:g}"


def _decision_reason(action: str, results: Mapping[str, CategoryResult]) -> str:
    if not results:
        return "allow: the policy has no categories"
    if action != "allow":
        name, result = max(((n, r) for n, r in results.items() if r.action == action), key=lambda item: item[1].score)
        others = sum(1 for n, r in results.items() if r.fired and n != name)
        more = f" ({others} more categor{'y' if others == 1 else 'ies'} fired)" if others else ""
        return f"{action} by '{name}': {result.reason}{more}"
    name, result = max(results.items(), key=lambda item: item[1].score)
    return f"allow: no category reached a threshold; the highest is '{name}': {result.reason}"


def _action(score: float, review: float | None, block: float | None) -> Action:
    if block is not None and score >= block:
        return "block"
    if review is not None and score >= review:
        return "review"
    return "allow"
