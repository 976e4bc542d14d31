"""`Prefer: wait=N` through the HTTP API with no worker running (real HTTP, Redis, SQLite and PostgreSQL): the wait
runs out into 202, capped by MODTAG_MAX_PREFER_WAIT_S; a decision stored while a call waits (as a worker stores it,
with its notice) answers 200; replays wait too; unreadable preferences change nothing. A real worker answers 200 in
test_priority_lane.py."""

from __future__ import annotations

import threading
from typing import Any

import httpx
import pytest

from core.db import session_scope
from core.finality import FinalNotices
from core.jobs import claim_job, find_by_idempotency_key, store_decision
from core.tables import Decision
from tests.support.api import Api, running_api
from tests.support.waiting import wait_for

pytestmark = pytest.mark.timeout(120)

RECHECK_S = 60.0  # longer than any wait here: a call answered 200 early was woken by the notice


@pytest.fixture(scope="module")
def api_overrides() -> dict[str, Any]:
    return {"prefer_wait_recheck_s": RECHECK_S}


def upload(api: Api, photo: bytes, prefer: str | list[str] | None, key: str | None = None) -> httpx.Response:
    headers: list[tuple[str, str]] = []
    for value in [prefer] if isinstance(prefer, str) else prefer or []:
        headers.append(("Prefer", value))
    if key:
        headers.append(("Idempotency-Key", key))
    return api.client.post("/v1/jobs", files={"image": ("a.jpg", photo)}, headers=headers)


def test_the_wait_runs_out_into_202_capped_by_the_setting(api: Api, photos: dict[str, bytes]) -> None:
    photo = next(iter(photos.values()))
    asked_async = upload(api, photo, "respond-async, wait=1")
    assert asked_async.status_code == 202, asked_async.text
    assert asked_async.headers["Preference-Applied"] == "respond-async, wait=1"
    assert asked_async.json()["status"] == "queued" and asked_async.json()["decision"] is None
    with running_api(api.settings.model_copy(update={"max_prefer_wait_s": 1})) as capped:
        response = upload(capped, photo, "wait=3600")
        assert response.status_code == 202, response.text
        assert response.headers["Preference-Applied"] == "wait=1"
    with running_api(api.settings.model_copy(update={"max_prefer_wait_s": 0})) as off:
        response = upload(off, photo, "wait=3600")
        assert response.status_code == 202, response.text
        assert "Preference-Applied" not in response.headers


@pytest.mark.parametrize(
    "prefer",
    [
        "wait=-1",
        "wait=abc",
        "wait=1.5",
        "respond-async",
        "return=minimal",
        ";;;,,,===\"'",
        "x, " * 2000 + "wait=5",  # past the preferences read
    ],
    ids=["negative", "text", "fraction", "async", "other", "garbage", "long"],
)
def test_unreadable_or_other_preferences_answer_at_once_as_before(
    api: Api, photos: dict[str, bytes], prefer: str
) -> None:
    response = upload(api, next(iter(photos.values())), prefer)
    assert response.status_code == 202, response.text
    assert "Preference-Applied" not in response.headers


def test_a_decision_stored_while_the_call_waits_answers_200(api: Api, photos: dict[str, bytes]) -> None:
    """The call is woken by the notice the worker publishes (the recheck interval is longer than the wait)."""
    photo = list(photos.values())[1]
    key = f"moderate-now-{api.db_url[:6]}"
    answer: list[httpx.Response] = []
    call = threading.Thread(target=lambda: answer.append(upload(api, photo, "wait=30", key)))
    call.start()
    job_id = wait_for(lambda: _job_id(api, key), 10, "the job stored")
    with session_scope(api.db_url) as session:
        claimed = claim_job(session, job_id, "a-test-worker", 60)
        assert claimed is not None
        decision = Decision(job_id=job_id, action="block", policy="moderation", policy_version="v")
        store_decision(session, claimed, decision, [])
    # As the worker does once the decision is stored; repeated: the first may precede the subscription.
    notices = FinalNotices(api.settings.redis_url)
    wait_for(lambda: notices.job_final(job_id) or not call.is_alive(), 25, "the waiting call answered")
    call.join()
    (response,) = answer
    assert response.status_code == 200, response.text
    assert response.headers["Preference-Applied"] == "wait=30"
    body = response.json()
    assert body["id"] == job_id and body["status"] == "done" and body["decision"]["action"] == "block"
    assert body == api.client.get(f"/v1/jobs/{job_id}").json()  # the body GET returns
    # A replay of the same request waits too, and finds the decision at once.
    replay = upload(api, photo, "wait=5", key)
    assert replay.status_code == 200 and replay.headers["Idempotent-Replayed"] == "true"
    assert replay.headers["Preference-Applied"] == "wait=5"
    assert replay.json()["decision"]["action"] == "block"


def _job_id(api: Api, key: str) -> str | None:
    with session_scope(api.db_url) as session:
        job = find_by_idempotency_key(session, "default", key)
        return job.id if job is not None else None
