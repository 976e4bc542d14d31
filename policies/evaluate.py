"""Pure evaluation: model outputs -> evidence (one entry per check) -> a decision (allow / review / block)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from core.errors import PolicyError
from policies.schema import (
    AttributeCheck,
    CaptionCheck,
    Category,
    DescribeCheck,
    MatchCheck,
    Policy,
    ProbeCheck,
    TagsCheck,
)

Action = Literal["allow", "review", "block"]
SEVERITY: dict[str, int] = {"allow": 0, "review": 1, "block": 2}
DECIMALS = 6
# float32 softmax outputs can land a hair outside [0, 1]; anything further out is a bug upstream.
_PROBABILITY_SLACK = 1e-4
_SHOWN_CHARS = 60


@dataclass(frozen=True)
class ModelOutputs:
    """What the engine computed for one image.

    `answers`: per answer query key, the log-likelihood of candidate answers (the decoder's sum of token
    log-probabilities, eos included): the required ones and every one that could be the best.
    `tags`: per tag set key, the ITM probability of each tag text the engine re-ranked (the top k of
    each group by ITC similarity).
    """

    caption: str | None = None
    probes: Mapping[str, float] = field(default_factory=dict)
    matches: Mapping[str, float] = field(default_factory=dict)
    answers: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    tags: Mapping[str, Mapping[str, float]] = field(default_factory=dict)


class Evidence(BaseModel):
    """One check's result. Scores are rounded to 6 decimals so that re-evaluating stored evidence is exact.

    `scores` keeps the model outputs behind the score (describe: ITM per chunk; attribute: log-likelihood
    per ranked answer; tags: ITM per re-ranked tag text), so a replay can reuse them instead of re-running models.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    category: str
    kind: str
    text: str  # the check's label: it identifies the check
    score: float = Field(ge=0.0, le=1.0, allow_inf_nan=False)
    weight: float = 1.0
    negate: bool = False  # probe, describe, attribute: the score is 1 - the model's number
    matched: str | None = None  # caption: the matched text; describe: the best chunk; tags: the best tag
    field: str | None = None  # describe: the context field of the best chunk; attribute: the claimed field
    claimed: str | None = None  # attribute: the claimed value, normalised onto the vocabulary
    seen: str | None = None  # attribute: the model's most likely answer
    scores: dict[str, float] | None = None
    query: str | None = None  # attribute: the answer query key; tags: the tag set key


class CategoryResult(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    score: float
    action: Action
    fired: bool
    decided_by: str | None  # the check that set the score (None when the score is 0)
    reason: str | None = None  # a sentence: which check decided, with what score, against which threshold


class Tag(BaseModel):
    """A tag the image was given: its name, its group in the taxonomy, and its ITM score."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    tag: str
    group: str
    score: float


class Contradiction(BaseModel):
    """A claim of the job's context that the photo contradicts, from a category that fired."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    category: str
    field: str  # "attributes.color", or the describe check's fields ("title, description")
    claimed: str  # the claimed value, or the description chunk that matched best
    seen: str | None  # what the model answered instead (attribute checks)
    score: float


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
                entry = _evidence(category, check, outputs, context)
            except _Missing as absent:
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
            if isinstance(check, TagsCheck):
                for tag in _tags(check, entry):
                    tag_key = (tag.group, tag.tag)
                    if tag_key not in tags or tags[tag_key].score < tag.score:
                        tags[tag_key] = tag
            elif result.fired:
                contradiction = _contradiction(category, check, entry)
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


# Evidence per check kind.


class _Missing(Exception):
    """An output the check needs is absent (collected, then reported together)."""


def _evidence(category: Category, check: Any, outputs: ModelOutputs, context: Mapping[str, Any] | None) -> Evidence:
    base: dict[str, Any] = {"category": category.name, "kind": check.kind, "text": check.label, "weight": check.weight}
    if isinstance(check, ProbeCheck):
        p_yes = outputs.probes.get(check.question)
        if p_yes is None:
            raise _Missing(f"probe {check.question!r}")
        p_yes = _probability(p_yes, f"the probe {check.question!r}")
        return Evidence(**base, score=_score(p_yes, check.negate), negate=check.negate)
    if isinstance(check, MatchCheck):
        p_match = outputs.matches.get(check.text)
        if p_match is None:
            raise _Missing(f"match {check.text!r}")
        return Evidence(**base, score=_score(_probability(p_match, f"the match text {check.text!r}"), False))
    if isinstance(check, CaptionCheck):
        if outputs.caption is None:
            raise _Missing("the caption")
        matched = check.find(outputs.caption)
        return Evidence(**base, score=check.score if matched is not None else 0.0, matched=matched)
    if isinstance(check, DescribeCheck):
        return _describe(base, check, outputs, context)
    if isinstance(check, AttributeCheck):
        return _attribute(base, check, outputs, context)
    assert isinstance(check, TagsCheck)
    return _tagging(base, check, outputs)


def _describe(
    base: dict[str, Any], check: DescribeCheck, outputs: ModelOutputs, context: Mapping[str, Any] | None
) -> Evidence:
    chunks = check.chunks(context)
    if not chunks:  # nothing to compare with: the check does not apply to this job
        return Evidence(**base, score=0.0, negate=check.negate, scores={})
    absent = [chunk for _, chunk in chunks if chunk not in outputs.matches]
    if absent:
        raise _Missing(f"describe text {absent[0]!r}")
    scores = {chunk: _probability(outputs.matches[chunk], f"the describe text {chunk!r}") for _, chunk in chunks}
    best_field, best_chunk = max(chunks, key=lambda pair: scores[pair[1]])
    return Evidence(
        **base,
        score=_score(scores[best_chunk], check.negate),
        negate=check.negate,
        matched=best_chunk,
        field=best_field,
        scores=scores,
    )


def _attribute(
    base: dict[str, Any], check: AttributeCheck, outputs: ModelOutputs, context: Mapping[str, Any] | None
) -> Evidence:
    claimed = check.claim(context)
    if claimed is None:  # no claim: the check does not apply to this job
        return Evidence(**base, score=0.0, negate=check.negate, field=check.field)
    query = check.answer_query(claimed)
    likelihoods = outputs.answers.get(query.key)
    if likelihoods is None or claimed not in likelihoods:
        raise _Missing(f"the likelihood of {claimed!r} as the answer to {check.question!r}")
    values: dict[str, float] = {}
    for candidate, value in likelihoods.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not _log_probability(float(value)):
            raise PolicyError(
                f"the log-likelihood of {candidate!r} for {check.question!r} is {value!r}, not a number <= 0",
                code="evidence_invalid",
            )
        values[candidate] = float(value)
    agreement, best = check.agreement(claimed, values)
    return Evidence(
        **base,
        score=_score(agreement, check.negate),
        negate=check.negate,
        field=check.field,
        claimed=claimed,
        seen=best,
        scores=values,
        query=query.key,
    )


def _tagging(base: dict[str, Any], check: TagsCheck, outputs: ModelOutputs) -> Evidence:
    tag_set = check.tag_set()
    scored = outputs.tags.get(tag_set.key)
    if scored is None:
        raise _Missing(f"tags {check.label!r}")
    names = {entry.text: entry.name for entry in check.entries}
    scores = {text: _probability(value, f"the tag text {text!r}") for text, value in scored.items() if text in names}
    if not scores:
        return Evidence(**base, score=0.0, scores={}, query=tag_set.key)
    best = max(scores, key=scores.__getitem__)
    return Evidence(**base, score=_score(scores[best], False), matched=names[best], scores=scores, query=tag_set.key)


def _tags(check: TagsCheck, entry: Evidence) -> list[Tag]:
    by_text = {tag.text: tag for tag in check.entries}
    found = []
    for text, score in (entry.scores or {}).items():
        tag = by_text.get(text)
        if tag is not None and score >= check.min_score:
            found.append(Tag(tag=tag.name, group=tag.group, score=round(score, DECIMALS)))
    return found


def _contradiction(category: Category, check: Any, entry: Evidence) -> Contradiction | None:
    if isinstance(check, AttributeCheck) and entry.claimed is not None and entry.seen != entry.claimed:
        return Contradiction(
            category=category.name, field=check.field, claimed=entry.claimed, seen=entry.seen, score=entry.score
        )
    if isinstance(check, DescribeCheck) and check.negate and entry.matched is not None:
        return Contradiction(
            category=category.name,
            field=", ".join(check.fields),
            claimed=entry.matched,
            seen=None,
            score=entry.score,
        )
    return None


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
        how = "no check scored above 0" if count > 1 else _named(entries[0])
    else:
        entry = entries[decider]
        named = _named(entry)
        if category.combine == "max":
            how = named + (f", the highest of {count} checks" if count > 1 else "")
        elif category.combine == "mean":
            how = f"the mean of {count} checks is {score:g}; the highest is {named}"
        elif category.combine == "weighted":
            how = f"the weighted mean of {count} checks is {score:g}; the largest share is {named} x {entry.weight:g}"
        else:
            how = f"all {count} checks must be high and the lowest is {named}" if count > 1 else named
    return f"{how}; {_threshold_clause(score, action, category.review, category.block)}"


def _named(entry: Evidence) -> str:
    label = entry.text.removeprefix(f"{entry.kind} ")  # "describe title, description" -> "title, description"
    text = f"{entry.kind} {_shorten(label)!r} scored {entry.score:g}"
    if entry.kind == "attribute" and entry.claimed is not None:
        text += f" (claimed {entry.claimed!r}, the model answers {entry.seen!r})"
    elif entry.kind == "attribute":
        text += f" ({entry.field} not given)"
    elif entry.kind in ("describe", "tags", "caption") and entry.matched is not None:
        text += f" (best: {_shorten(entry.matched)!r})"
    return text


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


def _score(value: float, negate: bool) -> float:
    return round(1.0 - value if negate else value, DECIMALS)


def _log_probability(value: float) -> bool:
    return math.isfinite(value) and value <= 1e-6


def _shorten(text: str) -> str:
    return text if len(text) <= _SHOWN_CHARS else text[: _SHOWN_CHARS - 3] + "..."


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
