"""The listing-level verdict: the decisions of a listing's photos, read together.

Photos of one listing show the item from several sides, so "does it match the description?" is a
question for the listing, not each photo: a close-up of a label need not match the title, as long as
some photo does. Categories made only of describe checks therefore take their listing-level action
from the best photo (the least severe); every other category from the worst photo, since one photo
of the wrong colour is enough to ask a person: the subject rule (policies/subject.py, shared with videos) on the
photos' typed decisions. Photos are numbered from 1, as a seller counts them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import ValidationError

from core.public import JobPublic
from policies.evaluate import CategoryResult, PolicyDecision
from policies.outputs import Contradiction, Evidence, Tag
from policies.subject import SubjectPart, subject_verdict

_NOUNS = {"color": "colour", "colour": "colour", "count": "number of items", "product_type": "kind of product"}


@dataclass(frozen=True)
class ListingImage:
    """One photo of a listing as stored: its position, job status, decision (API shape) or error."""

    index: int  # 0-based position in the listing
    status: str  # queued, running, done, failed
    decision: Mapping[str, Any] | None = None
    error: Mapping[str, Any] | None = None


def listing_verdict(images: Sequence[ListingImage]) -> dict[str, Any]:
    """The listing's status, action, whether some photo matches the description, findings and merged tags."""
    final = [image for image in images if image.status in ("done", "failed")]
    decided = [image for image in images if image.status == "done" and image.decision is not None]
    pending = len(images) - len(final)
    parts = [SubjectPart(image.index, stored_decision(image.decision or {})) for image in decided]
    describe_only = _describe_categories(parts)
    verdict = subject_verdict(parts, best_of=describe_only)
    findings: list[str] = []
    categories: dict[str, dict[str, Any]] = {}
    for name, category in verdict.categories.items():
        if name in describe_only and category.result.fired:
            findings.append(_no_match_sentence(_photos_with(parts, name), category.decided_by + 1))
        categories[name] = {"action": category.action, "photos": [position + 1 for position in category.fired_in]}
    for part in parts:
        findings.extend(_photo_findings(part, describe_only))
    for image in final:
        if image.status == "failed":
            error = image.error or {}
            findings.append(
                f"photo {_photo(image)} could not be checked: {error.get('message', 'failed')} ({error.get('code')})"
            )
    matches = None
    if describe_only:
        matches = all(categories[name]["action"] == "allow" for name in describe_only if name in categories)
    if pending:
        status = "pending"
    elif not decided and images:
        status = "failed"
    else:
        status = "done"
    return {
        "status": status,
        "action": verdict.action if status == "done" else None,
        "matches_description": matches if status == "done" else None,
        "findings": findings,
        "categories": categories,
        "tags": _merged_tags(parts),
        "photos": {"total": len(images), "decided": len(decided), "failed": len(final) - len(decided)},
    }


def stored_decision(decision: Mapping[str, Any]) -> PolicyDecision:
    """A stored decision (API shape) as the typed decision the subject rule reads. Lenient: an erased decision
    keeps only its action and category scores, and keys a later version adds are left out."""
    categories = {
        str(name): CategoryResult(
            score=float(result.get("score", 0.0)),
            action=result.get("action", "allow"),
            fired=bool(result.get("fired")),
            decided_by=result.get("decided_by"),
            reason=result.get("reason"),
        )
        for name, result in (decision.get("categories") or {}).items()
    }
    return PolicyDecision(
        action=decision.get("action", "allow"),
        categories=categories,
        evidence=[_known(Evidence, entry) for entry in decision.get("evidence") or []],
        policy=str(decision.get("policy", "")),
        policy_version=str(decision.get("policy_version", "")),
        tags=[_known(Tag, tag) for tag in decision.get("tags") or []],
        contradictions=[_known(Contradiction, item) for item in decision.get("contradictions") or []],
        reason=decision.get("reason") or "",
    )


def photos_verdict(photos: Sequence[JobPublic]) -> dict[str, Any]:
    """The verdict of a listing's photos as the API shows them (`core.public.ListingPublic.from_rows` takes it)."""
    return listing_verdict([_image(photo) for photo in photos])


def _image(photo: JobPublic) -> ListingImage:
    decision = photo.decision.model_dump(mode="json") if photo.decision is not None else None
    error = photo.error.model_dump(mode="json") if photo.error is not None else None
    return ListingImage(index=(photo.index or 1) - 1, status=photo.status, decision=decision, error=error)


Model = TypeVar("Model", Evidence, Tag, Contradiction)


# What a stored entry lacking a required key reads as (decisions written by hand, or by an older version).
_ABSENT: dict[str, Any] = {"category": "", "kind": "", "text": "", "score": 0.0, "field": "", "claimed": ""}
_ABSENT |= {"seen": None, "tag": "", "group": ""}


def _known(model: type[Model], values: Mapping[str, Any]) -> Model:
    """The stored entry as `model`: unknown keys left out, absent required ones neutral; as stored when it does not
    validate (the verdict reads stored decisions as they are, as it always has)."""
    known = {key: value for key, value in values.items() if key in model.model_fields}
    absent = {key: _ABSENT[key] for key in model.model_fields if key in _ABSENT and key not in known}
    try:
        return model.model_validate({**absent, **known})
    except ValidationError:
        return model.model_construct(**{**absent, **known})


def _photo(image: ListingImage) -> int:
    return image.index + 1


def _photos_with(parts: Sequence[SubjectPart], category: str) -> int:
    return sum(1 for part in parts if category in part.decision.categories)


def _describe_categories(parts: Sequence[SubjectPart]) -> set[str]:
    """Categories whose every evidence entry is a describe check (decided per listing, by the best photo)."""
    kinds: dict[str, set[str]] = {}
    for part in parts:
        for entry in part.decision.evidence:
            kinds.setdefault(entry.category, set()).add(entry.kind)
    return {name for name, found in kinds.items() if found == {"describe"}}


def _no_match_sentence(photos: int, closest: int) -> str:
    if photos == 1:
        return "the photo does not match the description"
    return f"no photo matches the description (the closest is photo {closest})"


def _photo_findings(part: SubjectPart, describe_only: set[str]) -> list[str]:
    photo = part.position + 1
    sentences: list[str] = []
    explained: set[str] = set()
    for contradiction in part.decision.contradictions:
        category = contradiction.category
        if category in describe_only:
            continue
        explained.add(category)
        field = contradiction.field
        noun = _NOUNS.get(field.rsplit(".", 1)[-1], field.rsplit(".", 1)[-1].replace("_", " "))
        seen = contradiction.seen
        detail = f": {seen}, the listing says {contradiction.claimed}" if seen else ""
        sentences.append(f"photo {photo} shows a different {noun}{detail}")
    for name, result in part.decision.categories.items():
        if result.fired and name not in explained and name not in describe_only:
            sentences.append(f"photo {photo}: {name} ({result.action}): {result.reason or ''}")
    return sentences


def _merged_tags(parts: Sequence[SubjectPart]) -> list[dict[str, Any]]:
    best: dict[tuple[str, str], dict[str, Any]] = {}
    for part in parts:
        for tag in part.decision.tags:
            key = (tag.group, tag.tag)
            if key not in best or best[key]["score"] < tag.score:
                best[key] = {**tag.model_dump(mode="json"), "photo": part.position + 1}
    return sorted(best.values(), key=lambda tag: -float(tag["score"]))
