"""Pure evaluation: model outputs -> evidence (one entry per check) -> a decision (allow / review / block)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from core.errors import PolicyError
from policies.schema import Category, MatchCheck, Policy, ProbeCheck

Action = Literal["allow", "review", "block"]
SEVERITY: dict[str, int] = {"allow": 0, "review": 1, "block": 2}
DECIMALS = 6
# float32 softmax outputs can land a hair outside [0, 1]; anything further out is a bug upstream.
_PROBABILITY_SLACK = 1e-4


@dataclass(frozen=True)
class ModelOutputs:
    """What the engine computed for one image: its caption, P(yes) per question, ITM probability per text."""

    caption: str | None = None
    probes: Mapping[str, float] = field(default_factory=dict)
    matches: Mapping[str, float] = field(default_factory=dict)


class Evidence(BaseModel):
    """One check's result. Scores are rounded to 6 decimals so that re-evaluating stored evidence is exact."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    category: str
    kind: str
    text: str  # the question, the match text, or the caption rule's label: it identifies the check
    score: float = Field(ge=0.0, le=1.0, allow_inf_nan=False)
    weight: float = 1.0
    negate: bool = False  # probe only: the score is 1 - P(yes)
    matched: str | None = None  # caption only: the caption text the rule matched


class CategoryResult(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    score: float
    action: Action
    fired: bool
    decided_by: str | None  # the check that set the score (None when the score is 0)


class PolicyDecision(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    action: Action
    categories: dict[str, CategoryResult]
    evidence: list[Evidence]
    policy: str
    policy_version: str


def collect_evidence(policy: Policy, outputs: ModelOutputs) -> list[Evidence]:
    """One evidence entry per check, in policy order; PolicyError `evidence_missing` when an output is absent."""
    missing: list[str] = []
    evidence: list[Evidence] = []
    for category in policy.categories:
        for check in category.checks:
            matched: str | None = None
            negate = False
            if isinstance(check, ProbeCheck):
                p_yes = outputs.probes.get(check.question)
                if p_yes is None:
                    missing.append(f"probe {check.question!r}")
                    continue
                negate = check.negate
                p_yes = _probability(p_yes, f"the probe {check.question!r}")
                score = 1.0 - p_yes if negate else p_yes
            elif isinstance(check, MatchCheck):
                p_match = outputs.matches.get(check.text)
                if p_match is None:
                    missing.append(f"match {check.text!r}")
                    continue
                score = _probability(p_match, f"the match text {check.text!r}")
            else:
                if outputs.caption is None:
                    missing.append("the caption")
                    continue
                matched = check.find(outputs.caption)
                score = check.score if matched is not None else 0.0
            evidence.append(
                Evidence(
                    category=category.name,
                    kind=check.kind,
                    text=check.label,
                    score=round(score, DECIMALS),
                    weight=check.weight,
                    negate=negate,
                    matched=matched,
                )
            )
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
        results[category.name] = _category_result(category, entries)
        ordered.extend(entries)
    if by_check:
        stray_category, kind, text = next(iter(by_check))
        raise PolicyError(
            f"evidence for {kind} {text!r} in category '{stray_category}' matches no check of policy '{policy.name}' "
            f"version {policy.version}; was it collected with another version?",
            code="evidence_mismatch",
        )

    action: Action = max((result.action for result in results.values()), key=SEVERITY.__getitem__, default="allow")
    return PolicyDecision(
        action=action, categories=results, evidence=ordered, policy=policy.name, policy_version=policy.version
    )


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
    )


def _action(score: float, review: float | None, block: float | None) -> Action:
    if block is not None and score >= block:
        return "block"
    if review is not None and score >= review:
        return "review"
    return "allow"


def _probability(value: object, what: str) -> float:
    # numbers.Real admits numpy scalars (float32 is not a float subclass); bool is a Real but not a probability.
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise PolicyError(f"the model output for {what} is {value!r}, not a probability", code="evidence_invalid")
    value = float(value)
    if not -_PROBABILITY_SLACK <= value <= 1.0 + _PROBABILITY_SLACK:
        raise PolicyError(
            f"the model output for {what} is {value}, outside [0, 1]; the engine must return probabilities",
            code="evidence_invalid",
        )
    return min(max(float(value), 0.0), 1.0)
