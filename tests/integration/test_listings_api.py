"""Listings, context checks, shadow agreement and policy reload through the HTTP API (real HTTP, Redis, SQLite and
PostgreSQL). The worker side of listings runs in test_listings_pipeline.py."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from PIL import Image
from sqlmodel import col, select

from core.db import session_scope
from core.jobs import store_decision
from core.queues import Queue
from core.tables import Decision, Job, Listing, ShadowDecision
from tests.support import waiting
from tests.support.api import Api, admin_key, assert_error
from tests.support.jobs import claimed_url_job

pytestmark = pytest.mark.timeout(120)

MAX_IMAGES = 3
SHADOW = """\
name: moderation-next
description: A stricter candidate for moderation.
shadows: moderation
categories:
  - {name: weapons, description: Guns., review: 0.3, checks: [{kind: probe, question: 'is there a gun?'}]}
"""


@pytest.fixture(scope="module")
def api_overrides(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A policies folder holding a shadow of `moderation` (a test rewrites it to see a reload)."""
    policies_dir = tmp_path_factory.mktemp("listings-policies")
    (policies_dir / "next.yaml").write_text(SHADOW)
    return {
        "policies_dir": policies_dir,
        "max_upload_bytes": 200_000,
        "listing_max_images": MAX_IMAGES,
        "policy_reload_s": 0,
    }


def post_listing(api: Api, photos: list[bytes], **fields: str) -> httpx.Response:
    files = [("images", (f"p{i}.jpg", data, "image/jpeg")) for i, data in enumerate(photos)]
    return api.client.post("/v1/listings", files=files, data=fields)


def jpeg(colour: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), colour).save(buffer, format="JPEG")
    return buffer.getvalue()


def test_a_listing_becomes_one_job_per_photo_with_its_text_as_context(api: Api) -> None:
    api.redis.delete(Queue.INFERENCE.value)
    response = post_listing(
        api,
        [jpeg(), jpeg((0, 0, 200)), jpeg((0, 200, 0))],
        title="  Red ceramic mug ",
        description="Holds 300 ml. Dishwasher safe.",
        attributes=json.dumps({"color": "red", "count": 1}),
    )
    assert response.status_code == 202, response.text
    listing = response.json()
    assert response.headers["Location"] == f"/v1/listings/{listing['id']}"
    assert listing["title"] == "Red ceramic mug" and listing["attributes"] == {"color": "red", "count": 1}
    assert listing["policy"] == "listing" and listing["policy_version"]
    assert [photo["index"] for photo in listing["photos"]] == [1, 2, 3]
    assert listing["verdict"]["status"] == "pending" and listing["verdict"]["action"] is None
    with session_scope(api.db_url) as session:
        jobs = session.exec(select(Job).where(Job.listing_id == listing["id"]).order_by(col(Job.listing_index))).all()
        assert [job.listing_index for job in jobs] == [0, 1, 2]
        assert all(job.status == "queued" and job.policy == "listing" for job in jobs)
        assert jobs[0].context == {
            "title": "Red ceramic mug",
            "description": "Holds 300 ml. Dishwasher safe.",
            "attributes": {"color": "red", "count": 1},
        }
        assert len({job.blob_key for job in jobs}) == 3
    assert api.redis.llen(Queue.INFERENCE.value) == 3
    again = api.client.get(f"/v1/listings/{listing['id']}")
    assert again.status_code == 200 and again.json()["photos"][1]["listing"] == {"id": listing["id"], "index": 1}


def test_json_listings_fetch_image_urls(api: Api) -> None:
    body = {"image_urls": ["https://example.com/a.jpg", "https://example.com/b.png"], "title": "A lamp"}
    response = api.client.post("/v1/listings", json=body)
    assert response.status_code == 202, response.text
    assert [photo["source"] for photo in response.json()["photos"]] == ["url", "url"]
    assert_error(api.client.post("/v1/listings", json={**body, "image_urls": ["ftp://x/a.jpg"]}), 422, "url_invalid")
    assert_error(api.client.post("/v1/listings", json={**body, "attributes": [1]}), 422, "invalid_attributes")
    unknown = assert_error(api.client.post("/v1/listings", json={**body, "extra": 1}), 422, "unknown_field")
    assert "'extra'" in unknown["detail"]


def test_the_same_idempotency_key_returns_the_same_listing(api: Api) -> None:
    headers = {"Idempotency-Key": "listing-42"}
    files = [("images", ("a.jpg", jpeg(), "image/jpeg"))]
    first = api.client.post("/v1/listings", files=files, data={"title": "A mug"}, headers=headers)
    second = api.client.post("/v1/listings", files=files, data={"title": "A mug"}, headers=headers)
    assert (first.status_code, second.status_code) == (202, 200)
    assert first.json()["id"] == second.json()["id"] and second.headers["Idempotent-Replayed"] == "true"
    with session_scope(api.db_url) as session:
        assert len(session.exec(select(Job).where(Job.listing_id == first.json()["id"])).all()) == 1


def test_an_idempotency_key_reused_for_another_listing_is_a_conflict(api: Api) -> None:
    headers = {"Idempotency-Key": "listing-conflict"}
    files = [("images", ("a.jpg", jpeg(), "image/jpeg"))]
    assert api.client.post("/v1/listings", files=files, data={"title": "A mug"}, headers=headers).status_code == 202
    other_text = api.client.post("/v1/listings", files=files, data={"title": "A bowl"}, headers=headers)
    assert_error(other_text, 409, "idempotency_conflict")
    two = [*files, ("images", ("b.jpg", jpeg(), "image/jpeg"))]
    assert_error(
        api.client.post("/v1/listings", files=two, data={"title": "A mug"}, headers=headers),
        409,
        "idempotency_conflict",
    )
    same = api.client.post("/v1/listings", files=files, data={"title": " A mug "}, headers=headers)
    assert same.status_code == 200 and same.headers["Idempotent-Replayed"] == "true"


@pytest.mark.parametrize(
    ("photos", "fields", "status", "code"),
    [
        ([], {"title": "x"}, 422, "image_missing"),
        ([b"jpeg"] * (MAX_IMAGES + 1), {"title": "x"}, 422, "too_many_images"),
        ([b"jpeg"] * (MAX_IMAGES + 5), {"title": "x"}, 422, "too_many_images"),
        ([b"jpeg"], {}, 422, "title_missing"),
        ([b"jpeg"], {"title": "   "}, 422, "title_missing"),
        ([b"jpeg"], {"title": "a\x00b"}, 422, "invalid_field"),
        ([b"jpeg"], {"title": "x" * 501}, 422, "invalid_field"),
        ([b"jpeg"], {"title": "x", "attributes": "{not json"}, 400, "invalid_attributes"),
        ([b"jpeg"], {"title": "x", "attributes": "[1, 2]"}, 422, "invalid_attributes"),
        ([b"jpeg"], {"title": "x", "attributes": '{"Colour": "red"}'}, 422, "invalid_attributes"),
        ([b"jpeg"], {"title": "x", "attributes": '{"color": {"r": 1}}'}, 422, "invalid_attributes"),
        ([b"jpeg"], {"title": "x", "attributes": '{"color": true}'}, 422, "invalid_attributes"),
        ([b"jpeg"], {"title": "x", "policy": "nope"}, 404, "policy_not_found"),
        ([b"jpeg", b"not an image at all"], {"title": "x"}, 415, "image_unsupported"),
    ],
)
def test_bad_listings_are_refused_before_anything_is_stored(
    api: Api, photos: list[bytes], fields: dict[str, str], status: int, code: str
) -> None:
    with session_scope(api.db_url) as session:
        before = len(session.exec(select(Listing)).all())
    real = [jpeg() if data == b"jpeg" else data for data in photos]
    # Without files httpx sends a form as urlencoded; no photos is sent as JSON instead.
    sent = (
        post_listing(api, real, **fields)
        if real
        else api.client.post("/v1/listings", json={"image_urls": [], **fields})
    )
    body = assert_error(sent, status, code)
    if code == "image_unsupported":
        assert body["detail"].startswith("photo 2: ")
    with session_scope(api.db_url) as session:
        assert len(session.exec(select(Listing)).all()) == before


def test_listing_transport_errors(api: Api) -> None:
    assert_error(
        api.client.post("/v1/listings", content=b"x", headers={"Content-Type": "text/plain"}),
        415,
        "unsupported_media_type",
    )
    files = [("images", ("a.jpg", jpeg(), "image/jpeg")), ("image", ("b.jpg", jpeg(), "image/jpeg"))]
    assert_error(api.client.post("/v1/listings", files=files, data={"title": "x"}), 422, "invalid_field")
    big = [("images", ("a.jpg", b"\xff" * 300_000, "image/jpeg"))]
    assert_error(api.client.post("/v1/listings", files=big, data={"title": "x"}), 413, "image_too_large")
    assert_error(api.client.get("/v1/listings/nope"), 404, "listing_not_found")
    assert_error(api.client.get("/v1/listings/' OR 1=1"), 404, "listing_not_found")


def test_listings_are_tenant_scoped(api: Api) -> None:
    listing = post_listing(api, [jpeg()], title="A mug").json()
    other = {"Authorization": f"Bearer {admin_key(api.db_url, tenant='other')}"}
    assert_error(httpx.get(f"{api.base_url}/v1/listings/{listing['id']}", headers=other), 404, "listing_not_found")
    reviewer = {"Authorization": f"Bearer {admin_key(api.db_url, role='review')}"}
    assert httpx.get(f"{api.base_url}/v1/listings/{listing['id']}", headers=reviewer).status_code == 200
    refused = httpx.post(
        f"{api.base_url}/v1/listings", headers=reviewer, files=[("images", ("a.jpg", jpeg()))], data={"title": "x"}
    )
    assert_error(refused, 403, "forbidden")
    assert_error(httpx.get(f"{api.base_url}/v1/listings/{listing['id']}"), 401, "auth_required")


def test_jobs_for_a_listing_policy_need_its_context(api: Api) -> None:
    files = {"image": ("a.jpg", jpeg(), "image/jpeg")}
    body = assert_error(api.client.post("/v1/jobs", files=files, data={"policy": "listing"}), 422, "context_missing")
    assert "'title' or 'description'" in body["detail"]
    sent = api.client.post("/v1/jobs", files=files, data={"policy": "listing", "context": json.dumps({"title": ["x"]})})
    assert_error(sent, 422, "context_missing")
    ok = api.client.post("/v1/jobs", files=files, data={"policy": "listing", "context": json.dumps({"title": "A mug"})})
    assert ok.status_code == 202, ok.text
    assert api.client.post("/v1/jobs", files=files).status_code == 202  # moderation reads no context


def test_shadow_agreement_counts_what_the_shadow_would_have_done(api: Api) -> None:
    pairs = [("allow", "allow"), ("allow", "review"), ("review", "review"), ("block", "review"), ("allow", None)]
    for tenant in ("default", "other"):
        for active, shadowed in pairs:
            seed_shadow(api.db_url, tenant, active, shadowed)
    report = api.client.get("/v1/policies/moderation/shadow")
    assert report.status_code == 200, report.text
    body = report.json()
    assert body["policy"] == "moderation" and body["shadows"] == ["moderation-next"]
    [summary] = body["data"]
    # 4 compared (the error is apart), 2 agree: allow/allow and review/review
    assert (summary["compared"], summary["agreed"], summary["agreement"], summary["errors"]) == (4, 2, 0.5, 1)
    assert summary["confusion"]["allow"] == {"allow": 1, "review": 1, "block": 0}
    assert summary["confusion"]["block"] == {"allow": 0, "review": 1, "block": 0}
    later = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    assert api.client.get("/v1/policies/moderation/shadow", params={"since": later}).json()["data"] == []
    assert api.client.get("/v1/policies/moderation/shadow", params={"shadow": "other"}).json()["data"] == []
    assert_error(api.client.get("/v1/policies/nope/shadow"), 404, "policy_not_found")
    assert_error(api.client.get("/v1/policies/moderation/shadow", params={"since": "yesterday"}), 422, "invalid_field")


def seed_shadow(db_url: str, tenant: str, active: str, shadowed: str | None) -> None:
    """A done moderation job with its decision and a shadow decision, stored as the worker stores them."""
    with session_scope(db_url) as session:
        claimed = claimed_url_job(
            session, tenant=tenant, policy="moderation", policy_version="v", image_url="https://x/a", worker="w"
        )
        decision = Decision(job_id=claimed.id, action=active, policy="moderation", policy_version="v")
        shadow = ShadowDecision(
            job_id="", policy="moderation-next", policy_version="s1", active_policy="moderation",
            active_version="v", active_action=active, action=shadowed,
            error_code=None if shadowed else "context_missing",
        )  # fmt: skip
        store_decision(session, claimed, decision, [shadow])


def test_policy_edits_are_picked_up_without_a_restart(api: Api, api_overrides: dict[str, Any]) -> None:
    path = api_overrides["policies_dir"] / "next.yaml"
    before = api.client.get("/v1/policies/moderation-next").json()["version"]
    path.write_text(SHADOW.replace("review: 0.3", "review: 0.4"))
    edited = wait_for(api, "/v1/policies/moderation-next", lambda body: body["version"] != before)
    assert edited["categories"][0]["review"] == 0.4
    path.write_text(SHADOW.replace("review: 0.3", "review: 4"))  # a broken edit
    listed = wait_for(api, "/v1/policies", lambda body: body["reload_error"] is not None)
    assert f"{path}:5:" in listed["reload_error"]["message"] and listed["reload_error"]["code"] == "policy_invalid"
    assert api.client.get("/v1/policies/moderation-next").json()["version"] == edited["version"]  # still in use
    path.write_text(SHADOW)
    fixed = wait_for(api, "/v1/policies", lambda body: body["reload_error"] is None)
    assert "moderation-next" in {policy["name"] for policy in fixed["data"]}
    assert api.client.get("/v1/policies/moderation-next").json()["version"] == before


def wait_for(api: Api, path: str, condition: Callable[[dict[str, Any]], bool], timeout_s: float = 10) -> dict[str, Any]:
    """GET `path` until `condition` holds on its body (the API polls the files every 2 s)."""

    def met() -> dict[str, Any] | None:
        body: dict[str, Any] = api.client.get(path).json()
        return body if condition(body) else None

    return waiting.wait_for(met, timeout_s, f"a change at {path}")


def test_decisions_show_reasons_and_contradictions(api: Api) -> None:
    with session_scope(api.db_url) as session:
        claimed = claimed_url_job(
            session, tenant="default", policy="listing", policy_version="v", image_url="https://x/a", worker="w"
        )
        contradiction = {
            "category": "color_mismatch",
            "field": "attributes.color",
            "claimed": "red",
            "seen": "blue",
            "score": 0.9,
        }
        store_decision(
            session,
            claimed,
            Decision(
                job_id=claimed.id,
                action="review",
                policy="listing",
                policy_version="v",
                reason="review by 'color_mismatch': ...",
                contradictions=[contradiction],
            ),
        )
    decision = api.client.get(f"/v1/jobs/{claimed.id}").json()["decision"]
    assert decision["contradictions"] == [contradiction] and decision["reason"].startswith("review by")
