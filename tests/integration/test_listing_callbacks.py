"""A listing's callback: claimed once when its last photo is final (SQLite and PostgreSQL), refused when hostile,
delivered once through a real API and worker, and still delivered when the worker that claimed it died."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from sqlalchemy import inspect, text
from sqlmodel import select
from standardwebhooks.webhooks import Webhook

from core import metrics, webhooks
from core.db import alembic_config, get_engine, session_scope
from core.jobs import NewJob, fail_job
from core.listings import NewListing, create_listing, listing_callback_due
from core.public import ListingPublic
from core.settings import Settings
from core.tables import Job, Listing, WebhookDelivery
from policies.listing import photos_verdict
from tests.support.api import Api, assert_error
from tests.support.deployment import Deployment, wait_listing
from tests.support.photos import photo_bytes
from tests.support.receiver import WebhookReceiver
from tests.support.waiting import wait_for
from worker.callbacks import send_callbacks

pytestmark = pytest.mark.timeout(300)

HOOK = "https://hooks.example.com/listings"


def new_listing(database_url: str, photos: int = 2, callback_url: str | None = HOOK) -> tuple[str, list[str]]:
    """A listing of `photos` queued URL jobs, stored as the API stores it."""
    base: dict[str, Any] = {"tenant": "default", "policy": "listing", "policy_version": "v1"}
    new = NewListing(**base, title="Red mug", description=None, attributes={}, callback_url=callback_url)
    jobs = [NewJob(**base, source="url", image_url=f"https://img.example.com/{i}.jpg") for i in range(photos)]
    with session_scope(database_url) as session:
        listing, rows, created = create_listing(session, new, jobs)
        assert created
        return listing.id, [job.id for job in rows]


def fail(database_url: str, job_id: str) -> None:
    with session_scope(database_url) as session:
        fail_job(session, job_id, "image_truncated", "the image is cut short")


def due(database_url: str, listing_id: str) -> tuple[str, dict[str, Any]] | None:
    """The claimed callback's URL and the body the worker POSTs, or None when not due (or claimed already)."""
    with session_scope(database_url) as session:
        claimed = listing_callback_due(session, listing_id)
    if claimed is None:
        return None
    return claimed.url, ListingPublic.from_rows(claimed.listing, claimed.rows, photos_verdict).model_dump(mode="json")


def test_the_callback_is_due_once_every_photo_is_final_and_claimed_once(database_url: str) -> None:
    listing_id, (first, second) = new_listing(database_url)
    assert due(database_url, listing_id) is None  # nothing final yet
    fail(database_url, first)
    assert due(database_url, listing_id) is None  # one photo still queued
    fail(database_url, second)

    barrier = threading.Barrier(4)
    results: list[tuple[str, dict[str, Any]] | None] = []
    errors: list[BaseException] = []

    def claim() -> None:
        barrier.wait()
        try:
            results.append(due(database_url, listing_id))
        except BaseException as exc:  # surfaced below: a racing claim must lose quietly, not raise
            errors.append(exc)

    threads = [threading.Thread(target=claim) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == []
    claimed = [result for result in results if result is not None]
    assert len(results) == 4 and len(claimed) == 1
    url, body = claimed[0]
    assert url == HOOK and body["id"] == listing_id
    assert body["verdict"]["status"] == "failed" and [photo["status"] for photo in body["photos"]] == ["failed"] * 2
    assert due(database_url, listing_id) is None  # and never again
    with session_scope(database_url) as session:
        listing = session.get(Listing, listing_id)
        assert listing is not None and listing.callback_sent_at is not None


def test_no_callback_without_a_url_or_for_an_unknown_listing(database_url: str) -> None:
    listing_id, jobs = new_listing(database_url, photos=1, callback_url=None)
    fail(database_url, jobs[0])
    assert due(database_url, listing_id) is None
    assert due(database_url, "0" * 32) is None
    with session_scope(database_url) as session:
        listing = session.get(Listing, listing_id)
        assert listing is not None and listing.callback_sent_at is None


def test_the_worker_posts_the_listing_once_and_never_to_a_private_address_unless_allowed(
    database_url: str,
    tmp_path: Path,
    receiver: tuple[str, list[dict[str, Any]]],
) -> None:
    """The worker's callback path, without models: the loopback receiver is a private address."""
    hook, received = receiver
    refused = Settings(_env_file=None, data_dir=tmp_path, database_url=database_url, policies_dir=None)
    allowed = refused.model_copy(update={"fetch_allow_private": True})
    failed_before = metrics.CALLBACKS.labels("failed")._value.get()
    delivered_before = metrics.CALLBACKS.labels("delivered")._value.get()

    listing_id, job_ids = new_listing(database_url, photos=1, callback_url=hook)
    fail(database_url, job_ids[0])
    send_callbacks(refused, job_of(database_url, job_ids[0]))  # must not raise: the job stays failed, not errored
    assert received == []
    assert metrics.CALLBACKS.labels("failed")._value.get() == failed_before + 1

    listing_id, job_ids = new_listing(database_url, photos=1, callback_url=hook)
    fail(database_url, job_ids[0])
    job = job_of(database_url, job_ids[0])
    send_callbacks(allowed, job)
    send_callbacks(allowed, job)  # a redelivered task finishing again: still one POST
    assert [(body["type"], body["data"]["id"]) for body in received] == [("listing.decided", listing_id)]
    assert metrics.CALLBACKS.labels("delivered")._value.get() == delivered_before + 1


def job_of(database_url: str, job_id: str) -> Job:
    with session_scope(database_url) as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job


def test_migration_0004_adds_the_callback_columns_to_existing_listings(database_url: str) -> None:
    config = alembic_config(database_url)
    command.downgrade(config, "0003")
    assert not {"callback_url", "callback_sent_at"} & listing_columns(database_url)
    with get_engine(database_url).begin() as connection:
        connection.execute(
            text(
                "INSERT INTO listings (id, tenant, policy, attributes, image_count, created_at) "
                "VALUES ('l1', 't1', 'listing', '{}', 2, :now)"
            ),
            {"now": "2026-01-01 00:00:00"},
        )
    command.upgrade(config, "head")
    assert {"callback_url", "callback_sent_at"} <= listing_columns(database_url)
    with session_scope(database_url) as session:
        [listing] = session.exec(select(Listing)).all()
        assert (listing.id, listing.callback_url, listing.callback_sent_at) == ("l1", None, None)
    command.downgrade(config, "0003")
    assert not {"callback_url", "callback_sent_at"} & listing_columns(database_url)
    command.upgrade(config, "head")


def listing_columns(database_url: str) -> set[str]:
    with get_engine(database_url).connect() as connection:
        return {column["name"] for column in inspect(connection).get_columns("listings")}


# -- through the API ----------------------------------------------------------------------------------------------

HOSTILE = [
    "ftp://hooks.example.com/listings",
    "file:///etc/passwd",
    "javascript:alert(1)",
    "http://user:secret@hooks.example.com/",
    "https://hooks.example.com/" + "a" * 5000,
    "http://hooks.example.com/\x00",
    "not a url",
]


@pytest.mark.parametrize("url", HOSTILE)
def test_bad_callback_urls_are_refused_on_both_listing_forms(api: Api, url: str) -> None:
    before = listing_count(api)
    body = {"image_urls": ["https://img.example.com/a.jpg"], "title": "Red mug", "callback_url": url}
    assert_error(api.client.post("/v1/listings", json=body), 422, "url_invalid")
    files = [("images", ("a.jpg", photo_bytes("coffee", size=(64, 48)), "image/jpeg"))]
    response = api.client.post("/v1/listings", files=files, data={"title": "Red mug", "callback_url": url})
    assert_error(response, 422, "url_invalid")
    # The same answer as POST /v1/jobs gives: one validation for both.
    jobs = api.client.post("/v1/jobs", json={"image_url": "https://img.example.com/a.jpg", "callback_url": url})
    assert_error(jobs, 422, "url_invalid")
    assert listing_count(api) == before


@pytest.mark.parametrize("value", [42, ["https://hooks.example.com/"], {"url": "https://hooks.example.com/"}, True])
def test_a_callback_url_that_is_not_text_is_refused(api: Api, value: Any) -> None:
    body = {"image_urls": ["https://img.example.com/a.jpg"], "title": "Red mug", "callback_url": value}
    response = api.client.post("/v1/listings", json=body)
    assert response.status_code == 422, response.text
    assert "callback_url" in response.text


def test_a_callback_url_is_stored_normalised_and_private_addresses_are_refused(api: Api) -> None:
    """As for jobs: the URL is normalised, and a host on a private or loopback address is refused at submit."""
    body = {
        "image_urls": ["https://img.example.com/a.jpg"],
        "title": "Red mug",
        "callback_url": "HTTPS://93.184.215.14/x#frag",
    }
    response = api.client.post("/v1/listings", json=body)
    assert response.status_code == 202, response.text
    with session_scope(api.db_url) as session:
        listing = session.get(Listing, response.json()["id"])
        assert listing is not None and listing.callback_url == "https://93.184.215.14/x"
        assert listing.callback_sent_at is None
    refused = api.client.post("/v1/listings", json={**body, "callback_url": "http://10.0.0.1/hook"})
    assert refused.status_code == 422 and refused.json()["code"] == "callback_forbidden", refused.text


def listing_count(api: Api) -> int:
    with session_scope(api.db_url) as session:
        return len(session.exec(select(Listing.id)).all())


# -- through a real API and worker ---------------------------------------------------------------------------------


def test_a_two_photo_listing_calls_back_once_with_its_verdict(
    deployment: Deployment,
    receiver: tuple[str, list[dict[str, Any]]],
) -> None:
    hook, received = receiver
    deployment.start_api()
    deployment.start_worker()
    response = deployment.client.post(
        "/v1/listings",
        files=[
            ("images", (f"{name}.jpg", photo_bytes(name, size=(120, 90)), "image/jpeg"))
            for name in ("coffee", "rocket")
        ],
        data={"title": "Red ceramic coffee mug", "callback_url": hook},
    )
    assert response.status_code == 202, response.text
    listing = wait_listing(deployment, response.json()["id"])
    wait_for(lambda: len(received) >= 1)
    deployment.wait_idle()  # both photos' tasks are over: a second, wrong callback would have arrived by now
    [envelope] = received
    assert envelope["type"] == "listing.decided" and envelope["timestamp"]
    body = envelope["data"]
    assert body["id"] == listing["id"] and body["verdict"] == listing["verdict"]
    assert body["verdict"]["status"] == "done" and body["verdict"]["action"] in ("allow", "review", "block")
    assert [photo["index"] for photo in body["photos"]] == [1, 2]
    assert all(photo["status"] == "done" and photo["decision"] for photo in body["photos"])


class WorkerDied(BaseException):
    """The worker process ending at this very line (nothing after it runs, no handler catches it)."""


def test_a_listing_whose_worker_died_after_the_claim_is_delivered_once(
    deployment: Deployment, webhook_receiver: WebhookReceiver, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    database_url = deployment.env["MODTAG_DATABASE_URL"]
    listing_id, [job_id] = new_listing(database_url, photos=1, callback_url=webhook_receiver.url)
    fail(database_url, job_id)
    # The last photo's worker claims the listing's callback, then dies before its delivery row is written.
    settings = Settings(
        _env_file=None, data_dir=tmp_path, database_url=database_url, policies_dir=None, fetch_allow_private=True
    )

    def die(*_: Any, **__: Any) -> None:
        raise WorkerDied

    with monkeypatch.context() as patched:
        patched.setattr(webhooks, "record_delivery", die)
        with pytest.raises(WorkerDied):
            send_callbacks(settings, job_of(database_url, job_id))
    assert webhook_receiver.attempts == []

    # Another worker's webhook sender finds the listing and delivers it.
    deployment.start_worker(MODTAG_WEBHOOK_POLL_S="0.1", MODTAG_QUEUED_GRACE_S="1")

    def delivered() -> list[WebhookDelivery]:
        with session_scope(database_url) as session:
            rows = session.exec(select(WebhookDelivery).where(WebhookDelivery.subject_id == listing_id)).all()
        return list(rows) if rows and rows[0].status == webhooks.DELIVERED else []

    [row] = wait_for(delivered, 60, "the listing's webhook delivered")
    # A redelivered task of the last photo finishing again changes nothing: no second delivery, no second POST.
    send_callbacks(settings, job_of(database_url, job_id))
    [(headers, body)] = webhook_receiver.attempts
    assert headers["webhook-id"] == row.id and row.event_type == "listing.decided" and row.attempts == 1
    with session_scope(database_url) as session:
        secret = webhooks.tenant_secret(session, "default").secret
        assert len(session.exec(select(WebhookDelivery)).all()) == 1
    assert Webhook(secret).verify(body, headers)["data"]["id"] == listing_id
