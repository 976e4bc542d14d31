"""Example sets and similar images over real HTTP (SQLite and PostgreSQL): who may change sets, uploads and job ids
as examples, hostile input, another tenant seeing nothing, the audit trail, erasure taking the membership along.

Embeddings are written with core.embeddings.save, as the worker writes them (tests/unit/test_image_embeddings.py
computes them with the real engine); unit vectors chosen here make "near" and "far" exact.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from sqlmodel import select

from core import embeddings
from core.db import session_scope
from core.tables import AuditEntry, ExampleItem
from modtag.client import ApiClient
from tests.support.api import Api, admin_key, assert_error
from tests.support.dashboard import csrf_of, signed_in
from tests.support.photos import photo_bytes

pytestmark = pytest.mark.timeout(120)
MAX_UPLOAD = 1_000_000
MODEL = "test-itm"


@pytest.fixture(scope="module")
def api_overrides() -> dict[str, Any]:
    return {"max_upload_bytes": MAX_UPLOAD}


def client_as(api: Api, role: str, tenant: str = "default") -> ApiClient:
    return ApiClient(api.base_url, key=admin_key(api.db_url, role=role, tenant=tenant, name=f"{tenant} {role}"))


def submitted(client: ApiClient, photo: str = "coffee") -> str:
    answer = client.post("/v1/jobs", files={"image": ("p.jpg", photo_bytes(photo), "image/jpeg")})
    assert answer.status_code == 202, answer.text
    return str(answer.json()["id"])


def embed(api: Api, job_id: str, tenant: str, angle: float, model: str = MODEL) -> None:
    """A unit vector at `angle` radians in the first plane: cos(a - b) is the similarity of two such jobs."""
    vector = np.zeros(16, dtype=np.float32)
    vector[0], vector[1] = np.cos(angle), np.sin(angle)
    with session_scope(api.db_url) as session:
        embeddings.save(session, job_id, tenant, model, vector)
        session.commit()


def test_example_sets_items_and_who_may_change_them(api: Api) -> None:
    admin = api.client
    created = admin.post("/v1/example-sets", json={"name": "fakes", "description": "counterfeit bags"})
    assert created.status_code == 201, created.text
    assert created.json() | {"created_at": None} == {
        "name": "fakes",
        "description": "counterfeit bags",
        "positive": 0,
        "negative": 0,
        "pending": 0,
        "created_at": None,
    }
    assert_error(admin.post("/v1/example-sets", json={"name": "fakes"}), 409, "example_set_exists")
    for bad in (
        {"name": "Bad Name"},
        {"name": "x" * 65},
        {"name": "ok", "extra": 1},
        {"name": "ok", "description": "d" * 3000},
    ):
        assert admin.post("/v1/example-sets", json=bad).status_code == 422, bad
    with client_as(api, "review") as reviewer, client_as(api, "submit") as submitter:
        assert_error(reviewer.post("/v1/example-sets", json={"name": "mine"}), 403, "forbidden")
        assert_error(reviewer.delete("/v1/example-sets/fakes"), 403, "forbidden")
        assert_error(submitter.get("/v1/example-sets"), 403, "forbidden")
        job_id = submitted(submitter)
        assert_error(
            submitter.post("/v1/example-sets/fakes/items", json={"job_id": job_id, "label": "positive"}),
            403,
            "forbidden",
        )
        added = reviewer.post("/v1/example-sets/fakes/items", json={"job_id": job_id, "label": "positive"})
    assert added.status_code == 201, added.text
    item = added.json()
    assert (item["set"], item["job_id"], item["label"], item["embedded"]) == ("fakes", job_id, "positive", False)
    assert added.headers["location"] == f"/v1/example-sets/fakes/items/{job_id}"
    assert admin.get(f"/v1/example-sets/fakes/items/{job_id}").json() == item
    assert_error(
        admin.post("/v1/example-sets/fakes/items", json={"job_id": job_id, "label": "negative"}), 409, "example_exists"
    )

    # An upload becomes a job (queued for a worker, which will embed it) and a pending example at once.
    jobs_before = api.job_count()
    uploaded = admin.post(
        "/v1/example-sets/fakes/items", files={"image": ("r.jpg", photo_bytes("rocket"))}, data={"label": "negative"}
    )
    assert uploaded.status_code == 201, uploaded.text
    upload = uploaded.json()
    assert (upload["label"], upload["embedded"]) == ("negative", False)
    assert api.job_count() == jobs_before + 1
    assert admin.get(f"/v1/jobs/{upload['job_id']}").json()["status"] == "queued"
    assert any(message["headers"]["id"] == f"job-{upload['job_id']}" for message in api.messages())
    assert admin.get("/v1/example-sets/fakes").json()["pending"] == 2
    embed(api, upload["job_id"], "default", 0.0)
    assert admin.get(f"/v1/example-sets/fakes/items/{upload['job_id']}").json()["embedded"] is True
    counts = admin.get("/v1/example-sets/fakes").json()
    assert (counts["positive"], counts["negative"], counts["pending"]) == (1, 1, 1)

    page = admin.get("/v1/example-sets/fakes/items", params={"limit": 1}).json()
    assert len(page["data"]) == 1 and page["next_cursor"] == page["data"][0]["job_id"]
    rest = admin.get("/v1/example-sets/fakes/items", params={"after": page["next_cursor"]}).json()
    assert len(rest["data"]) == 1 and rest["next_cursor"] is None
    assert {row["job_id"] for row in page["data"] + rest["data"]} == {job_id, upload["job_id"]}

    assert admin.delete(f"/v1/example-sets/fakes/items/{job_id}").status_code == 204
    assert_error(admin.get(f"/v1/example-sets/fakes/items/{job_id}"), 404, "example_not_found")
    with session_scope(api.db_url) as session:
        actions = [entry.action for entry in session.exec(select(AuditEntry)).all()]
    assert {"example_set.create", "example_set.item_add", "example_set.item_delete"} <= set(actions)


def test_hostile_input_is_refused_clearly(api: Api) -> None:
    admin = api.client
    assert admin.post("/v1/example-sets", json={"name": "hostile"}).status_code == 201
    job_id = submitted(admin)
    items = "/v1/example-sets/hostile/items"
    assert_error(admin.post(items, json={"job_id": job_id, "label": "Positive"}), 422, "example_label_invalid")
    assert_error(admin.post(items, json={"job_id": job_id, "label": "x" * 100_000}), 413, "payload_too_large")
    assert admin.post(items, json={"job_id": job_id}).status_code == 422
    assert admin.post(items, json={"job_id": job_id, "label": "positive", "weight": 2}).status_code == 422
    assert_error(admin.post(items, json={"job_id": "0" * 32, "label": "positive"}), 404, "job_not_found")
    assert_error(admin.post(items, json={"job_id": "../\x00;drop", "label": "positive"}), 404, "job_not_found")
    assert_error(
        admin.post("/v1/example-sets/nope/items", json={"job_id": job_id, "label": "positive"}),
        404,
        "example_set_not_found",
    )
    assert_error(admin.get("/v1/example-sets/NOPE%00"), 404, "example_set_not_found")
    photo = ("p.jpg", photo_bytes("coffee"))
    assert_error(admin.post(items, files={"image": photo}, data={"label": "maybe"}), 422, "example_label_invalid")
    assert_error(
        admin.post(items, files={"image": photo}, data={"label": "positive", "note": "x"}), 422, "unknown_field"
    )
    assert_error(
        admin.post(items, data={"label": "positive", "policy": "moderation"}, files={"other": photo}),
        422,
        "unknown_field",
    )
    broken = admin.post(items, files={"image": ("x.jpg", b"\xff\xd8\xff not a jpeg" * 10)}, data={"label": "positive"})
    assert broken.status_code in (415, 422), broken.text
    huge = admin.post(
        items, files={"image": ("h.jpg", b"\xff\xd8\xff" + b"\0" * (MAX_UPLOAD + 10))}, data={"label": "positive"}
    )
    assert huge.status_code == 413, huge.text
    assert_error(
        admin.post(items, files={"image": photo}, data={"label": "positive", "policy": "no-such"}),
        404,
        "policy_not_found",
    )
    assert admin.post(items, content=b"label=positive", headers={"content-type": "text/plain"}).status_code == 415
    # Nothing was added by any of them.
    assert admin.get("/v1/example-sets/hostile").json()["positive"] == 0


def test_similar_images_and_another_tenant_sees_nothing(api: Api) -> None:
    admin = api.client
    assert admin.post("/v1/example-sets", json={"name": "shared-name"}).status_code == 201
    query, near, far, unembedded = (submitted(admin) for _ in range(4))
    # Another model than the other tests' embeddings: only embeddings of one model are compared.
    embed(api, query, "default", 0.0, "similar-itm")
    embed(api, near, "default", 0.2, "similar-itm")
    embed(api, far, "default", 2.0, "similar-itm")
    with client_as(api, "admin", "globex") as other:
        theirs = submitted(other)
        embed(api, theirs, "globex", 0.0, "similar-itm")  # identical to the query, but another tenant's
        similar = admin.get(f"/v1/jobs/{query}/similar", params={"limit": 20}).json()
        assert similar["job_id"] == query
        assert [row["job_id"] for row in similar["data"]] == [near, far]
        assert theirs not in {row["job_id"] for row in similar["data"]}
        assert abs(similar["data"][0]["similarity"] - float(np.cos(0.2))) < 1e-4
        assert [
            row["job_id"] for row in admin.get(f"/v1/jobs/{query}/similar", params={"limit": 1}).json()["data"]
        ] == [near]
        assert [row["job_id"] for row in other.get(f"/v1/jobs/{theirs}/similar").json()["data"]] == []

        # Their ids answer 404 to us and ours to them, in every example-set and similar route.
        assert_error(other.get(f"/v1/jobs/{query}/similar"), 404, "job_not_found")
        assert_error(admin.get(f"/v1/jobs/{theirs}/similar"), 404, "job_not_found")
        assert other.get("/v1/example-sets").json() == {"data": []}
        assert_error(other.get("/v1/example-sets/shared-name"), 404, "example_set_not_found")
        assert other.post("/v1/example-sets", json={"name": "shared-name"}).status_code == 201  # names are per tenant
        assert_error(
            other.post("/v1/example-sets/shared-name/items", json={"job_id": query, "label": "positive"}),
            404,
            "job_not_found",
        )
        assert_error(
            admin.post("/v1/example-sets/shared-name/items", json={"job_id": theirs, "label": "positive"}),
            404,
            "job_not_found",
        )
        assert (
            admin.post("/v1/example-sets/shared-name/items", json={"job_id": near, "label": "positive"}).status_code
            == 201
        )
        assert other.get("/v1/example-sets/shared-name/items").json()["data"] == []
        assert_error(other.get(f"/v1/example-sets/shared-name/items/{near}"), 404, "example_not_found")

    assert_error(admin.get(f"/v1/jobs/{unembedded}/similar"), 409, "embedding_missing")
    for limit in ("0", "101", "ten", "-1"):
        assert admin.get(f"/v1/jobs/{query}/similar", params={"limit": limit}).status_code == 422

    # Erasing a job takes its embedding and its membership along: it is nobody's neighbour nor example any more.
    assert admin.delete(f"/v1/jobs/{near}").status_code == 200
    assert [row["job_id"] for row in admin.get(f"/v1/jobs/{query}/similar").json()["data"]] == [far]
    assert admin.get("/v1/example-sets/shared-name/items").json()["data"] == []
    with session_scope(api.db_url) as session:
        assert session.exec(select(ExampleItem).where(ExampleItem.job_id == near)).all() == []
        assert embeddings.get(session, near) is None

    assert admin.delete("/v1/example-sets/shared-name").status_code == 204
    assert_error(admin.get("/v1/example-sets/shared-name"), 404, "example_set_not_found")


def test_the_job_page_adds_an_example_and_shows_similar_images(api: Api) -> None:
    admin = api.client
    assert admin.post("/v1/example-sets", json={"name": "desk"}).status_code == 201
    shown, neighbour = submitted(admin), submitted(admin, "chelsea")
    embed(api, shown, "default", 0.0, "desk-itm")
    embed(api, neighbour, "default", 0.1, "desk-itm")
    with signed_in(api.base_url, api.key, f"/dashboard/jobs/{shown}") as browser:
        page = browser.get(f"/dashboard/jobs/{shown}")
        assert page.status_code == 200
        assert 'data-testid="add-example"' in page.text and '<option value="desk">desk</option>' in page.text
        strip = page.text.split('data-testid="similar-images"', 1)[1]
        assert f'href="/dashboard/jobs/{neighbour}"' in strip and "similarity 0.995" in strip
        assert 'class="thumb"' in strip  # through the blurred macro, like every image of the desk

        form = {"csrf_token": csrf_of(page), "next": f"/dashboard/jobs/{shown}", "set": "desk", "label": "negative"}
        pressed = browser.post(f"/dashboard/jobs/{shown}/example", data=form, follow_redirects=False)
        assert pressed.status_code == 303 and pressed.headers["location"].endswith("notice=example_added")
        again = browser.post(f"/dashboard/jobs/{shown}/example", data=form, follow_redirects=False)
        assert again.headers["location"].endswith("notice=example_exists")
        bad = browser.post(f"/dashboard/jobs/{shown}/example", data=form | {"label": "meh"}, follow_redirects=False)
        assert bad.headers["location"].endswith("notice=example_label_invalid")
        forged = browser.post(
            f"/dashboard/jobs/{shown}/example", data=form | {"csrf_token": "x"}, follow_redirects=False
        )
        assert forged.status_code == 403
    assert admin.get(f"/v1/example-sets/desk/items/{shown}").json()["label"] == "negative"
