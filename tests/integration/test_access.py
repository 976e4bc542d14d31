"""Access control, tenants, the review queue and the audit log, over real HTTP on SQLite and PostgreSQL.

Every route of the app is checked against missing, wrong, malformed, revoked and under-privileged keys:
the route table is read from `create_app().routes`, so a route added later is checked too (or fails
`test_every_route_is_public_or_declares_a_permission` until it says who may call it).
"""

from __future__ import annotations

import io
import re
import secrets
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.routing import APIRoute, iter_route_contexts
from PIL import Image
from sqlmodel import select
from starlette.routing import BaseRoute

from api.app import create_app
from api.auth import PUBLIC_PATHS, route_permission
from core.auth import create_key, revoke_key
from core.db import session_scope
from core.jobs import claim_job, get_decision, store_decision
from core.principals import ROLE_PERMISSIONS, Permission, cli_principal
from core.settings import Settings
from core.tables import Decision, Job, ReviewItem, Role
from modtag.client import ApiClient
from tests.support.api import assert_error, raw_http, serve

pytestmark = pytest.mark.timeout(120)

TENANTS = ("acme", "globex")
UNKNOWN_ID = "0123456789abcdef0123456789abcdef"
# As the worker stores them (policies.evaluate.CategoryResult): the API shows every key.
REVIEW_CATEGORIES = {
    "weapons": {
        "score": 0.72,
        "action": "review",
        "fired": True,
        "decided_by": "probe: is there a gun?",
        "reason": None,
    },
    "nudity": {"score": 0.05, "action": "allow", "fired": False, "decided_by": None, "reason": None},
}
XSS_CAPTION = '<script>alert("x")</script><img src=x onerror=alert(1)> a man holding a rifle'


@dataclass
class Access:
    """A running API with keys of every role in two tenants, plus a revoked key."""

    base_url: str
    settings: Settings
    app: Any
    keys: dict[tuple[str, str], str] = field(default_factory=dict)  # (tenant, role) -> key
    key_ids: dict[tuple[str, str], str] = field(default_factory=dict)
    revoked: str = ""

    @property
    def db_url(self) -> str:
        return self.settings.resolved_database_url

    def client(self, tenant: str = "acme", role: str = "admin") -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.keys[(tenant, role)]}"}
        return ApiClient(self.base_url, headers=headers, timeout_s=30)

    def anonymous(self) -> httpx.Client:
        return ApiClient(self.base_url, timeout_s=30)

    def review_job(self, tenant: str = "acme", caption: str = "a man holding a rifle", score: float = 0.72) -> str:
        """Upload an image as the tenant's submitter, then store a `review` decision as the worker does."""
        with self.client(tenant, "submit") as client:
            response = client.post("/v1/jobs", files={"image": ("photo.png", png(), "image/png")})
        assert response.status_code == 202, response.text
        job_id: str = response.json()["id"]
        categories = {**REVIEW_CATEGORIES, "weapons": {**REVIEW_CATEGORIES["weapons"], "score": score}}
        store(self.db_url, job_id, "review", categories, caption)
        return job_id


def png(color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (96, 64), color).save(buffer, format="PNG")
    return buffer.getvalue()


def store(db_url: str, job_id: str, action: str, categories: dict[str, Any], caption: str = "a photo") -> None:
    """The worker's write path: claim the job, store the decision (which queues `review` decisions)."""
    with session_scope(db_url) as session:
        job = claim_job(session, job_id, "test-worker", 60)
        assert job is not None
        store_decision(
            session,
            job,
            Decision(
                job_id=job_id,
                action=action,
                policy="moderation",
                policy_version="v1",
                categories=categories,
                caption=caption,
                evidence=[{"category": "weapons", "kind": "probe", "text": "is there a gun?", "score": 0.72}],
            ),
        )


@pytest.fixture(scope="module")
def access(db_url: str, redis_server: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Access]:
    from core.db import migrate

    data_dir = tmp_path_factory.mktemp("access")
    settings = Settings(
        _env_file=None,
        data_dir=data_dir,
        database_url=db_url,
        redis_url=redis_server.url,
        blob_dir=data_dir / "blobs",
        auth_max_failures=1_000_000,  # the route-guard test sends many bad keys from 127.0.0.1 (see conftest)
    )
    migrate(db_url)
    app = create_app(settings)
    state = Access(base_url="", settings=settings, app=app)
    with session_scope(db_url) as session:
        for tenant in TENANTS:
            for role in Role:
                row, secret = create_key(
                    session, role=role, tenant=tenant, name=f"{tenant} {role.value}", actor=cli_principal(tenant)
                )
                state.keys[(tenant, role.value)] = secret
                state.key_ids[(tenant, role.value)] = row.id
        row, state.revoked = create_key(session, role="admin", tenant="acme", name="old", actor=cli_principal("acme"))
        revoke_key(session, row.id, cli_principal("acme"))
    with serve(app) as base_url:
        state.base_url = base_url
        yield state


# -- the route table -------------------------------------------------------------------------------------------


def _app_routes() -> list[tuple[str, BaseRoute]]:
    """(full path, route) of every route the app serves, routers included (FastAPI includes them lazily)."""
    settings = Settings(_env_file=None, data_dir=Path("/nonexistent/modtag"), redis_url="redis://127.0.0.1:1/0")
    return [(str(context.path), context.original_route) for context in iter_route_contexts(create_app(settings).routes)]


def _guarded_routes() -> list[tuple[str, str, Permission]]:
    table = []
    for path, route in _app_routes():
        if isinstance(route, APIRoute) and path not in PUBLIC_PATHS:
            permission = route_permission(route)
            assert permission is not None, path
            for method in sorted(route.methods or ()):
                table.append((method, path, permission))
    return table


GUARDED = _guarded_routes()


def test_every_route_is_public_or_declares_a_permission() -> None:
    seen = set()
    for path, route in _app_routes():
        seen.add(path)
        if path in PUBLIC_PATHS:
            if isinstance(route, APIRoute):
                assert route_permission(route) is None, f"{path} is public and asks for a permission"
            continue
        assert isinstance(route, APIRoute), f"{path} is neither public nor an API route with a permission"
        assert route_permission(route) is not None, f"{path} says nothing about who may call it"
    assert seen >= PUBLIC_PATHS, PUBLIC_PATHS - seen
    # The table the parametrised test below runs on really covers the API, the review queue and the dashboard.
    paths = {path for _, path, _ in GUARDED}
    assert {"/v1/jobs", "/v1/review/queue", "/v1/audit", "/dashboard/review/{job_id}/claim"} <= paths
    assert len(GUARDED) >= 18


def _url(path: str) -> str:
    return path.replace("{job_id}", UNKNOWN_ID).replace("{name}", "moderation")


@pytest.mark.parametrize(("method", "path", "permission"), GUARDED, ids=[f"{m} {p}" for m, p, _ in GUARDED])
def test_route_refuses_missing_wrong_revoked_and_underprivileged_keys(
    access: Access, method: str, path: str, permission: Permission
) -> None:
    url = _url(path)
    with access.anonymous() as client:

        def call(headers: dict[str, str] | list[tuple[bytes, bytes]] | None) -> httpx.Response:
            return client.request(method, url, headers=headers, json={} if method == "POST" else None)

        assert_error(call(None), 401, "auth_required")
        response = call(None)
        assert response.headers["www-authenticate"].startswith("Bearer")
        wrong = "mtk_000000000000_" + secrets.token_urlsafe(32)
        assert_error(call({"Authorization": f"Bearer {wrong}"}), 401, "auth_invalid")
        assert_error(call({"X-API-Key": wrong}), 401, "auth_invalid")
        assert_error(call({"Authorization": f"Bearer {access.revoked}"}), 401, "auth_revoked")
        assert_error(call({"X-API-Key": access.revoked}), 401, "auth_revoked")
        assert_error(call({"Authorization": "Bearer " + "k" * 5000}), 401, "auth_invalid")
        assert_error(call([(b"X-API-Key", "ключ-🔑-naïve".encode())]), 401, "auth_invalid")
        assert_error(call({"Authorization": f"Basic {access.keys[('acme', 'admin')]}"}), 401, "auth_invalid")
        assert_error(call({"Authorization": "Bearer"}), 401, "auth_invalid")
        for role, permissions in ROLE_PERMISSIONS.items():
            response = call({"X-API-Key": access.keys[("acme", role.value)]})
            if permission in permissions:
                assert response.status_code not in (401, 403), (role, response.text)
            else:
                body = assert_error(response, 403, "forbidden")
                assert role.value in body["detail"]


def test_public_routes_need_no_key(access: Access) -> None:
    with access.anonymous() as client:
        assert client.get("/healthz").status_code == 200
        assert client.get("/readyz").status_code == 200
        assert client.get("/metrics").status_code == 200  # Prometheus carries no key (see api/auth.py)
        assert client.get("/openapi.json").status_code == 200
        assert client.get("/dashboard/login").status_code == 200
        assert client.get("/dashboard", follow_redirects=False).status_code == 303


def test_refusal_happens_before_anything_is_stored(access: Access) -> None:
    with session_scope(access.db_url) as session:
        before = len(session.exec(select(Decision.id)).all()), _count_jobs(session)
    with access.anonymous() as client:
        assert_error(client.post("/v1/jobs", files={"image": ("a.png", png(), "image/png")}), 401, "auth_required")
    with access.client("acme", "review") as client:
        assert_error(client.post("/v1/jobs", files={"image": ("a.png", png(), "image/png")}), 403, "forbidden")
    with session_scope(access.db_url) as session:
        assert (len(session.exec(select(Decision.id)).all()), _count_jobs(session)) == before


def test_a_key_in_the_query_string_is_ignored(access: Access) -> None:
    with access.anonymous() as client:
        key = access.keys[("acme", "admin")]
        assert_error(client.get("/v1/decisions", params={"api_key": key, "key": key}), 401, "auth_required")


def test_nul_in_a_key_header_never_reaches_the_app(access: Access) -> None:

    head = "GET /v1/decisions HTTP/1.1\nHost: test\nX-API-Key: mtk_\x00abc\nConnection: close\n"
    try:
        status, _ = raw_http(access.base_url, head)
    except ValueError:  # the server closed the connection without a JSON body: also a refusal
        return
    assert status in (400, 401)


def test_submission_records_the_keys_tenant_and_id(access: Access) -> None:
    job_id = access.review_job("globex")
    with session_scope(access.db_url) as session:
        job = session.get(Job, job_id)
        assert job is not None
        assert job.tenant == "globex" and job.submitted_by == access.key_ids[("globex", "submit")]


# -- tenants ---------------------------------------------------------------------------------------------------


def test_another_tenant_sees_none_of_it(access: Access) -> None:
    job_id = access.review_job("acme")
    with access.client("acme", "review") as reviewer:
        assert reviewer.post(f"/v1/review/{job_id}/claim").status_code == 200
        resolved = reviewer.post(f"/v1/review/{job_id}/resolve", json={"action": "block", "reason": "a rifle"})
        assert resolved.status_code == 200, resolved.text
    with access.client("acme", "admin") as owner:
        assert owner.get(f"/v1/jobs/{job_id}").status_code == 200
        assert owner.get(f"/v1/jobs/{job_id}/thumbnail").status_code == 200
        assert job_id in [d["job_id"] for d in owner.get("/v1/decisions", params={"limit": 500}).json()["data"]]
        audit = owner.get("/v1/audit", params={"job_id": job_id}).json()["data"]
        assert {entry["action"] for entry in audit} == {"review.enqueued", "review.claimed", "review.resolved"}

    for role in ("admin", "review", "submit"):
        with access.client("globex", role) as other:
            # Another tenant's ids are unknown ids: 404, never 403 (which would confirm they exist).
            assert_error(other.get(f"/v1/jobs/{job_id}"), 404, "job_not_found")
            assert_error(other.get(f"/v1/jobs/{job_id}/thumbnail"), 404, "job_not_found")
            decisions = other.get("/v1/decisions", params={"limit": 500}).json()["data"]
            assert job_id not in [decision["job_id"] for decision in decisions]
            assert_error(other.get(f"/dashboard/jobs/{job_id}"), 404, "job_not_found")
            assert job_id not in other.get("/dashboard/flagged", params={"action": "all"}).text
            assert job_id not in other.get("/dashboard/summary").text
    with access.client("globex", "admin") as other:
        queue = other.get("/v1/review/queue", params={"state": "all", "limit": 200}).json()["data"]
        assert job_id not in [item["job_id"] for item in queue]
        assert_error(other.post(f"/v1/review/{job_id}/claim"), 404, "review_not_found")
        assert_error(
            other.post(f"/v1/review/{job_id}/resolve", json={"action": "allow", "reason": "x"}), 404, "review_not_found"
        )
        assert_error(other.post(f"/v1/review/{job_id}/reopen", json={"reason": "x"}), 404, "review_not_found")
        assert other.get("/v1/audit", params={"job_id": job_id}).json()["data"] == []
        every = other.get("/v1/audit", params={"limit": 500}).json()["data"]
        assert job_id not in str(every) and access.key_ids[("acme", "review")] not in str(every)
        assert job_id not in other.get("/dashboard/audit").text
        assert job_id not in other.get("/dashboard/review", params={"state": "resolved"}).text
    # Nothing another tenant did changed the item.
    with access.client("acme", "admin") as owner:
        review = owner.get(f"/v1/jobs/{job_id}").json()["review"]
        assert review["state"] == "resolved" and review["resolution"]["action"] == "block"


def test_idempotency_keys_are_per_tenant(access: Access) -> None:
    ids = []
    for tenant in TENANTS:
        with access.client(tenant, "submit") as client:
            response = client.post(
                "/v1/jobs", json={"image_url": "https://a.example/x.jpg"}, headers={"Idempotency-Key": "same-key-xyz"}
            )
            assert response.status_code == 202, response.text
            ids.append(response.json()["id"])
    assert ids[0] != ids[1]


# -- the review queue ------------------------------------------------------------------------------------------


def test_queue_lists_oldest_or_highest_score_first_with_filters(access: Access) -> None:
    low = access.review_job("acme", score=0.61)
    high = access.review_job("acme", score=0.88)
    mid = access.review_job("acme", score=0.70)
    # Only `review` decisions enter the queue: an `allow` does not.
    with access.client("acme", "submit") as submitter:
        allowed = submitter.post("/v1/jobs", files={"image": ("a.png", png(), "image/png")}).json()["id"]
    store(access.db_url, allowed, "allow", {"weapons": {"score": 0.1, "action": "allow", "fired": False}})
    mine = {low, high, mid}
    with access.client("acme", "review") as reviewer:

        def listed(**params: Any) -> list[str]:
            response = reviewer.get("/v1/review/queue", params={"limit": 200, **params})
            assert response.status_code == 200, response.text
            return [item["job_id"] for item in response.json()["data"] if item["job_id"] in mine | {allowed}]

        assert listed() == [low, high, mid]  # oldest first
        assert listed(order="score") == [high, mid, low]
        assert listed(category="weapons", order="score") == [high, mid, low]
        assert listed(category="nudity") == []  # it did not fire
        assert listed(policy="moderation") == [low, high, mid]
        assert listed(policy="other") == []
        assert allowed not in listed(state="all")

        pages: list[str] = []
        cursor = None
        while True:
            params: dict[str, Any] = {"order": "score", "limit": 1, **({"cursor": cursor} if cursor else {})}
            page = reviewer.get("/v1/review/queue", params=params).json()
            pages += [item["job_id"] for item in page["data"] if item["job_id"] in mine]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert pages == [high, mid, low]
        first = reviewer.get("/v1/review/queue", params={"order": "score", "limit": 1}).json()["data"][0]
        assert first["decision"]["action"] == "review" and first["decision"]["categories"]
        assert first["state"] == "open" and first["claim"] is None and first["resolution"] is None


@pytest.mark.parametrize(
    ("path", "params", "status", "code"),
    [
        ("/v1/review/queue", {"policy": "' OR 1=1 --"}, 422, "invalid_field"),
        ("/v1/review/queue", {"category": "weapons'; DROP TABLE review_items;--"}, 422, "invalid_field"),
        ("/v1/review/queue", {"category": "a\x00b"}, 422, "invalid_field"),
        ("/v1/review/queue", {"order": "score; DELETE FROM jobs"}, 422, "invalid_field"),
        ("/v1/review/queue", {"state": "open' OR '1'='1"}, 422, "invalid_field"),
        ("/v1/review/queue", {"cursor": "eyJvIjoic2NvcmUifQ"}, 400, "invalid_cursor"),
        ("/v1/review/queue", {"cursor": "not a cursor"}, 400, "invalid_cursor"),
        ("/v1/audit", {"action": "review.resolved' OR 1=1"}, 422, "invalid_field"),
        ("/v1/audit", {"job_id": "x' UNION SELECT key_hash FROM api_keys --"}, 422, "invalid_field"),
        ("/v1/audit", {"actor": "%"}, 422, "invalid_field"),
        ("/v1/audit", {"cursor": "YTEyMzQ1Njc4OTAxMjM0NTY3ODkwMTIz"}, 400, "invalid_cursor"),
        ("/v1/audit", {"since": "1 OR 1=1"}, 422, "invalid_field"),
        ("/v1/decisions", {"policy": "moderation' --"}, 422, "invalid_field"),
    ],
)
def test_hostile_filters_are_refused_cleanly(
    access: Access, path: str, params: dict[str, str], status: int, code: str
) -> None:
    with access.client("acme", "admin") as client:
        assert_error(client.get(path, params=params), status, code)


def test_hostile_job_ids_are_404(access: Access) -> None:
    with access.client("acme", "admin") as client:
        for job_id in ("' OR '1'='1", "%00", "a" * 300, "ünï"):
            response = client.post(f"/v1/review/{job_id}/claim")
            assert response.status_code in (404, 422), response.text
        assert_error(client.post("/v1/review/%00/claim"), 404, "review_not_found")
        assert_error(client.get("/v1/jobs/%27%20OR%201%3D1/thumbnail"), 404, "job_not_found")


def test_two_reviewers_cannot_hold_the_same_item(access: Access) -> None:
    job_id = access.review_job("acme")
    results: list[httpx.Response] = []
    start = threading.Barrier(2)

    def claim(role: str) -> None:
        with access.client("acme", role) as client:
            start.wait()
            results.append(client.post(f"/v1/review/{job_id}/claim"))

    threads = [threading.Thread(target=claim, args=(role,)) for role in ("review", "admin")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    statuses = sorted(response.status_code for response in results)
    assert statuses == [200, 409], [response.text for response in results]
    winner = next(response for response in results if response.status_code == 200).json()
    loser = next(response for response in results if response.status_code == 409)
    assert_error(loser, 409, "review_claimed")
    assert winner["claim"]["by"]["name"] in loser.json()["detail"]

    holder = "review" if winner["claim"]["by"]["name"] == "acme review" else "admin"
    other = "admin" if holder == "review" else "review"
    with access.client("acme", other) as client:
        refused = client.post(f"/v1/review/{job_id}/resolve", json={"action": "allow", "reason": "looks fine"})
        assert_error(refused, 409, "review_claimed")
    with access.client("acme", holder) as client:
        again = client.post(f"/v1/review/{job_id}/claim")  # claiming again extends the holder's lease
        assert again.status_code == 200
        assert again.json()["claim"]["expires_at"] >= winner["claim"]["expires_at"]
        done = client.post(f"/v1/review/{job_id}/resolve", json={"action": "allow", "reason": "a toy"})
        assert done.status_code == 200, done.text
    with access.client("acme", other) as client:
        assert_error(client.post(f"/v1/review/{job_id}/claim"), 409, "review_resolved")


def test_a_claim_is_released_by_its_holder_and_another_reviewer_takes_it(access: Access) -> None:
    job_id = access.review_job("acme")
    with session_scope(access.db_url) as session:
        _, second = create_key(
            session, role="review", tenant="acme", name="second reviewer", actor=cli_principal("acme")
        )
    other = ApiClient(access.base_url, headers={"X-API-Key": second}, timeout_s=30)
    with access.client("acme", "review") as holder, other:
        unclaimed = assert_error(holder.post(f"/v1/review/{job_id}/release"), 409, "review_not_claimed")
        assert "nothing to release" in unclaimed["detail"]
        assert holder.post(f"/v1/review/{job_id}/claim").status_code == 200
        refused = assert_error(other.post(f"/v1/review/{job_id}/release"), 409, "review_claimed")
        assert "acme review" in refused["detail"] and "only they or an admin" in refused["detail"]
        assert_error(other.post(f"/v1/review/{job_id}/claim"), 409, "review_claimed")  # still held
        released = holder.post(f"/v1/review/{job_id}/release")
        assert released.status_code == 200, released.text
        assert released.json()["state"] == "open" and released.json()["claim"] is None
        assert_error(holder.post(f"/v1/review/{job_id}/release"), 409, "review_not_claimed")
        taken = other.post(f"/v1/review/{job_id}/claim")  # at once, not when the lease would have run out
        assert taken.status_code == 200 and taken.json()["claim"]["by"]["name"] == "second reviewer"
    with access.client("acme", "admin") as admin:
        freed = admin.post(f"/v1/review/{job_id}/release")  # an admin may release anyone's claim
        assert freed.status_code == 200 and freed.json()["claim"] is None
        entries = admin.get("/v1/audit", params={"job_id": job_id, "action": "review.released"}).json()["data"]
        assert [entry["actor"]["name"] for entry in entries] == ["acme admin", "acme review"]  # newest first
        assert entries[0]["before"]["claim"]["by"]["name"] == "second reviewer" and entries[0]["after"]["claim"] is None
        assert admin.post(f"/v1/review/{job_id}/resolve", json={"action": "allow", "reason": "a toy"}).is_success
        assert_error(admin.post(f"/v1/review/{job_id}/release"), 409, "review_resolved")
    with access.client("globex", "admin") as outsider:
        assert_error(outsider.post(f"/v1/review/{job_id}/release"), 404, "review_not_found")


def test_resolution_is_kept_beside_the_machine_decision(access: Access) -> None:
    job_id = access.review_job("acme")
    with access.client("acme", "admin") as admin:
        machine = admin.get(f"/v1/jobs/{job_id}").json()["decision"]
    with access.client("acme", "review") as reviewer:
        assert_error(
            reviewer.post(f"/v1/review/{job_id}/resolve", json={"action": "review", "reason": "x"}),
            422,
            "invalid_field",
        )
        assert_error(
            reviewer.post(f"/v1/review/{job_id}/resolve", json={"action": "block", "reason": "   "}),
            400,
            "reason_missing",
        )
        assert_error(
            reviewer.post(f"/v1/review/{job_id}/resolve", json={"action": "block", "reason": "x" * 2001}),
            422,
            "invalid_field",
        )
        resolved = reviewer.post(
            f"/v1/review/{job_id}/resolve", json={"action": "block", "reason": "a real rifle, pointed at the camera"}
        )
        assert resolved.status_code == 200, resolved.text
    with access.client("acme", "submit") as submitter:
        job = submitter.get(f"/v1/jobs/{job_id}").json()
    assert job["decision"] == machine  # the machine decision is untouched
    assert job["decision"]["action"] == "review"
    review = job["review"]
    assert review["state"] == "resolved" and review["claim"] is None
    assert review["resolution"]["action"] == "block"
    assert review["resolution"]["reason"] == "a real rifle, pointed at the camera"
    assert review["resolution"]["by"] == {"id": access.key_ids[("acme", "review")], "name": "acme review"}
    assert review["resolution"]["at"] >= machine["decided_at"]
    with session_scope(access.db_url) as session:
        stored = get_decision(session, job_id)
        assert stored is not None and stored.action == "review" and stored.categories == machine["categories"]


def test_reopen_is_for_admins_and_keeps_the_history(access: Access) -> None:
    job_id = access.review_job("acme")
    with access.client("acme", "review") as reviewer:
        assert_error(reviewer.post(f"/v1/review/{job_id}/reopen", json={"reason": "x"}), 403, "forbidden")
        reviewer.post(f"/v1/review/{job_id}/resolve", json={"action": "allow", "reason": "a water pistol"})
        assert_error(reviewer.post(f"/v1/review/{job_id}/reopen", json={"reason": "appeal"}), 403, "forbidden")
    with access.client("acme", "admin") as admin:
        reopened = admin.post(f"/v1/review/{job_id}/reopen", json={"reason": "the uploader appealed"})
        assert reopened.status_code == 200, reopened.text
        item = reopened.json()
        assert item["state"] == "open" and item["resolution"] is None and item["reopen_count"] == 1
        assert_error(admin.post(f"/v1/review/{job_id}/reopen", json={"reason": "again"}), 409, "review_not_resolved")
        assert admin.post(f"/v1/review/{job_id}/resolve", json={"action": "block", "reason": "on appeal"}).is_success
        entries = admin.get("/v1/audit", params={"job_id": job_id, "action": "review."}).json()["data"]
    actions = [entry["action"] for entry in entries]
    assert actions == ["review.resolved", "review.reopened", "review.resolved", "review.enqueued"]
    reopen = entries[1]
    assert reopen["before"]["resolution"]["action"] == "allow"
    assert reopen["before"]["resolution"]["reason"] == "a water pistol"
    assert reopen["after"]["state"] == "open" and reopen["after"]["reopen_reason"] == "the uploader appealed"
    assert reopen["actor"] == {"key_id": access.key_ids[("acme", "admin")], "name": "acme admin", "role": "admin"}


def test_audit_entries_carry_who_what_when_before_and_after(access: Access) -> None:
    job_id = access.review_job("acme")
    with access.client("acme", "review") as reviewer:
        reviewer.post(f"/v1/review/{job_id}/claim")
        reviewer.post(f"/v1/review/{job_id}/resolve", json={"action": "block", "reason": "weapon"})
        assert_error(reviewer.get("/v1/audit"), 403, "forbidden")
    with access.client("acme", "admin") as admin:
        entries = admin.get("/v1/audit", params={"job_id": job_id}).json()["data"]
        enqueued, claimed, resolved = reversed(entries)
        assert enqueued["action"] == "review.enqueued" and enqueued["before"] is None
        assert enqueued["actor"] == {"key_id": None, "name": "modtag (machine decision)", "role": None}
        assert enqueued["after"]["state"] == "open" and enqueued["after"]["category"] == "weapons"
        assert claimed["before"]["claim"] is None
        assert claimed["after"]["claim"]["by"]["id"] == access.key_ids[("acme", "review")]
        assert resolved["before"]["state"] == "open" and resolved["after"]["state"] == "resolved"
        assert resolved["after"]["resolution"]["reason"] == "weapon"
        assert resolved["actor"]["role"] == "review" and resolved["target"] == {"type": "job", "id": job_id}
        assert enqueued["at"] <= claimed["at"] <= resolved["at"]
        # Filters and paging.
        by_actor = admin.get("/v1/audit", params={"actor": access.key_ids[("acme", "review")], "limit": 500}).json()
        assert {entry["actor"]["name"] for entry in by_actor["data"]} == {"acme review"}
        only = admin.get("/v1/audit", params={"job_id": job_id, "action": "review.claimed"}).json()["data"]
        assert [entry["id"] for entry in only] == [claimed["id"]]
        paged: list[int] = []
        cursor = None
        while True:
            params: dict[str, Any] = {"job_id": job_id, "limit": 1, **({"cursor": cursor} if cursor else {})}
            page = admin.get("/v1/audit", params=params).json()
            paged += [entry["id"] for entry in page["data"]]
            cursor = page["next_cursor"]
            if not cursor:
                break
        assert paged == [entry["id"] for entry in entries]
        since = admin.get("/v1/audit", params={"job_id": job_id, "since": resolved["at"]}).json()["data"]
        assert [entry["id"] for entry in since] == [resolved["id"]]
        # Key changes are audited too, without the secret.
        keys = admin.get("/v1/audit", params={"action": "key.", "limit": 500}).json()["data"]
        assert {"key.created", "key.revoked"} <= {entry["action"] for entry in keys}
        assert all(access.keys[("acme", "admin")] not in str(entry) for entry in keys)
        assert all("key_hash" not in (entry["after"] or {}) for entry in keys)


def test_review_metrics_are_exported(access: Access) -> None:
    job_id = access.review_job("acme")
    with access.client("acme", "review") as reviewer:
        reviewer.post(f"/v1/review/{job_id}/resolve", json={"action": "allow", "reason": "fine"})
    access.app.state.services.gauges_refreshed_at = float("-inf")  # the next scrape refreshes the gauges
    with session_scope(access.db_url) as session:
        open_items = len(session.exec(select(ReviewItem.job_id).where(ReviewItem.state == "open")).all())
    with access.anonymous() as client:
        exposition = client.get("/metrics").text
    assert re.search(rf"^modtag_review_queue_size {open_items}\.0$", exposition, re.M), open_items
    assert re.search(
        r'^modtag_review_resolution_seconds_count\{policy="moderation",resolution="allow"\} [1-9]', exposition, re.M
    )
    assert re.search(r'^modtag_auth_failures_total\{code="auth_required"\} [1-9]', exposition, re.M)
    assert "modtag_review_oldest_age_seconds" in exposition


# -- the dashboard over HTTP -----------------------------------------------------------------------------------


@contextmanager
def sign_in(access: Access, tenant: str, role: str, next_path: str = "/dashboard/review") -> Iterator[httpx.Client]:
    """A client signed in through the form, as a browser would: it holds the session cookie, no key."""
    with access.anonymous() as client:
        form = client.get("/dashboard/login")
        response = client.post(
            "/dashboard/login",
            data={"key": access.keys[(tenant, role)], "csrf_token": csrf_of(form), "next": next_path},
            follow_redirects=False,
        )
        assert response.status_code == 303, response.text
        yield client


def csrf_of(page: httpx.Response) -> str:
    match = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    assert match, page.text
    return match.group(1)


def test_sign_in_sets_a_strict_http_only_cookie_and_refuses_bad_forms(access: Access) -> None:
    with access.anonymous() as client:
        form = client.get("/dashboard/login")
        assert "samesite=strict" in form.headers["set-cookie"].lower()
        no_csrf = client.post("/dashboard/login", data={"key": access.keys[("acme", "review")]})
        assert no_csrf.status_code == 403 and "modtag_session" not in no_csrf.headers.get("set-cookie", "")
        forged = client.post("/dashboard/login", data={"key": access.keys[("acme", "review")], "csrf_token": "x"})
        assert forged.status_code == 403 and "modtag_session" not in forged.headers.get("set-cookie", "")
        # Each form carries a fresh token (and cookie): sign in with the latest.
        wrong = client.post("/dashboard/login", data={"key": "mtk_nope", "csrf_token": csrf_of(forged)})
        assert wrong.status_code == 401 and "not valid" in wrong.text
        revoked = client.post("/dashboard/login", data={"key": access.revoked, "csrf_token": csrf_of(wrong)})
        assert revoked.status_code == 401 and "revoked" in revoked.text
        hostile = client.post("/dashboard/login", data={"key": "\x00" * 3000, "csrf_token": csrf_of(revoked)})
        assert hostile.status_code == 401
        ok = client.post(
            "/dashboard/login",
            data={"key": access.keys[("acme", "review")], "csrf_token": csrf_of(hostile), "next": "//evil.example/x"},
            follow_redirects=False,
        )
        assert ok.status_code == 303 and ok.headers["location"] == "/dashboard/flagged"  # no open redirect
        cookie = next(value for value in ok.headers.get_list("set-cookie") if value.startswith("modtag_session="))
        attributes = {part.strip().lower() for part in cookie.split(";")}
        assert {"httponly", "samesite=strict", "path=/"} <= attributes


def test_dashboard_pages_are_guarded_and_escaped(access: Access) -> None:
    job_id = access.review_job("acme", caption=XSS_CAPTION)
    with access.anonymous() as client:
        page = client.get("/dashboard/review", headers={"Accept": "text/html"})
        assert page.status_code == 401 and 'name="key"' in page.text  # the sign-in form, with `next` kept
        assert 'value="/dashboard/review"' in page.text
    with sign_in(access, "acme", "review") as browser:
        for path in ("/dashboard/flagged", "/dashboard/review", f"/dashboard/jobs/{job_id}", "/dashboard/summary"):
            page = browser.get(path)
            assert page.status_code == 200, (path, page.text[:300])
            assert "<script>alert" not in page.text and "<img src=x" not in page.text
            assert page.headers["x-frame-options"] == "DENY"
            assert "script-src" not in page.headers["content-security-policy"]  # default-src 'none': no script
            assert page.headers["cache-control"] == "no-store"
        assert "&lt;script&gt;" in browser.get(f"/dashboard/jobs/{job_id}").text
        forbidden = browser.get("/dashboard/audit", headers={"Accept": "text/html"})
        assert forbidden.status_code == 403 and "Not allowed" in forbidden.text
        thumbnail = browser.get(f"/v1/jobs/{job_id}/thumbnail")  # the cookie works for GETs (an <img>)
        assert thumbnail.status_code == 200 and thumbnail.headers["content-type"] == "image/jpeg"
        assert thumbnail.headers["cache-control"].startswith("private")
        with Image.open(io.BytesIO(thumbnail.content)) as image:
            assert image.format == "JPEG" and max(image.size) <= 320
        # ...but never for an API write: that needs the key itself.
        assert_error(browser.post(f"/v1/review/{job_id}/claim"), 401, "auth_required")


def test_dashboard_buttons_need_the_csrf_token(access: Access) -> None:
    job_id = access.review_job("acme")
    with sign_in(access, "acme", "review") as browser:
        page = browser.get("/dashboard/review")
        token = csrf_of(page)
        refused = browser.post(f"/dashboard/review/{job_id}/claim", data={"csrf_token": "forged"})
        assert_error(refused, 403, "csrf_invalid")
        assert_error(browser.post(f"/dashboard/review/{job_id}/claim"), 403, "csrf_invalid")
        claimed = browser.post(
            f"/dashboard/review/{job_id}/claim",
            data={"csrf_token": token, "next": "/dashboard/review"},
            follow_redirects=True,
        )
        assert claimed.status_code == 200 and "Claimed" in claimed.text
        resolved = browser.post(
            f"/dashboard/review/{job_id}/resolve",
            data={
                "csrf_token": token,
                "action": "block",
                "reason": "clearly a weapon",
                "next": f"/dashboard/jobs/{job_id}",
            },
            follow_redirects=False,
        )
        assert resolved.status_code == 303 and resolved.headers["location"].startswith(f"/dashboard/jobs/{job_id}?")
        detail = browser.get(resolved.headers["location"])
        assert "Resolved" in detail.text and "clearly a weapon" in detail.text
    with access.client("acme", "admin") as admin:
        review = admin.get(f"/v1/jobs/{job_id}").json()["review"]
        assert review["resolution"]["action"] == "block" and review["resolution"]["by"]["name"] == "acme review"


def test_dashboard_release_button_is_for_the_holder_and_admins(access: Access) -> None:
    job_id = access.review_job("acme", score=0.99)  # the top of the queue by score, whatever else the module queued
    with session_scope(access.db_url) as session:
        _, second = create_key(session, role="review", tenant="acme", name="second", actor=cli_principal("acme"))
    access.keys[("acme", "second review")] = second
    card = re.compile(rf'<article class="card" data-job="{job_id}">(.*?)</article>', re.S)
    queue = "/dashboard/review?order=score"

    def buttons(page: httpx.Response) -> set[str]:
        match = card.search(page.text)
        assert match, page.text[:500]
        return set(re.findall(r'data-testid="(\w+)"', match.group(1)))

    with sign_in(access, "acme", "review") as browser:
        token = csrf_of(browser.get(queue))
        assert buttons(browser.get(queue)) == {"claim", "allow", "block"}
        browser.post(f"/dashboard/review/{job_id}/claim", data={"csrf_token": token})
        assert buttons(browser.get(queue)) == {"release", "allow", "block"}
        with sign_in(access, "acme", "admin") as admin:
            # An admin sees the reviewer's claim with a Release button (and no Allow/Block while it is held).
            assert buttons(admin.get(queue)) == {"release"}
        with sign_in(access, "acme", "second review") as other:
            assert buttons(other.get(queue)) == set()  # another reviewer only sees who holds it, until when
        assert_error(
            browser.post(f"/dashboard/review/{job_id}/release", data={"csrf_token": "forged"}), 403, "csrf_invalid"
        )
        released = browser.post(f"/dashboard/review/{job_id}/release", data={"csrf_token": token, "next": queue})
        assert released.status_code == 303 and released.headers["location"] == f"{queue}&notice=released"
        page = browser.get(released.headers["location"])
        assert "Released: the item is back in the queue" in page.text and "claim" in buttons(page)
        again = browser.post(f"/dashboard/review/{job_id}/release", data={"csrf_token": token}, follow_redirects=True)
        assert "nothing to release" in again.text
    with access.client("acme", "admin") as client:
        assert client.get(f"/v1/jobs/{job_id}").json()["review"]["claim"] is None


def test_sign_out_and_revocation_end_the_session(access: Access) -> None:
    with session_scope(access.db_url) as session:
        row, key = create_key(session, role="review", tenant="acme", name="temp reviewer", actor=cli_principal("acme"))
    access.keys[("acme", "temp")] = key
    with sign_in(access, "acme", "temp") as browser:
        assert browser.get("/dashboard/review").status_code == 200
        with session_scope(access.db_url) as session:
            revoke_key(session, row.id, cli_principal("acme"))
        assert_error(browser.get("/dashboard/review"), 401, "auth_revoked")
    with sign_in(access, "acme", "review") as browser:
        token = csrf_of(browser.get("/dashboard/review"))
        cookie = browser.cookies["modtag_session"]
        out = browser.post("/dashboard/logout", data={"csrf_token": token}, follow_redirects=False)
        assert out.status_code == 303
        assert_error(browser.get("/dashboard/review"), 401, "auth_required")  # the browser dropped the cookie
    with access.anonymous() as copy:
        # ...and the server forgot the session: a copy of the old cookie is refused too.
        copy.cookies.set("modtag_session", cookie)
        assert_error(copy.get("/dashboard/review"), 401, "auth_invalid")


# -- switching auth off, bootstrap keys ------------------------------------------------------------------------


def test_auth_off_is_for_development_only(tmp_path: Path, redis_server: Any) -> None:
    with pytest.raises(ValueError, match="development only"):
        Settings(_env_file=None, auth=False, environment="production")
    settings = Settings(_env_file=None, auth=False, data_dir=tmp_path, redis_url=redis_server.url)
    with serve(create_app(settings)) as base_url, ApiClient(base_url) as client:
        assert client.get("/v1/decisions").status_code == 200
        assert client.get("/v1/audit").status_code == 200


def test_bootstrap_admin_key_from_settings(tmp_path: Path, redis_server: Any) -> None:
    from pydantic import SecretStr

    chosen = "bootstrap-" + secrets.token_hex(20)
    settings = Settings(
        _env_file=None,
        data_dir=tmp_path,
        redis_url=redis_server.url,
        admin_key=SecretStr(chosen),
        auth_max_failures=1_000_000,  # earlier tests' bad keys from 127.0.0.1 are still counted in the shared Redis
    )
    with serve(create_app(settings)) as base_url, ApiClient(base_url) as client:
        assert client.get("/v1/audit", headers={"X-API-Key": chosen}).status_code == 200
        assert_error(client.get("/v1/audit"), 401, "auth_required")
    for bad in ("short", "has space " + "x" * 40, "ключ" * 10):
        with pytest.raises(ValueError, match="32 to 256 printable"):
            Settings(_env_file=None, admin_key=SecretStr(bad))


def _count_jobs(session: Any) -> int:
    return len(session.exec(select(Job.id)).all())
