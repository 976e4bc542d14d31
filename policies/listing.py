"""The listing-level verdict: the decisions of a listing's photos, read together.

Photos of one listing show the item from several sides, so "does it match the description?" is a
question for the listing, not each photo: a close-up of a label need not match the title, as long as
some photo does. Categories made only of describe checks therefore take their listing-level action
from the best photo (the least severe); every other category from the worst photo, since one photo
of the wrong colour is enough to ask a person. Photos are numbered from 1, as a seller counts them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from core.public import JobPublic, ListingPublic
from core.tables import Decision, Job, Listing
from policies.evaluate import SEVERITY

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
    findings: list[str] = []
    categories: dict[str, dict[str, Any]] = {}
    describe_only = _describe_categories(decided)
    for name in _category_names(decided):
        results = [(image, (image.decision or {}).get("categories", {}).get(name)) for image in decided]
        results = [(image, result) for image, result in results if result is not None]
        if not results:
            continue
        fired = [_photo(image) for image, result in results if result.get("fired")]
        if name in describe_only:
            best_image, best = min(results, key=lambda pair: (SEVERITY[pair[1]["action"]], pair[1]["score"]))
            action = best["action"]
            if best.get("fired"):
                findings.append(_no_match_sentence(len(results), _photo(best_image)))
        else:
            action = max((result["action"] for _, result in results), key=SEVERITY.__getitem__)
        categories[name] = {"action": action, "photos": fired}
    for image in decided:
        findings.extend(_photo_findings(image, describe_only))
    for image in final:
        if image.status == "failed":
            error = image.error or {}
            findings.append(
                f"photo {_photo(image)} could not be checked: {error.get('message', 'failed')} ({error.get('code')})"
            )
    matches = None
    if describe_only:
        matches = all(categories[name]["action"] == "allow" for name in describe_only if name in categories)
    action = max((c["action"] for c in categories.values()), key=SEVERITY.__getitem__, default="allow")
    if pending:
        status = "pending"
    elif not decided and images:
        status = "failed"
    else:
        status = "done"
    return {
        "status": status,
        "action": action if status == "done" else None,
        "matches_description": matches if status == "done" else None,
        "findings": findings,
        "categories": categories,
        "tags": _merged_tags(decided),
        "photos": {"total": len(images), "decided": len(decided), "failed": len(final) - len(decided)},
    }


def listing_public(listing: Listing, rows: Sequence[tuple[Job, Decision | None]]) -> ListingPublic:
    """The listing body (`GET /v1/listings/{id}`, and the listing's callback): core's shape, this module's verdict."""
    photos = ListingPublic.photos_of(rows)
    return ListingPublic.from_photos(listing, photos, listing_verdict([_image(photo) for photo in photos]))


def _image(photo: JobPublic) -> ListingImage:
    decision = photo.decision.model_dump(mode="json") if photo.decision is not None else None
    error = photo.error.model_dump(mode="json") if photo.error is not None else None
    return ListingImage(index=(photo.index or 1) - 1, status=photo.status, decision=decision, error=error)


def _photo(image: ListingImage) -> int:
    return image.index + 1


def _category_names(decided: Sequence[ListingImage]) -> list[str]:
    names: dict[str, None] = {}
    for image in decided:
        names.update(dict.fromkeys((image.decision or {}).get("categories", {})))
    return list(names)


def _describe_categories(decided: Sequence[ListingImage]) -> set[str]:
    """Categories whose every evidence entry is a describe check (decided per listing, by the best photo)."""
    kinds: dict[str, set[str]] = {}
    for image in decided:
        for entry in (image.decision or {}).get("evidence", []):
            kinds.setdefault(str(entry.get("category")), set()).add(str(entry.get("kind")))
    return {name for name, found in kinds.items() if found == {"describe"}}


def _no_match_sentence(photos: int, closest: int) -> str:
    if photos == 1:
        return "the photo does not match the description"
    return f"no photo matches the description (the closest is photo {closest})"


def _photo_findings(image: ListingImage, describe_only: set[str]) -> list[str]:
    decision = image.decision or {}
    sentences: list[str] = []
    explained: set[str] = set()
    for contradiction in decision.get("contradictions", []):
        category = str(contradiction.get("category"))
        if category in describe_only:
            continue
        explained.add(category)
        field = str(contradiction.get("field", ""))
        noun = _NOUNS.get(field.rsplit(".", 1)[-1], field.rsplit(".", 1)[-1].replace("_", " "))
        seen = contradiction.get("seen")
        detail = f": {seen}, the listing says {contradiction.get('claimed')}" if seen else ""
        sentences.append(f"photo {_photo(image)} shows a different {noun}{detail}")
    for name, result in decision.get("categories", {}).items():
        if result.get("fired") and name not in explained and name not in describe_only:
            sentences.append(f"photo {_photo(image)}: {name} ({result.get('action')}): {result.get('reason') or ''}")
    return sentences


def _merged_tags(decided: Sequence[ListingImage]) -> list[dict[str, Any]]:
    best: dict[tuple[str, str], dict[str, Any]] = {}
    for image in decided:
        for tag in (image.decision or {}).get("tags", []):
            key = (str(tag.get("group")), str(tag.get("tag")))
            if key not in best or best[key]["score"] < tag.get("score", 0):
                best[key] = {**tag, "photo": _photo(image)}
    return sorted(best.values(), key=lambda tag: -float(tag["score"]))
