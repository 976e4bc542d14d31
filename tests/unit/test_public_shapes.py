"""The public JSON shapes (core/public.py): exact, built from rows, and in step with what the domain writes."""

from __future__ import annotations

import pytest
from fastapi.routing import APIRoute, iter_route_contexts
from pydantic import ValidationError

from api.app import create_app
from core.public import CategoryResult, DecisionPublic, JobPublic, ListingPublic, ListingVerdict
from core.settings import Settings
from core.tables import Decision, Job, Listing
from policies import CategoryResult as PolicyCategoryResult
from policies.listing import ListingImage, listing_verdict, photos_verdict


def decision_row(job_id: str, categories: dict[str, dict[str, object]]) -> Decision:
    return Decision(
        job_id=job_id,
        action="review",
        policy="listing",
        policy_version="v1",
        categories=categories,
        evidence=[{"category": "colour", "kind": "attribute", "text": "what colour is it?", "score": 0.8}],
        tags=[{"tag": "mug", "group": "product", "score": 0.7}],
        contradictions=[{"category": "colour", "field": "attributes.color", "claimed": "red", "seen": "blue"}],
        reason="colour decided by attribute",
    )


REVIEW = {"score": 0.8, "action": "review", "fired": True, "decided_by": "attribute: colour", "reason": "0.8 >= 0.5"}


def test_the_category_shape_declares_every_key_a_policy_writes() -> None:
    # The worker stores policies.PolicyCategoryResult dumps; the public shape must show each of their keys.
    assert set(CategoryResult.model_fields) == set(PolicyCategoryResult.model_fields)
    stored = PolicyCategoryResult(score=0.8, action="review", fired=True, decided_by="probe: gun?", reason="r")
    assert CategoryResult.model_validate(stored.model_dump(mode="json")).model_dump() == stored.model_dump()


def test_a_decision_is_shown_exactly_and_an_undeclared_key_is_refused() -> None:
    row = decision_row("j1", {"colour": REVIEW})
    body = DecisionPublic.from_row(row).model_dump(mode="json")
    assert body["categories"] == {"colour": REVIEW}
    assert body["contradictions"] == row.contradictions and body["reason"] == row.reason
    assert body["decided_at"].endswith("+00:00")
    with pytest.raises(ValidationError):  # a key nobody declared never leaves the system unnoticed
        DecisionPublic.from_row(decision_row("j2", {"colour": {**REVIEW, "surprise": 1}}))


def test_index_is_only_in_a_listings_photos() -> None:
    listing = Listing(policy="listing", title="Red mug", attributes={"color": "red"}, image_count=2)
    photos = [
        Job(policy="listing", source="url", image_url=f"https://x.test/{i}.jpg", listing_id=listing.id, listing_index=i)
        for i in range(2)
    ]
    photos[0].status = "done"
    alone = JobPublic.from_row(photos[0], None).model_dump(mode="json")
    assert "index" not in alone and alone["listing"] == {"id": listing.id, "index": 0}

    rows = [(photos[0], decision_row(photos[0].id, {"colour": REVIEW})), (photos[1], None)]
    body = ListingPublic.from_rows(listing, rows, photos_verdict)
    shown = body.model_dump(mode="json")
    assert [photo["index"] for photo in shown["photos"]] == [1, 2]
    assert {key for key in shown["photos"][0] if key != "index"} == set(alone)
    assert shown["verdict"]["status"] == "pending" and shown["verdict"]["photos"] == {
        "total": 2,
        "decided": 1,
        "failed": 0,
    }
    assert ListingPublic.model_validate(shown).model_dump(mode="json") == shown


def test_the_listing_verdict_shape_declares_every_key_the_verdict_has() -> None:
    decision = DecisionPublic.from_row(decision_row("j1", {"colour": REVIEW})).model_dump(mode="json")
    verdict = listing_verdict([ListingImage(0, "done", decision), ListingImage(1, "failed", error={"code": "x"})])
    assert ListingVerdict.model_validate(verdict).model_dump(mode="json") == verdict
    assert verdict["categories"] == {"colour": {"action": "review", "photos": [1]}}


def test_every_json_route_answers_with_a_public_shape() -> None:
    # One owner of each shape: a route that answers JSON declares a model from core.public (read_policy's
    # free-form policy document excepted), and so does every documented error body.
    owners: dict[str, str] = {}
    for context in iter_route_contexts(create_app(Settings(_env_file=None)).routes):
        route = context.original_route
        if not isinstance(route, APIRoute) or route.response_model is None:
            continue
        models = [route.response_model, *(r["model"] for r in route.responses.values() if "model" in r)]
        for model in models:
            owners[f"{context.path} {getattr(model, '__name__', model)}"] = getattr(model, "__module__", "")
    assert owners and "/v1/jobs JobPublic" in owners
    assert {name: module for name, module in owners.items() if module != "core.public"} == {
        "/v1/policies/{name} dict": "builtins"
    }
