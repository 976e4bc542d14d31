"""Webhook events in the Standard Webhooks envelope: review resolutions as `review.resolved` through a real worker,
redelivery with the same webhook-id and a fresh signature, who may redeliver what, the dashboard's Deliveries page
over real HTTP, and migration 0010's rewrite of the messages stored before it."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from sqlalchemy import text
from sqlmodel import select
from standardwebhooks.webhooks import Webhook

from core import __version__, webhooks
from core.db import alembic_config, get_engine, session_scope
from core.events import EventType, envelope
from core.principals import cli_principal
from core.settings import Settings
from core.tables import AuditEntry, WebhookDelivery
from modtag.client import ApiClient
from tests.support.api import Api, admin_key, assert_error
from tests.support.dashboard import csrf_of, signed_in
from tests.support.deployment import Deployment
from tests.support.jobs import decided_url_job, new_job
from tests.support.receiver import WebhookReceiver
from tests.support.waiting import wait_for
from worker.callbacks import deliver

pytestmark = pytest.mark.timeout(240)


@pytest.mark.slow  # a real worker's webhook sender: about 35 s a backend
def test_a_review_resolution_is_a_review_resolved_event_and_redelivery_repeats_its_id(
    deployment: Deployment, webhook_receiver: WebhookReceiver
) -> None:
    database_url = deployment.env["MODTAG_DATABASE_URL"]
    job_id = decided_url_job(database_url, callback_url=webhook_receiver.url)
    deployment.start_api()
    deployment.start_worker(MODTAG_WEBHOOK_POLL_S="0.1")
    resolved = deployment.client.post(f"/v1/review/{job_id}/resolve", json={"action": "block", "reason": "a rifle"})
    assert resolved.status_code == 200, resolved.text

    def sent(kind: str, count: int) -> list[tuple[dict[str, str], bytes]]:
        found = [(h, b) for h, b in webhook_receiver.attempts if json.loads(b)["type"] == kind]
        return found if len(found) >= count else []

    [(headers, body)] = wait_for(lambda: sent("review.resolved", 1), 60, "the review.resolved webhook")
    secret = deployment.client.get("/v1/webhooks/secret").json()["secret"]
    event = Webhook(secret).verify(body, headers)
    assert event["data"]["id"] == job_id and event["data"]["decision"]["action"] == "review"
    assert event["data"]["review"]["resolution"]["action"] == "block"
    assert headers["user-agent"] == f"modtag-webhooks/{__version__}"

    # The receiver has the message; the sender records it as delivered just after its answer.
    (entry,) = wait_for(
        lambda: deployment.client.get("/v1/webhooks/deliveries", params={"status": "delivered"}).json()["data"],
        30,
        "the delivery recorded as delivered",
    )
    assert entry["event_type"] == "review.resolved" and entry["id"] == headers["webhook-id"]
    again = deployment.client.post(f"/v1/webhooks/deliveries/{entry['id']}/redeliver")
    assert again.status_code == 202, again.text
    assert again.json()["status"] == "pending" and again.json()["redeliveries"] == 1
    _, (headers_2, body_2) = wait_for(lambda: sent("review.resolved", 2), 60, "the redelivery")
    assert headers_2["webhook-id"] == headers["webhook-id"] and body_2 == body
    assert Webhook(secret).verify(body_2, headers_2) == event
    audit = deployment.client.get("/v1/audit", params={"action": "webhook.redeliver"}).json()["data"]
    assert [(e["target"]["id"], e["after"]["redeliveries"]) for e in audit] == [(entry["id"], 1)]


def test_a_redelivery_signs_a_fresh_timestamp(
    database_url: str, tmp_path: Path, webhook_receiver: WebhookReceiver
) -> None:
    settings = Settings(
        _env_file=None, data_dir=tmp_path, database_url=database_url, policies_dir=None, fetch_allow_private=True
    )
    job_id = new_job(database_url)
    with session_scope(database_url) as session:
        row = webhooks.record_delivery(
            session,
            tenant="default",
            event_type=EventType.JOB_DECIDED,
            subject_id=job_id,
            url=webhook_receiver.url,
            payload=envelope(EventType.JOB_DECIDED, {"id": job_id}),
        )
        secret = webhooks.tenant_secret(session, "default").secret
    now = time.time()
    deliver(settings, row.id, clock=lambda: now - 120)
    with session_scope(database_url) as session:
        webhooks.redeliver(session, row.id, cli_principal("default"))
    deliver(settings, row.id, clock=lambda: now)
    (first_headers, first), (second_headers, second) = webhook_receiver.attempts
    assert first_headers["webhook-id"] == second_headers["webhook-id"] == row.id and first == second
    assert (first_headers["webhook-timestamp"], second_headers["webhook-timestamp"]) == (
        str(int(now - 120)),
        str(int(now)),
    )
    assert first_headers["webhook-signature"] != second_headers["webhook-signature"]
    for headers, body in webhook_receiver.attempts:
        event = Webhook(secret).verify(body, headers)
        assert event["type"] == "job.decided" and event["data"] == {"id": job_id}
    with session_scope(database_url) as session:
        stored = session.get(WebhookDelivery, row.id)
        assert stored is not None and (stored.status, stored.attempts, stored.redeliveries) == ("delivered", 1, 1)


def recorded(api: Api, tenant: str, *, erased: bool = False) -> str:
    job_id = new_job(api.db_url, tenant=tenant)
    with session_scope(api.db_url) as session:
        row = webhooks.record_delivery(
            session,
            tenant=tenant,
            event_type=EventType.JOB_DECIDED,
            subject_id=job_id,
            url="https://hooks.example.com/modtag?token=t",
            payload=envelope(EventType.JOB_DECIDED, {"id": job_id}),
        )
        if erased:
            webhooks.erase_deliveries(session, [job_id])
            session.commit()
        return row.id


def test_only_the_tenants_own_messages_are_redelivered(api: Api) -> None:
    own, erased, other = recorded(api, "default"), recorded(api, "default", erased=True), recorded(api, "acme")
    assert api.client.post(f"/v1/webhooks/deliveries/{own}/redeliver").status_code == 202
    assert_error(api.client.post(f"/v1/webhooks/deliveries/{other}/redeliver"), 404, "delivery_not_found")
    assert_error(api.client.post("/v1/webhooks/deliveries/msg_nope/redeliver"), 404, "delivery_not_found")
    assert_error(api.client.post(f"/v1/webhooks/deliveries/{'x' * 300}/redeliver"), 404, "delivery_not_found")
    assert_error(api.client.post(f"/v1/webhooks/deliveries/{erased}/redeliver"), 409, "delivery_erased")
    with ApiClient(api.base_url, key=admin_key(api.db_url, role="review"), timeout_s=30) as reviewer:
        assert_error(reviewer.post(f"/v1/webhooks/deliveries/{own}/redeliver"), 403, "forbidden")
    with session_scope(api.db_url) as session:
        row = session.get(WebhookDelivery, other)
        assert row is not None and row.redeliveries == 0
        entries = session.exec(select(AuditEntry).where(AuditEntry.action == "webhook.redeliver")).all()
        assert [entry.target_id for entry in entries] == [own]


def test_the_deliveries_page_lists_and_redelivers_with_csrf(api: Api) -> None:
    own, other = recorded(api, "default"), recorded(api, "acme")
    with signed_in(api.base_url, api.key, "/dashboard/deliveries") as browser:
        page = browser.get("/dashboard/deliveries")
        assert page.status_code == 200 and 'href="/dashboard/deliveries"' in page.text  # the nav link
        assert f'data-id="{own}"' in page.text and other not in page.text
        assert "https://hooks.example.com/modtag" in page.text and "job.decided" in page.text
        assert browser.get("/dashboard/deliveries", params={"status": "failed"}).text.count('class="delivery"') == 0
        refused = browser.post(f"/dashboard/deliveries/{own}/redeliver", data={"csrf_token": "forged"})
        assert refused.status_code == 403
        form = {"csrf_token": csrf_of(page), "next": "/dashboard/deliveries"}
        pressed = browser.post(f"/dashboard/deliveries/{own}/redeliver", data=form, follow_redirects=False)
        assert pressed.status_code == 303 and pressed.headers["location"].endswith("notice=redelivered")
        assert "redeliveries: 1" in browser.get(pressed.headers["location"]).text
        missing = browser.post(f"/dashboard/deliveries/{other}/redeliver", data=form, follow_redirects=False)
        assert missing.headers["location"].endswith("notice=delivery_not_found")
    with session_scope(api.db_url) as session:
        row = session.get(WebhookDelivery, other)
        assert row is not None and row.redeliveries == 0


def test_migration_0010_renames_and_wraps_the_stored_messages(database_url: str) -> None:
    config = alembic_config(database_url)
    done, failed, listing = new_job(database_url, status="done"), new_job(database_url, status="failed"), "l" * 32
    command.downgrade(config, "0009")
    legacy: list[dict[str, Any]] = [
        {"id": "msg_done", "type": "job.completed", "subject": done, "body": json.dumps({"id": done})},
        {"id": "msg_failed", "type": "job.completed", "subject": failed, "body": json.dumps({"id": failed})},
        {"id": "msg_listing", "type": "listing.completed", "subject": listing, "body": json.dumps({"id": listing})},
        {"id": "msg_erased", "type": "job.completed", "subject": "e" * 32, "body": ""},
    ]
    with get_engine(database_url).begin() as connection:
        for row in legacy:
            connection.execute(
                text(
                    "INSERT INTO webhook_deliveries (id, tenant, event_type, subject_id, url, payload, status, "
                    "attempts, created_at) VALUES (:id, 'default', :type, :subject, 'https://h.example', :body, "
                    "'delivered', 1, :at)"
                ),
                {**row, "at": "2026-01-02 03:04:05"},
            )
    command.upgrade(config, "head")
    with session_scope(database_url) as session:
        rows = {row.id: row for row in session.exec(select(WebhookDelivery)).all()}
    assert {key: row.event_type for key, row in rows.items()} == {
        "msg_done": "job.decided", "msg_failed": "job.failed", "msg_listing": "listing.decided",
        "msg_erased": "job.decided",
    }  # fmt: skip
    assert json.loads(rows["msg_failed"].payload) == {
        "type": "job.failed", "timestamp": "2026-01-02T03:04:05+00:00", "data": {"id": failed}
    }  # fmt: skip
    assert rows["msg_erased"].payload == "" and rows["msg_done"].redeliveries == 0
    command.downgrade(config, "0009")
    with get_engine(database_url).connect() as connection:
        back = dict(connection.execute(text("SELECT id, payload FROM webhook_deliveries")).all())
        types = set(connection.execute(text("SELECT event_type FROM webhook_deliveries")).scalars())
    assert back == {row["id"]: row["body"] for row in legacy} and types == {"job.completed", "listing.completed"}
    command.upgrade(config, "head")


def test_each_resolution_records_its_own_review_resolved_message(api: Api) -> None:
    hook = "https://hooks.example.com/reviews"
    job_id = decided_url_job(api.db_url, callback_url=hook)
    silent = decided_url_job(api.db_url)  # no callback URL: nothing to send
    for step, body in (
        ("resolve", {"action": "block", "reason": "a rifle"}),
        ("reopen", {"reason": "appeal: a toy"}),
        ("resolve", {"action": "allow", "reason": "a toy rifle"}),
    ):
        assert api.client.post(f"/v1/review/{job_id}/{step}", json=body).status_code == 200
    assert api.client.post(f"/v1/review/{silent}/resolve", json={"action": "allow", "reason": "ok"}).status_code == 200
    with session_scope(api.db_url) as session:
        rows = session.exec(
            select(WebhookDelivery).where(WebhookDelivery.event_type == "review.resolved").order_by("sequence")
        ).all()
        assert {row.subject_id for row in rows} == {job_id}
        assert [(row.sequence, row.url, row.status) for row in rows] == [(0, hook, "pending"), (1, hook, "pending")]
        bodies = [json.loads(row.payload) for row in rows]
    assert [body["type"] for body in bodies] == ["review.resolved", "review.resolved"]
    assert [body["data"]["review"]["resolution"]["action"] for body in bodies] == ["block", "allow"]
    assert all(body["data"]["id"] == job_id and body["timestamp"] for body in bodies)
