"""The bulk lane through the HTTP API (real HTTP, Redis, SQLite and PostgreSQL): `priority` read from the form or
JSON, stored, shown, and the task sent to its own queue; the reconciler puts a lost bulk job back on the bulk queue."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import redis

from core.broker import make_celery, task_id_for
from core.queues import Queue
from core.reconcile import reconcile_once
from core.settings import Settings
from core.tables import utcnow
from tests.support.api import Api, assert_error
from tests.support.jobs import new_job, stored

pytestmark = pytest.mark.timeout(120)


def queued_ids(api: Api, queue: Queue) -> list[str]:
    return [json.loads(raw)["headers"]["id"] for raw in api.redis.lrange(queue.value, 0, -1)]


def test_a_bulk_upload_is_stored_shown_and_queued_on_the_bulk_lane(api: Api, photos: dict[str, bytes]) -> None:
    photo = next(iter(photos.values()))
    bulk = api.upload(photo, priority="bulk")
    assert bulk.status_code == 202, bulk.text
    assert bulk.json()["priority"] == "bulk"
    live = api.upload(photo)  # the default
    assert live.json()["priority"] == "interactive"
    assert task_id_for(bulk.json()["id"]) in queued_ids(api, Queue.INFERENCE_BULK)
    assert task_id_for(bulk.json()["id"]) not in queued_ids(api, Queue.INFERENCE)
    assert task_id_for(live.json()["id"]) in queued_ids(api, Queue.INFERENCE)
    assert stored(api.db_url, bulk.json()["id"]).priority == "bulk"
    assert api.client.get(f"/v1/jobs/{bulk.json()['id']}").json()["priority"] == "bulk"


def test_json_jobs_and_listings_take_a_priority(api: Api, photos: dict[str, bytes]) -> None:
    job = api.client.post("/v1/jobs", json={"image_url": "https://example.com/a.jpg", "priority": "bulk"})
    assert job.status_code == 202, job.text
    assert job.json()["priority"] == "bulk"
    two = list(photos.values())[:2]
    listing = api.client.post(
        "/v1/listings",
        files=[("images", (f"{index}.jpg", data)) for index, data in enumerate(two)],
        data={"title": "a red mug", "priority": "bulk"},
    )
    assert listing.status_code == 202, listing.text
    assert [photo["priority"] for photo in listing.json()["photos"]] == ["bulk", "bulk"]
    waiting = queued_ids(api, Queue.INFERENCE_BULK)
    assert all(task_id_for(photo["id"]) in waiting for photo in listing.json()["photos"])


def test_an_idempotency_key_replayed_in_the_other_lane_is_a_conflict(api: Api, photos: dict[str, bytes]) -> None:
    """The same key and photo with another `priority` is another request: answering it with the first job would put
    a catalogue re-check in the live lane (or a live upload behind the catalogue)."""
    photo = next(iter(photos.values()))
    key = {"Idempotency-Key": "lane-1"}
    first = api.client.post("/v1/jobs", files={"image": ("a.jpg", photo)}, data={"priority": "bulk"}, headers=key)
    assert first.status_code == 202, first.text
    again = api.client.post("/v1/jobs", files={"image": ("a.jpg", photo)}, data={"priority": "bulk"}, headers=key)
    assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
    before = api.job_count()
    other = api.client.post("/v1/jobs", files={"image": ("a.jpg", photo)}, headers=key)  # the default: interactive
    assert_error(other, 409, "idempotency_conflict")
    assert "priority" in other.json()["detail"] and api.job_count() == before

    listing_key = {"Idempotency-Key": "lane-2"}
    body = {"image_urls": ["https://example.com/a.jpg"], "title": "a red mug"}
    live = api.client.post("/v1/listings", json=body, headers=listing_key)
    assert live.status_code == 202, live.text
    assert api.client.post("/v1/listings", json=body, headers=listing_key).status_code == 200
    bulk = api.client.post("/v1/listings", json={**body, "priority": "bulk"}, headers=listing_key)
    assert_error(bulk, 409, "idempotency_conflict")


@pytest.mark.parametrize(
    "value",
    ["urgent", "", "BULK ", "bulk\x00", "b" * 100_000, 1, True, None, ["bulk"], {"priority": "bulk"}],
    ids=["unknown", "empty", "case", "nul", "huge", "number", "bool", "null", "list", "object"],
)
def test_a_bad_priority_is_refused_and_stores_nothing(api: Api, value: Any) -> None:
    before = api.job_count()
    response = api.client.post("/v1/jobs", json={"image_url": "https://example.com/a.jpg", "priority": value})
    if value is None:  # JSON null is "not given": the default
        assert response.status_code == 202, response.text
        assert response.json()["priority"] == "interactive"
        return
    code = "payload_too_large" if isinstance(value, str) and len(value) > 50_000 else "invalid_priority"
    assert_error(response, 413 if code == "payload_too_large" else 422, code)
    assert api.job_count() == before


def test_a_bad_form_priority_is_refused(api: Api, photos: dict[str, bytes]) -> None:
    photo = next(iter(photos.values()))
    before = api.job_count()
    assert_error(api.upload(photo, priority="later"), 422, "invalid_priority")
    assert_error(api.upload(photo, priority=" BULK"), 422, "invalid_priority")
    assert api.job_count() == before
    assert api.upload(photo, priority="").json()["priority"] == "interactive"  # an empty form field: the default
    before += 1
    response = api.client.post("/v1/jobs", files={"image": ("a.jpg", photo), "priority": ("p.txt", b"bulk")}, data={})
    assert_error(response, 400, "invalid_multipart")  # a second file: refused before any field is read
    assert api.job_count() == before


def test_the_reconciler_puts_a_lost_bulk_job_back_on_the_bulk_queue(
    database_url: str, redis_url: str, tmp_path: Path
) -> None:
    settings = Settings(_env_file=None, database_url=database_url, redis_url=redis_url, data_dir=tmp_path)  # type: ignore[call-arg]
    client = redis.Redis.from_url(redis_url)
    client.delete(*(queue.value for queue in Queue))
    long_ago = utcnow() - timedelta(hours=2)
    bulk = new_job(database_url, updated_at=long_ago, priority="bulk")
    live = new_job(database_url, updated_at=long_ago)
    report = reconcile_once(settings, make_celery(settings), client)
    assert report.requeued >= 2
    bulk_queue = [json.loads(raw)["headers"]["id"] for raw in client.lrange(Queue.INFERENCE_BULK.value, 0, -1)]
    live_queue = [json.loads(raw)["headers"]["id"] for raw in client.lrange(Queue.INFERENCE.value, 0, -1)]
    assert task_id_for(bulk) in bulk_queue and task_id_for(bulk) not in live_queue
    assert task_id_for(live) in live_queue
    # A second pass sees the bulk job's message waiting on its queue: not enqueued again.
    again = reconcile_once(settings, make_celery(settings), client)
    assert again.requeued == 0
